"""The `k25` command line, run in-process through its `main`."""

from __future__ import annotations

import pytest

from k25.cli import main


def test_info_prints_the_computed_kimi_k25_figures(capsys):
    assert main(["info", "kimi-k2.5"]) == 0
    out = capsys.readouterr().out
    for figure in (
        "1,026,408,232,448",  # text parameters (spec §1.2)
        "32,861,500,928",  # activated per token, embedding and lm_head included
        "416,866,032",  # MoonViT-3D
        "54,277,888",  # projector
        "70,272 B",  # MLA latent cache per token: 61 x 576 x 2
        "2,498,560 B",  # the same as a full multi-head cache: 61 x 64 x 320 x 2
        "35.6x",
    ):
        assert figure in out, figure
    assert "554.27 GiB" in out  # the native INT4 mix; the released 64 shards hold 554.30 GiB


def test_init_then_generate_from_the_checkpoint(tmp_path, capsys):
    out_dir = tmp_path / "tiny"
    assert main(["init", "tiny", str(out_dir), "--dtype", "float32"]) == 0
    assert (out_dir / "config.json").exists() and (out_dir / "model.safetensors.index.json").exists()
    assert main(["generate", str(out_dir), "--prompt-ids", "1, 2, 3", "--max-new-tokens", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    generated = [line for line in lines if line.startswith("generated ids:")][0]
    assert len(generated.split("[")[1].split(",")) == 5


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["info", "no-such-preset"]) == 2
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"model_type": "kimi_k25"}')
    assert main(["info", str(tmp_path)]) == 2
    assert "text_config: missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "tiny", "--prompt-ids", "a b"])
