"""The code interpreter's sandbox: each limit is really enforced, on every isolation layer here."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest

from k25.agents import Limits, Sandbox, available_isolation, code_interpreter

LAYERS = available_isolation()


def run(code: str, isolation: str, workdir=None, **limits):
    box = Sandbox(Limits(**{"cpu_seconds": 1, "memory_mb": 256, "wall_seconds": 20, **limits}), isolation)
    return asyncio.run(box.run(code, workdir))


def test_rlimit_layer_is_always_available():
    assert LAYERS[-1] == "rlimit"
    with pytest.raises(RuntimeError, match="not available here"):
        Sandbox(isolation="firecracker")


@pytest.mark.parametrize("layer", LAYERS)
def test_ordinary_code_runs_in_a_fresh_directory_with_a_clean_env(layer, monkeypatch):
    monkeypatch.setenv("K25_SECRET_TOKEN", "hunter2")
    res = run("import os, sys\nprint(sorted(os.listdir('.')), 'K25_SECRET_TOKEN' in os.environ)\n"
              "open('out.txt', 'w').write('data')\nprint(6 * 7)", layer)
    assert res.ok, res.report()
    assert res.stdout.splitlines() == ["['main.py'] False", "42"]
    assert res.files == ["out.txt"] and res.isolation == layer


@pytest.mark.parametrize("layer", LAYERS)
def test_cpu_loop_is_killed(layer):
    res = run("while True:\n    pass", layer)
    assert not res.ok and res.limit_hit == "CPU-time limit of 1 s exceeded"
    assert "[stopped: CPU-time limit of 1 s exceeded]" in res.report()


@pytest.mark.parametrize("layer", LAYERS)
def test_memory_hog_is_stopped(layer):
    res = run("blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024 * 1024))", layer)
    assert not res.ok and res.limit_hit == "memory limit of 256 MB exceeded", res.report()


@pytest.mark.parametrize("layer", LAYERS)
def test_network_is_refused(layer):
    code = ("import socket\ns = socket.socket()\ns.settimeout(2)\n"
            "try:\n    s.connect(('127.0.0.1', 9))\nexcept OSError as e:\n    print('refused:', e)\n")
    res = run(code, layer)
    assert res.ok and res.stdout.startswith("refused:"), res.report()


@pytest.mark.parametrize("layer", LAYERS)
def test_writing_outside_the_workdir_is_refused(layer, tmp_path):
    target = tmp_path / "outside.txt"
    res = run(f"open({str(target)!r}, 'w').write('escaped')", layer)
    assert not res.ok and not target.exists()
    assert "PermissionError" in res.stderr or "Read-only file system" in res.stderr, res.report()


@pytest.mark.parametrize("layer", [x for x in LAYERS if x in ("bwrap", "rlimit")])
def test_only_bwrap_holds_when_the_guard_is_bypassed(layer):
    """libc's open() through ctypes skips the audit hook: the read-only root of bwrap still holds,
    the rlimit layer does not (which is why the docs call the guard a second layer)."""
    target = Path("/var/tmp") / f"k25-bypass-{uuid.uuid4().hex}.txt"
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None)\n"
            f"fd = libc.open({str(target).encode()!r}, os.O_WRONLY | os.O_CREAT, 0o644)\nprint('fd', fd)\n")
    try:
        res = run(code, layer)
        assert target.exists() == (layer == "rlimit"), res.report()
    finally:
        target.unlink(missing_ok=True)


@pytest.mark.parametrize("layer", LAYERS)
def test_wall_clock_limit_kills_a_sleeper(layer):
    res = run("import time\nprint('start', flush=True)\ntime.sleep(60)", layer, wall_seconds=1)
    assert res.limit_hit == "wall-clock limit of 1 s exceeded" and res.stdout == "start\n"


def test_shared_workdir_keeps_files_between_calls(tmp_path):
    interp = code_interpreter(Sandbox(Limits(wall_seconds=20)), workdir=tmp_path / "ws")
    first = asyncio.run(interp('{"code": "open(\'x.txt\', \'w\').write(\'41\')"}'))
    assert not first.is_error and "x.txt" in first.content
    second = asyncio.run(interp({"code": "print(int(open('x.txt').read()) + 1)"}))
    assert second.content.startswith("42")
    assert os.path.exists(tmp_path / "ws" / "x.txt")


def test_cancelling_a_run_kills_the_child():
    box = Sandbox(Limits(wall_seconds=30))

    async def main():
        task = asyncio.create_task(box.run("import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(30)"))
        await asyncio.sleep(1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())  # returns promptly: the child was killed, not waited for


def test_bwrap_keeps_an_interpreter_that_lives_in_tmp_visible(monkeypatch):
    """bwrap mounts a fresh /tmp; a venv under /tmp (a CI clone there) must still be bound in."""
    from k25.agents import sandbox

    monkeypatch.setattr(sandbox.sys, "prefix", "/tmp/ci-clone/.venv")
    monkeypatch.setattr(sandbox.sys, "executable", "/tmp/ci-clone/.venv/bin/python")
    dirs = sandbox._interpreter_dirs_under("/tmp")
    assert "/tmp/ci-clone/.venv" in dirs and "/tmp/ci-clone/.venv/bin" in dirs
    assert not any(d.startswith("/usr") for d in dirs)
