"""Swarm runs started through the server (the playground's Swarm mode) against its own API."""

from __future__ import annotations

import json
import time

import httpx2 as httpx
import pytest

from k25.server.app import create_app
from k25.testing import ScriptedBackend, ServerThread, byte_tokenizer


def call(idx: int, name: str, args: dict) -> str:
    return (f"<|tool_call_begin|>functions.{name}:{idx}<|tool_call_argument_begin|>"
            f"{json.dumps(args)}<|tool_call_end|>")


def section(*calls: str) -> str:
    return "<|tool_calls_section_begin|>" + "".join(calls) + "<|tool_calls_section_end|><|im_end|>"


SCRIPT = [
    "Plan: one counter.</think>" + section(call(0, "create_subagent", {"name": "counter",
                                                                       "system_prompt": "You count letters."})),
    "Two parts in parallel.</think>" + section(call(1, "assign_task", {"agent": "counter", "prompt": "Count a in aa"}),
                                              call(2, "assign_task", {"agent": "counter", "prompt": "Count b in b"})),
    "Easy.</think>Counted.<|im_end|>",
    "Easy.</think>Counted.<|im_end|>",
    "Both done.</think>There are 2 a and 1 b.<|im_end|>",
]


@pytest.fixture
def served(tmp_path):
    backend = ScriptedBackend(byte_tokenizer(tmp_path))
    with ServerThread(create_app(backend)) as srv:
        yield srv, backend


def wait_done(url: str, run_id: str) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        view = httpx.get(f"{url}/k25/swarm/{run_id}").json()
        if view["status"] != "running":
            return view
        time.sleep(0.1)
    raise AssertionError("the swarm run did not finish")


def test_swarm_run_reports_a_timeline_of_subagents(served):
    srv, backend = served
    backend.outputs = list(SCRIPT)
    r = httpx.post(srv.url + "/k25/swarm", json={"task": "Count the letters.", "max_subagents": 4})
    assert r.status_code == 202
    view = wait_done(srv.url, r.json()["id"])
    assert view["status"] == "done", view
    assert view["answer"] == "There are 2 a and 1 b."
    bars = view["timeline"]
    assert [b["agent"] for b in bars] == ["counter", "counter"] and all(b["status"] == "done" for b in bars)
    assert all(b["end"] >= b["start"] >= 0 for b in bars)
    assert view["summary"]["subagents"] == 1 and view["summary"]["critical_steps"] >= 3
    # the orchestrator's prompt declared the swarm tools, in K2.5's format
    assert "type create_subagent = " in backend.prompts[0] and "type assign_task = " in backend.prompts[0]


def test_swarm_errors(served):
    srv, backend = served
    assert httpx.post(srv.url + "/k25/swarm", json={"task": ""}).status_code == 400
    assert httpx.post(srv.url + "/k25/swarm", json={"task": "x", "max_subagents": 0}).status_code == 400
    assert httpx.get(srv.url + "/k25/swarm/nope").status_code == 404
    backend.full = True  # every model call answers 429: the run fails cleanly, the server stays up
    r = httpx.post(srv.url + "/k25/swarm", json={"task": "Count."})
    view = wait_done(srv.url, r.json()["id"])
    assert view["status"] == "failed" and view["error"]
    assert httpx.get(srv.url + "/health").status_code == 200
