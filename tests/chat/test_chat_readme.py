"""The worked example in src/k25/chat/README.md is produced by the code, in both directions."""

from __future__ import annotations

import json
import re
from pathlib import Path

from k25.chat.parsers import parse_output
from k25.chat.template import render

README = Path(__file__).resolve().parents[2] / "src" / "k25" / "chat" / "README.md"


def block(name: str) -> str:
    m = re.search(rf"```\w+ {name}\n(.*?)\n```", README.read_text(encoding="utf-8"), re.S)
    assert m, f"block {name} missing from README"
    return m.group(1)


def test_readme_worked_example() -> None:
    conv = json.loads(block("example-conversation"))
    assert render(conv["messages"], conv["tools"]) == block("example-prompt")
    message = parse_output(block("example-output")).to_message()
    assert message == json.loads(block("example-message"))
    again = render(
        [
            *conv["messages"],
            message,
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": '{"temp_c": 18}'},
        ],
        conv["tools"],
    )
    assert again.endswith(
        block("example-output") + "<|im_end|><|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\n"
        '{"temp_c": 18}<|im_end|><|im_assistant|>assistant<|im_middle|><think>'
    )
