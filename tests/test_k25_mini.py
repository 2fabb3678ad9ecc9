"""The shipped k25-mini loads from the package and answers held-out questions of its curriculum.

The questions are generated here (``k25.data.generate``); the held-out split is a pure function of
each task's key, so these tasks were never trained on whatever the generation size.
"""

from __future__ import annotations

import json

import pytest

from k25.data import generate, write
from k25.weights import MissingWeightsError, default_model_dir


@pytest.fixture(scope="module")
def weights():
    try:
        return default_model_dir()
    except MissingWeightsError as e:
        pytest.skip(f"k25-mini has not been trained and shipped yet: {e}")


def test_shipped_weights_are_the_official_int4_format(weights):
    config = json.loads((weights / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["format"] == "pack-quantized"
    group = quant["config_groups"]["group_0"]["weights"]
    assert (group["num_bits"], group["group_size"], group["symmetric"]) == (4, 32, True)
    total = sum(p.stat().st_size for p in weights.glob("*.safetensors"))
    assert total < 40e6, f"k25-mini's weights should be tens of MB, found {total / 1e6:.1f} MB"
    assert (weights / "README.md").read_text().startswith("# k25-mini")


def test_k25_mini_answers_held_out_questions(weights, tmp_path):
    """Held-out tool arithmetic: valid calculator calls, and the answers (the card measures 100% on 20)."""
    from k25.eval import EngineGenerator, evaluate

    families = ["tool_calc", "tool_search"]
    write(generate(seed=0, n_per_family=10, n_heldout=8, families=families), tmp_path)
    report = evaluate(EngineGenerator(weights, max_tokens=192, concurrency=8), tmp_path, families=families)
    fams = report["families"]
    assert fams["tool_calc"]["accuracy"] >= 0.75, fams["tool_calc"]
    calls = sum(f["tool_calls"] for f in fams.values())
    assert calls >= 12 and sum(f["valid_tool_calls"] for f in fams.values()) == calls
