"""k25-mini is the default model: `k25 serve`, `k25 chat`, `k25 agent` and `k25 swarm` use it when no model
or endpoint is named, and say clearly what to do when its weights are not there.

A tiny random checkpoint with a byte tokenizer stands in for k25-mini (the default folder is
monkeypatched), so these tests exercise the whole path on any checkout; the last test asks the
real shipped k25-mini a calculator question once its weights exist.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
from pathlib import Path

import openai
import pytest

import k25.weights
from k25.agents.builtin import calculator_tool
from k25.agents.cli import main as agents_main
from k25.server.engine_backend import EngineBackend
from k25.testing import byte_tokenizer, tiny_config, write_random_checkpoint
from k25.weights import DEFAULT_MODEL_NAME, MissingWeightsError, default_model_dir

ENDPOINT_ENV = ("K25_BASE_URL", "OPENAI_BASE_URL", "K25_MODEL")
INSTANT = {"thinking": {"type": "disabled"}}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A servable stand-in for the shipped folder: official layout, tokenizer files, random weights."""
    path = tmp_path_factory.mktemp("weights") / "k25-mini"
    write_random_checkpoint(path, tiny_config(), seed=0, tokenizer=byte_tokenizer(tmp_path_factory.mktemp("tok")))
    return path


@pytest.fixture
def default_is(monkeypatch):
    """Point the default model folder somewhere, and make sure no endpoint leaks in from the environment."""
    for var in ENDPOINT_ENV:
        monkeypatch.delenv(var, raising=False)

    def point(path):
        monkeypatch.setattr(k25.weights, "DEFAULT_MODEL_DIR", path)
        return path

    return point


def _parser(module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k25")
    module.register(parser.add_subparsers(dest="command", required=True))
    return parser


# ---- k25.weights ------------------------------------------------------------------------------------


def test_missing_weights_name_the_path_and_what_to_do(default_is, tmp_path):
    missing = default_is(tmp_path / "nowhere" / "k25-mini")
    with pytest.raises(MissingWeightsError) as e:
        default_model_dir()
    text = str(e.value)
    assert str(missing) in text and "does not exist" in text
    assert "k25 serve /path/to/checkpoint" in text and "--base-url" in text
    assert isinstance(e.value, FileNotFoundError)


def test_incomplete_folder_lists_what_it_lacks(default_is, tmp_path):
    folder = default_is(tmp_path / "k25-mini")
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(MissingWeightsError, match=r"lacks tiktoken\.model, model\.safetensors"):
        default_model_dir()


def test_complete_folder_is_returned(default_is, mini):
    default_is(mini)
    assert default_model_dir() == mini
    assert DEFAULT_MODEL_NAME == "k25-mini"


def test_shipped_location_is_inside_the_package():
    package = Path(k25.weights.__file__).resolve().parent
    assert package / "k25-mini" == k25.weights.DEFAULT_MODEL_DIR


# ---- k25 serve / k25 chat ---------------------------------------------------------------------------


def test_serve_without_a_model_serves_k25_mini(default_is, mini, monkeypatch, capsys):
    import uvicorn

    from k25.server import cli

    default_is(mini)
    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    args = _parser(cli).parse_args(["serve", "--port", "8123"])
    assert args.model is None
    assert args.func(args) == 0
    state = ran["app"].state.k25
    assert state.model_name == "k25-mini" and ran["port"] == 8123
    assert "serving k25-mini on http://127.0.0.1:8123" in capsys.readouterr().out


def test_serve_with_a_directory_keeps_naming_it_after_the_folder(mini, tmp_path):
    from k25.server.cli import model_and_name

    assert model_and_name(str(tmp_path), None) == (tmp_path, tmp_path.name)
    assert model_and_name(str(tmp_path), "x") == (tmp_path, "x")


def test_serve_without_weights_exits_with_the_reason(default_is, tmp_path):
    from k25.server import cli

    default_is(tmp_path / "absent")
    args = _parser(cli).parse_args(["serve"])
    with pytest.raises(SystemExit) as e:
        args.func(args)
    assert str(e.value).startswith("k25 serve: the built-in model k25-mini is not installed")
    assert str(tmp_path / "absent") in str(e.value)


def test_chat_without_a_model_talks_to_k25_mini(default_is, mini, capsys):
    from k25.engine import cli

    default_is(mini)
    args = _parser(cli).parse_args(["chat", "--message", "Hi", "--instant", "--max-tokens", "4"])
    assert args.model is None and cli.chat_model(args.model) == str(mini)
    assert args.func(args) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_chat_without_weights_exits_with_the_reason(default_is, tmp_path):
    from k25.engine import cli

    default_is(tmp_path / "absent")
    args = _parser(cli).parse_args(["chat", "--message", "Hi"])
    with pytest.raises(SystemExit, match="k25 chat: the built-in model k25-mini is not installed"):
        args.func(args)


# ---- k25 agent / k25 swarm --------------------------------------------------------------------------


def test_agent_without_an_endpoint_serves_k25_mini_locally(default_is, mini, monkeypatch, capsys):
    default_is(mini)
    prompts: list[list[int]] = []
    stream = EngineBackend.stream

    def spy(self, request_id, prompt_ids, *a, **kw):
        prompts.append(list(prompt_ids))
        assert self.model_name == "k25-mini"
        return stream(self, request_id, prompt_ids, *a, **kw)

    monkeypatch.setattr(EngineBackend, "stream", spy)
    rc = agents_main(["agent", "What is 6 * 7?", "--max-steps", "1", "--max-tokens", "6", "--no-code", "--json",
                      "--thinking", "off"])
    out = capsys.readouterr()
    assert rc in (0, 1), out.err  # the random weights' reply may or may not be a final answer
    data = json.loads(out.out)
    assert data["steps"] == 1 and data["prompt_tokens"] == len(prompts[0]) and data["completion_tokens"] <= 6
    line = re.search(r"k25: no endpoint given .*: serving k25-mini from (\S+) at (http://127\.0\.0\.1:(\d+)/v1)",
                     out.err)
    assert line is not None, out.err
    assert line.group(1) == str(mini)
    # the request went through the local server: the task and the calculator's declaration are in the prompt
    prompt = bytes(t for t in prompts[0] if t < 256).decode()
    assert "What is 6 * 7?" in prompt and "calculator" in prompt
    # and the server is gone once the run is over
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", int(line.group(3))), timeout=2):
        pass


def test_agent_and_swarm_without_endpoint_or_weights_say_what_to_do(default_is, tmp_path, capsys):
    default_is(tmp_path / "absent")
    assert agents_main(["agent", "hi", "--no-code"]) == 2
    err = capsys.readouterr().err
    assert "no endpoint given (--base-url, $K25_BASE_URL or $OPENAI_BASE_URL)" in err
    assert "k25-mini is not installed" in err and str(tmp_path / "absent") in err
    assert agents_main(["swarm", "hi", "--no-code", "--run-dir", str(tmp_path / "run")]) == 2
    assert "k25-mini is not installed" in capsys.readouterr().err


def test_a_remote_model_name_without_an_endpoint_is_refused(default_is, mini, capsys):
    default_is(mini)
    assert agents_main(["agent", "hi", "--model", "kimi-k2.5", "--no-code"]) == 2
    assert "model 'kimi-k2.5' needs an endpoint: pass --base-url URL" in capsys.readouterr().err


# ---- the real k25-mini (once its weights are shipped) ----------------------------------------------


def test_k25_mini_answers_a_calculator_question_through_a_real_tool_call():
    """The issue's acceptance check: the openai client, a tool-using question, a real calculator call."""
    from k25.server.local import local_server

    try:
        default_model_dir()
    except MissingWeightsError as e:
        pytest.skip(f"k25-mini has not been trained and shipped yet: {e}")
    calculator = calculator_tool()
    messages = [{"role": "user", "content": "What is 9681 * 5040 * 4182 - 7898?"}]
    with local_server() as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=300)
        calls = 0
        for _ in range(4):
            r = client.chat.completions.create(model="k25-mini", messages=messages, tools=[calculator.spec()],
                                               temperature=0, max_tokens=256, extra_body=INSTANT)
            msg = r.choices[0].message
            if not msg.tool_calls:
                break
            messages.append(msg.model_dump(exclude_none=True))
            for c in msg.tool_calls:
                assert c.function.name == "calculator"
                calls += 1
                result = asyncio.run(calculator(c.function.arguments))  # exactly as the agent runtime runs it
                messages.append({"role": "tool", "tool_call_id": c.id, "content": result.content})
    assert calls >= 1, "k25-mini answered without calling the calculator"
    assert "204049139782" in (msg.content or "")
