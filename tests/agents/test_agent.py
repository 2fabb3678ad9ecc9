"""The agent loop against a scripted OpenAI-compatible server, through the real openai client."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import pytest

from k25.agents import Agent, AgentConfig, ModelError, Pricing, TraceError, read_events, tool
from k25.agents.scripted import call, calls, rate_limited, say, server_error
from k25.chat.template import missing_reasoning, render


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def test_tool_round_trip_carries_reasoning_back(serve):
    script = [calls([("add", {"a": 1, "b": 2}), ("add", '{"a": oops')], reasoning="I need to add."),
              say("It is 3.", reasoning="Done.")]
    with serve(script) as srv:
        res = asyncio.run(Agent(srv.chat_model(), [add], "Be brief.").run("What is 1+2?"))
    assert res.answer == "It is 3." and res.stop_reason == "answer" and res.steps == 2 and res.tool_calls == 2
    second = srv.requests[1]["messages"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "tool", "tool"]
    assert second[2]["reasoning_content"] == "I need to add."  # sent back, as the K2.5 template needs
    assert second[2]["tool_calls"][0]["id"] == "functions.add:0" and second[3]["content"] == "3"
    assert second[4]["tool_call_id"] == "functions.add:1" and "not valid JSON" in second[4]["content"]
    assert [t["function"]["name"] for t in srv.requests[0]["tools"]] == ["add"]
    assert missing_reasoning(second) == []
    assert "<think>I need to add.</think><|tool_calls_section_begin|>" in render(second)


def test_missing_and_repeated_tool_call_ids_are_made_unique():
    from k25.agents.model import assistant_message

    history = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": "{}"}}]}]
    raw = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": "{}"}},
        {"type": "function", "function": {"name": "add", "arguments": "{}"}},
        {"id": "call_9", "type": "function", "function": {"name": "add", "arguments": "{}"}}]}
    msg = assistant_message(raw, history)
    assert [c["id"] for c in msg["tool_calls"]] == ["functions.add:1", "functions.add:2", "call_9"]
    assert msg["reasoning_content"] == ""  # preserved-thinking servers want the field on tool-call turns


def test_retries_on_429_and_5xx_then_fails_clearly(serve):
    script = [rate_limited(retry_after=0), server_error(503), say("ok")]
    with serve(script) as srv:
        res = asyncio.run(Agent(srv.chat_model()).run("hi"))
        assert res.answer == "ok" and len(srv.requests) == 3
    with serve([rate_limited()] * 3) as srv, pytest.raises(ModelError, match=r"rate-limited \(429\) after 3 attempts"):
        asyncio.run(Agent(srv.chat_model(max_retries=2)).run("hi"))


def test_client_errors_are_not_retried(serve):
    from k25.agents.scripted import Reply

    with serve([Reply(status=400, error="thinking is enabled but reasoning_content is missing")]) as srv:
        with pytest.raises(ModelError, match="answered 400: .*reasoning_content is missing"):
            asyncio.run(Agent(srv.chat_model()).run("hi"))
        assert len(srv.requests) == 1


def test_transport_errors_are_retried_then_reported():
    from k25.agents import ChatModel

    model = ChatModel(base_url="http://127.0.0.1:9/v1", api_key="x", max_retries=1, backoff_base=0.01)
    with pytest.raises(ModelError, match="APIConnectionError after 2 attempts"):
        asyncio.run(Agent(model).run("hi"))


def test_concurrent_tool_calls_overlap(serve):
    lock = threading.Lock()
    state = {"active": 0, "peak": 0}

    @tool
    async def wait(seconds: float, tag: str) -> str:
        """Waits."""
        with lock:
            state["active"] += 1
            state["peak"] = max(state["peak"], state["active"])
        await asyncio.sleep(seconds)
        with lock:
            state["active"] -= 1
        return tag

    script = [calls([("wait", {"seconds": 0.3, "tag": t}) for t in "abc"]), say("done")]
    with serve(script) as srv:
        res = asyncio.run(Agent(srv.chat_model(), [wait]).run("go"))
    assert state["peak"] == 3
    assert [m["content"] for m in res.messages if m["role"] == "tool"] == ["a", "b", "c"]  # in call order


def test_repeated_identical_calls_are_capped(serve):
    executed = []

    @tool
    def look(q: str) -> str:
        """Looks."""
        executed.append(q)
        return "nothing"

    with serve(lambda body: call("look", {"q": "same"})) as srv:
        res = asyncio.run(Agent(srv.chat_model(), [look], config=AgentConfig(repeat_limit=2, repeat_stop=2)).run("x"))
    assert res.stop_reason == "repeated_calls" and executed == ["same", "same"]
    assert res.steps == 4 and res.tool_calls == 2
    refusals = [m["content"] for m in res.messages if m["role"] == "tool"][2:]
    assert len(refusals) == 2 and all("has been made" in r and "refused" in r for r in refusals)


def test_failing_calls_may_be_retried_but_not_forever(serve):
    attempts = []

    @tool
    def flaky(q: str) -> str:
        """Fails four times, then works."""
        attempts.append(q)
        if len(attempts) <= 4:
            raise ConnectionError("try again")
        return "finally"

    def retry_until_ok(body):
        last = body["messages"][-1]
        return say(last["content"]) if last.get("content") == "finally" else call("flaky", {"q": "x"})

    with serve(retry_until_ok) as srv:
        res = asyncio.run(Agent(srv.chat_model(), [flaky], config=AgentConfig(repeat_limit=2)).run("x"))
    assert res.answer == "finally" and len(attempts) == 5  # errors do not use up the repeat allowance

    with serve(lambda body: call("flaky", {"q": "y"})) as srv:
        cfg = AgentConfig(repeat_limit=1, error_retries=2, repeat_stop=1)
        attempts.clear()
        res = asyncio.run(Agent(srv.chat_model(), [flaky], config=cfg).run("x"))
    assert res.stop_reason == "repeated_calls" and len(attempts) == 3


def test_step_budget_stops_the_run(serve):
    n = iter(range(1000))
    with serve(lambda body: call("add", {"a": next(n), "b": 1}, content="working")) as srv:
        res = asyncio.run(Agent(srv.chat_model(), [add], config=AgentConfig(max_steps=5)).run("count"))
    assert res.stop_reason == "max_steps" and res.steps == 5 and len(srv.requests) == 5
    assert res.answer == "working"


@pytest.mark.parametrize("stream", [False, True])
def test_a_final_reply_cut_at_the_token_limit_is_not_an_answer(serve, stream):
    with serve([say("The answer is 12", reasoning="I add them up", finish_reason="length")]) as srv:
        res = asyncio.run(Agent(srv.chat_model(stream=stream), [add]).run("What is 5+7?"))
    assert res.stop_reason == "length" and res.answer == "The answer is 12" and res.steps == 1


def test_usage_and_cost(serve):
    from k25.agents.scripted import Reply

    script = [Reply(tool_calls=[("add", {"a": 1, "b": 1})], usage={"prompt_tokens": 1_000_000, "completion_tokens": 0}),
              Reply(content="2", usage={"prompt_tokens": 0, "completion_tokens": 1_000_000})]
    with serve(script) as srv:
        res = asyncio.run(Agent(srv.chat_model(), [add]).run("1+1"))
        assert res.usage.prompt_tokens == 1_000_000 and res.usage.completion_tokens == 1_000_000
        assert res.cost == pytest.approx(0.60 + 3.00)
    with serve(list(script)) as srv:
        cfg = AgentConfig(pricing=Pricing(input_per_m=1.0, output_per_m=2.0))
        assert asyncio.run(Agent(srv.chat_model(), [add], config=cfg).run("1+1")).cost == pytest.approx(3.0)


def test_context_compaction_summarises_the_middle(serve):
    big = "x" * 4000

    @tool
    def fetch(page: int) -> str:
        """Fetches a page."""
        return f"page {page}: {big}"

    def pages(text):
        return [int(n) for n in re.findall(r"page (\d+)", text)]

    def policy(body):
        text = " ".join(str(m.get("content")) for m in body["messages"])
        if not body.get("tools"):  # the compaction request: keep the fact that matters
            return say(f"SUMMARY: fetched up to page {max(pages(text))}")
        nxt = max(pages(text), default=-1) + 1
        return call("fetch", {"page": nxt}) if nxt < 6 else say("finished")

    cfg = AgentConfig(max_context_tokens=3000, reserved_context_tokens=0, keep_last_messages=2)
    with serve(policy) as srv:
        res = asyncio.run(Agent(srv.chat_model(), [fetch], "sys", cfg).run("fetch six pages", trace=None))
    assert res.answer == "finished"
    summary_requests = [r for r in srv.requests if not r.get("tools")]
    assert summary_requests and "page 0:" in summary_requests[0]["messages"][1]["content"]
    assert res.messages[0]["content"] == "sys" and res.messages[1]["content"] == "fetch six pages"
    assert "SUMMARY: fetched up to page" in res.messages[2]["content"]
    assert sum(1 for m in res.messages if m["role"] == "tool") < 6  # the early results were folded away


def test_a_small_context_window_is_not_full_before_the_first_step(serve):
    """The default 16k reply reserve is capped at a quarter of a 4k window (k25-mini's), so no compaction."""

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    def policy(body):
        done = [m for m in body["messages"] if m["role"] == "tool"]
        return say(f"sum {done[-1]['content']}") if done else call("add", {"a": 2, "b": 3})

    with serve(policy) as srv:
        res = asyncio.run(Agent(srv.chat_model(), [add], "sys", AgentConfig(max_context_tokens=4096)).run(
            "add 2 and 3", trace=None))
    assert res.answer == "sum 5"
    assert all(r.get("tools") for r in srv.requests)  # no compaction request was made


def _counting_policy(body):
    """Deterministic: calls add(k, 1) for k = 0..4 (two calls in step 3), then answers the last sum."""
    tools_done = [m for m in body["messages"] if m["role"] == "tool"]
    k = len(tools_done)
    if k == 2:
        return calls([("add", {"a": 2, "b": 1}), ("add", {"a": 3, "b": 1})], reasoning=f"two at once at {k}")
    if k < 5:
        return call("add", {"a": k, "b": 1}, reasoning=f"step {k}")
    return say(f"last result {tools_done[-1]['content']}", reasoning="done")


def test_trace_records_everything_and_resumes_from_any_cut(serve, tmp_path):
    executed: list[int] = []

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        executed.append(a)
        return a + b

    trace = tmp_path / "run.jsonl"
    with serve(_counting_policy) as srv:
        model = srv.chat_model()
        ref = asyncio.run(Agent(model, [add], "sys").run("count", trace=trace))
        assert ref.answer == "last result 5" and executed == [0, 1, 2, 3, 4]
        events = read_events(trace)
        kinds = [e["type"] for e in events]
        assert kinds[:3] == ["run", "message", "message"] and kinds[-1] == "final"
        assert kinds.count("request") == kinds.count("response") == 5
        assert kinds.count("tool_call") == kinds.count("tool_result") == 5
        assert all("usage" in e for e in events if e["type"] == "response")
        with pytest.raises(TraceError, match="already holds a run"):
            asyncio.run(Agent(model, [add], "sys").run("count", trace=trace))

        lines = trace.read_text().splitlines(keepends=True)
        for cut in range(3, len(lines)):
            part = tmp_path / f"cut{cut}.jsonl"
            part.write_text("".join(lines[:cut]) + lines[cut][: len(lines[cut]) // 2])  # a torn last line
            done_before = {e["arguments"] for e in map(json.loads, lines[:cut]) if e["type"] == "tool_result"
                           for e in [next(x for x in map(json.loads, lines[:cut])
                                          if x["type"] == "tool_call" and x["id"] == e["id"])]}
            executed.clear()
            res = asyncio.run(Agent(model, [add], "sys").run("count", trace=part, resume=True))
            assert res.answer == ref.answer and res.messages == ref.messages, cut
            assert res.steps == ref.steps and res.tool_calls == ref.tool_calls
            assert res.usage.prompt_tokens == ref.usage.prompt_tokens
            redone = {json.dumps({"a": a, "b": 1}) for a in executed}
            assert not (redone & done_before), f"cut {cut}: finished calls ran again"
            assert len(redone) + len(done_before) == 5, cut
            assert read_events(part)[-1]["type"] == "final"
    with pytest.raises(TraceError, match="another task"):
        asyncio.run(Agent(model, [add], "sys").run("something else", trace=trace, resume=True))


def test_a_cancelled_run_resumes_without_redoing_finished_calls(serve, tmp_path):
    executed: list[int] = []

    @tool
    async def add(a: int, b: int) -> int:
        """Add two integers (slowly)."""
        await asyncio.sleep(0.05)
        executed.append(a)
        return a + b

    trace = tmp_path / "killed.jsonl"
    with serve(_counting_policy) as srv:
        model = srv.chat_model()

        async def killed_after_two_results():
            task = asyncio.current_task()
            seen = []

            def on_event(e):
                if e["type"] == "tool_result":
                    seen.append(e)
                    if len(seen) == 3:
                        task.cancel()

            with pytest.raises(asyncio.CancelledError):
                await Agent(model, [add], "sys").run("count", trace=trace, on_event=on_event)

        asyncio.run(killed_after_two_results())
        assert len(executed) == 3
        before = list(executed)
        res = asyncio.run(Agent(model, [add], "sys").run("count", trace=trace, resume=True))
    assert res.answer == "last result 5" and res.resumed
    assert sorted(executed) == [0, 1, 2, 3, 4] and executed[:3] == before
