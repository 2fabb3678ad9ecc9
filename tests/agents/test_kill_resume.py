"""A `k25 agent` process killed with SIGKILL mid-run resumes from its trace with nothing lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from k25.agents import read_events
from k25.agents.scripted import call, say

STEPS = 6


def _policy(body):
    """Step k runs code that appends k to log.txt in the workspace; after STEPS runs, answer."""
    done = [m for m in body["messages"] if m["role"] == "tool"]
    k = len(done)
    if k < STEPS:
        code = f"import time\ntime.sleep(0.3)\nopen('log.txt', 'a').write('{k}\\n')\nprint('ran {k}')"
        return call("code_interpreter", {"code": code}, reasoning=f"run {k}")
    return say("all runs done: " + ",".join(m["content"].split()[1] for m in done))


def test_sigkilled_cli_run_resumes(serve, tmp_path):
    trace, ws = tmp_path / "run.jsonl", tmp_path / "ws"
    with serve(_policy) as srv:
        cmd = [sys.executable, "-m", "k25.agents.cli", "agent", "count to six", "--base-url", srv.base_url,
               "--workspace", str(ws), "--trace", str(trace), "--quiet", "--json"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if trace.exists() and sum(e["type"] == "tool_result" for e in read_events(trace)) >= 2:
                    break
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        before = read_events(trace)
        finished = {e["content"].split()[1] for e in before if e["type"] == "tool_result"}
        assert 2 <= len(finished) < STEPS and before[-1]["type"] != "final"

        out = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["answer"] == "all runs done: " + ",".join(str(k) for k in range(STEPS))
    runs = (ws / "log.txt").read_text().split()
    assert sorted(set(runs)) == [str(k) for k in range(STEPS)]
    assert all(runs.count(k) == 1 for k in finished)  # finished work was not redone
    events = read_events(trace)
    assert [e["type"] for e in events].count("resume") == 1 and events[-1]["type"] == "final"
