"""Streaming replies: tools start as soon as their call has streamed in; traces still resume."""

from __future__ import annotations

import asyncio
import json
import time

from k25.agents import Agent, read_events, tool
from k25.agents.scripted import calls, rate_limited, say


def test_tools_start_before_the_reply_has_finished_streaming(serve):
    started: dict[str, float] = {}

    @tool
    async def fetch(url: str) -> str:
        """Fetches a page."""
        started[url] = time.monotonic()
        await asyncio.sleep(0.05)
        return f"page {url}"

    script = [calls([("fetch", {"url": "a"}), ("fetch", {"url": "b"})], reasoning="both", stream_gap=0.5),
              say("done", reasoning="ok")]
    with serve(script) as srv:
        res = asyncio.run(Agent(srv.chat_model(stream=True), [fetch]).run("get a and b"))
    assert res.answer == "done" and res.tool_calls == 2
    second_sent = dict(srv.sent)["call 1"]
    assert started["a"] < second_sent  # the first tool ran while the second call was still to come
    assert srv.requests[0]["stream"] is True
    msgs = srv.requests[1]["messages"]
    assert msgs[1]["reasoning_content"] == "both"
    assert [c["id"] for c in msgs[1]["tool_calls"]] == ["functions.fetch:0", "functions.fetch:1"]
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == '{"url": "a"}'  # reassembled from pieces
    assert [m["content"] for m in msgs[2:]] == ["page a", "page b"]
    assert res.usage.requests == 2 and res.usage.prompt_tokens > 0  # from the final usage chunk


def test_streamed_run_retries_and_resumes(serve, tmp_path):
    executed = []

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        executed.append(a)
        return a + b

    answers = iter([rate_limited(retry_after=0)])  # the first request gets a 429 before any chunk

    def policy(body):
        first = next(answers, None)
        if first is not None:
            return first
        done = [m for m in body["messages"] if m["role"] == "tool"]
        if len(done) < 4:
            return calls([("add", {"a": len(done), "b": 1}), ("add", {"a": len(done) + 1, "b": 1})])
        return say("sum " + ",".join(m["content"] for m in done))

    trace = tmp_path / "s.jsonl"
    with serve(policy) as srv:
        model = srv.chat_model(stream=True)
        ref = asyncio.run(Agent(model, [add]).run("add", trace=trace))
        assert ref.answer == "sum 1,2,3,4" and executed == [0, 1, 2, 3] and len(srv.requests) == 4
        kinds = [e["type"] for e in read_events(trace)]
        assert kinds.index("tool_call") < kinds.index("response")  # started while streaming
        lines = trace.read_text().splitlines(keepends=True)
        for cut in range(3, len(lines)):
            part = tmp_path / f"c{cut}.jsonl"
            part.write_text("".join(lines[:cut]))
            events = read_events(part)
            calls_by_id = {(e["step"], e["id"]): e for e in events if e["type"] == "tool_call"}
            finished = {json.loads(calls_by_id[(e["step"], e["id"])]["arguments"])["a"]
                        for e in events if e["type"] == "tool_result"}
            executed.clear()
            res = asyncio.run(Agent(model, [add]).run("add", trace=part, resume=True))
            assert res.answer == ref.answer and res.messages == ref.messages, cut
            assert not (set(executed) & finished), f"cut {cut}: finished calls ran again"
            assert sorted(set(executed) | finished) == [0, 1, 2, 3], cut
