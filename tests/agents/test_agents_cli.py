"""``k25 agent``, ``k25 swarm`` and ``k25 agent-bench`` run in-process through ``k25.cli.main``."""

from __future__ import annotations

import json

from k25.agents.scripted import call, say
from k25.cli import main


def test_agent_command_uses_the_endpoint_and_writes_a_trace(serve, tmp_path, capsys):
    script = [call("code_interpreter", {"code": "print(6 * 7)"}, reasoning="compute"), say("42")]
    trace = tmp_path / "t.jsonl"
    with serve(script) as srv:
        rc = main(["agent", "what is 6*7?", "--base-url", srv.base_url, "--model", "m", "--api-key", "k",
                   "--trace", str(trace), "--json", "--thinking", "off", "--stream"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    data = json.loads(out.out)
    assert data["answer"] == "42" and data["steps"] == 2 and data["tool_calls"] == 1
    assert "step 1: calls code_interpreter" in out.err
    tool_msg = srv.requests[1]["messages"][-1]
    assert tool_msg["role"] == "tool" and tool_msg["content"].startswith("42")
    body = srv.requests[0]
    assert body["model"] == "m" and body["thinking"] == {"type": "disabled"}
    assert body["chat_template_kwargs"] == {"thinking": False} and body["stream"] is True
    assert trace.exists()


def test_endpoint_from_the_environment(serve, monkeypatch, capsys):
    with serve([say("hello")]) as srv:
        monkeypatch.setenv("K25_BASE_URL", srv.base_url)
        monkeypatch.setenv("K25_MODEL", "env-model")
        assert main(["agent", "hi", "--no-code", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("hello")
    assert srv.requests[0]["model"] == "env-model"
    assert "temperature" not in srv.requests[0]  # the server's default unless asked


def test_sampling_options_reach_every_request(serve, capsys):
    script = [call("calculator", {"expression": "6 * 7"}), say("42")]
    with serve(script) as srv:
        assert main(["agent", "what is 6*7?", "--base-url", srv.base_url, "--no-code", "--quiet",
                     "--temperature", "0", "--top-p", "0.5"]) == 0
    assert capsys.readouterr().out.startswith("42")
    assert [(b["temperature"], b["top_p"]) for b in srv.requests] == [(0.0, 0.5)] * 2


def test_missing_endpoint_and_missing_k25_mini_is_a_clear_error(monkeypatch, tmp_path, capsys):
    """Without an endpoint the CLI serves k25-mini itself (tests/test_default_model.py); without its weights
    either, it says both what is missing and how to name an endpoint."""
    import k25.weights

    for var in ("K25_BASE_URL", "OPENAI_BASE_URL", "K25_MODEL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(k25.weights, "DEFAULT_MODEL_DIR", tmp_path / "k25-mini")
    assert main(["agent", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no endpoint given (--base-url, $K25_BASE_URL or $OPENAI_BASE_URL)" in err
    assert "k25-mini is not installed" in err


def test_swarm_command(serve, tmp_path, capsys):
    def policy(body):
        names = {t["function"]["name"] for t in body.get("tools") or []}
        msgs = body["messages"]
        if "assign_task" in names:
            n = sum(1 for m in msgs if m["role"] == "tool")
            if n == 0:
                return call("create_subagent", {"name": "w", "system_prompt": "You work."})
            if n == 1:
                return call("assign_task", {"agent": "w", "prompt": "say hi"})
            return say("orchestrator: " + msgs[-1]["content"])
        return say("hi from w")

    with serve(policy) as srv:
        rc = main(["swarm", "greet", "--base-url", srv.base_url, "--run-dir", str(tmp_path / "run"), "--json",
                   "--no-code"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    data = json.loads(out.out)
    assert data["answer"] == "orchestrator: hi from w"
    assert data["critical_steps"] == 3 + 1 and data["subagents"] == 1 and data["tasks"] == 1
    assert "sub-agent w#1 starts: say hi" in out.err and "[w#1] step 1: answers" in out.err


def test_agent_bench_command(capsys):
    assert main(["agent-bench", "--tasks", "1", "--per-sector", "3", "--latency", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["modes"]["agent"]["item_f1"] == 1.0 and data["modes"]["swarm"]["item_f1"] == 1.0
    assert data["model"] == "scripted-k25"
