"""Agent Swarm: parallel sub-agents, isolation, limits, back-off, timeouts, cancellation, resume."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from k25.agents import tool
from k25.agents.scripted import call, calls, rate_limited, say
from k25.agents.swarm import Scheduler, Swarm, SwarmConfig, critical_steps, timeline


def _results(messages, name):
    """(arguments, result) of every answered call to ``name``."""
    out = {m["tool_call_id"]: m["content"] for m in messages if m["role"] == "tool"}
    return [(json.loads(c["function"]["arguments"]), out[c["id"]])
            for m in messages for c in m.get("tool_calls") or []
            if c["function"]["name"] == name and c["id"] in out]


def swarm_policy(jobs: dict[str, int], batch: bool = False, agents: tuple[str, ...] = ("worker",)):
    """Orchestrator: create the agents, assign every job in one turn, join the answers.
    Sub-agent for job J: call work(J, k) for k < jobs[J], then answer 'done J'."""

    def policy(body):
        names = {t["function"]["name"] for t in body.get("tools") or []}
        msgs = body["messages"]
        if "assign_task" in names:
            created = [a["name"] for a, r in _results(msgs, "create_subagent")]
            missing = [a for a in agents if a not in created]
            if missing:
                return calls([("create_subagent", {"name": a, "system_prompt": f"You are {a}."}) for a in missing])
            if batch:
                done = _results(msgs, "assign_batch")
                if not done:
                    return call("assign_batch", {"agent": agents[0], "prompt_template": "job {{item}}",
                                                 "items": list(jobs)})
                return say(done[-1][1])
            done = _results(msgs, "assign_task")
            if not done:
                return calls([("assign_task", {"agent": agents[0], "prompt": f"job {j}"}) for j in jobs])
            return say(" | ".join(r for _, r in done), reasoning="join")
        job = msgs[-1]["content"].split()[-1] if msgs[1]["role"] != "user" else msgs[1]["content"].split()[-1]
        k = sum(1 for m in msgs if m["role"] == "tool")
        return call("work", {"job": job, "k": k}) if k < jobs[job] else say(f"done {job}")

    return policy


def work_tool(seconds: float = 0.0, record: list | None = None):
    lock = threading.Lock()
    state = {"active": 0, "peak": 0}

    @tool
    async def work(job: str, k: int) -> str:
        """Does one unit of work."""
        with lock:
            state["active"] += 1
            state["peak"] = max(state["peak"], state["active"])
        try:
            await asyncio.sleep(seconds)
            if record is not None:
                record.append((job, k))
        finally:
            with lock:
                state["active"] -= 1
        return f"{job}:{k}"

    return work, state


def test_parallel_tasks_overlap_and_critical_steps_are_counted(serve):
    jobs = {"a": 1, "b": 2, "c": 3, "d": 1}  # tool steps per sub-agent; each adds a final answer step
    work, state = work_tool(0.2)
    with serve(swarm_policy(jobs)) as srv:
        res = asyncio.run(Swarm(srv.chat_model(), [work], SwarmConfig(ramp_interval=0)).run("do abcd"))
    assert res.answer == "done a | done b | done c | done d"
    assert state["peak"] == 4 and res.peak_concurrency == 4  # all four sub-agents worked at once
    assert res.orchestrator_steps == 3  # create, assign x4, answer
    assert sorted(t["steps"] for t in res.tasks) == [2, 2, 3, 4]
    for t in res.tasks:  # each task keeps what it was asked and its sub-agent's conversation
        assert t["messages"][1] == {"role": "user", "content": t["prompt"]} and t["prompt"].startswith("job ")
        assert t["messages"][-1]["role"] == "assistant" and t["messages"][-1]["content"] == t["answer"]
    assert [m["role"] for m in res.messages][:2] == ["system", "user"] and res.messages[1]["content"] == "do abcd"
    assert res.messages[-1]["content"] == res.answer
    assert res.critical_steps == 3 + 4 == critical_steps(3, {2: [2, 3, 4, 2]})
    assert res.total_steps == 3 + 11
    assert res.subagents == 1 and res.tool_calls == 1 + 4 + 7
    assert res.usage.requests == 3 + 11 and res.cost > 0
    # isolation: a sub-agent sees its own system prompt and task, nothing of the orchestrator's context
    sub = [r for r in srv.requests if "assign_task" not in {t["function"]["name"] for t in r.get("tools") or []}]
    for r in sub:
        assert r["messages"][0]["content"].startswith("You are worker.")
        assert "It cannot see your context" in r["messages"][0]["content"]
        assert r["messages"][1]["content"].startswith("job ") and "do abcd" not in json.dumps(r["messages"])


def test_critical_steps_formula():
    assert critical_steps(4, {}) == 4
    assert critical_steps(3, {1: [5, 2], 2: [1]}) == 3 + 5 + 1


def test_batch_form_keeps_input_order(serve):
    jobs = {"x": 2, "y": 0, "z": 1}
    work, _ = work_tool()
    with serve(swarm_policy(jobs, batch=True)) as srv:
        res = asyncio.run(Swarm(srv.chat_model(), [work]).run("batch"))
    rows = json.loads(res.answer)
    assert [(r["item"], r["status"], r["result"]) for r in rows] == [
        ("x", "done", "done x"), ("y", "done", "done y"), ("z", "done", "done z")]
    assert res.critical_steps == 3 + 3 and res.total_steps == 3 + (3 + 1 + 2)


def test_subagent_and_tool_call_limits(serve):
    work, _ = work_tool()
    with serve(swarm_policy({"a": 1}, agents=("one", "two"))) as srv:
        # the second create_subagent is refused; the policy retries forever, so the repeat guard ends the run
        res = asyncio.run(Swarm(srv.chat_model(), [work], SwarmConfig(max_subagents=1)).run("t"))
    refused = [r for a, r in _results_from(srv, "create_subagent") if a["name"] == "two"]
    assert refused and refused[0] == ("Error: the limit of 1 sub-agents is reached; reuse existing ones: one")
    assert res.subagents == 1

    with serve(swarm_policy({"a": 3, "b": 3})) as srv:
        res = asyncio.run(Swarm(srv.chat_model(), [work], SwarmConfig(max_tool_calls=5)).run("t"))
    assert res.tool_calls == 5  # 1 create + 2 assign + 2 work; the rest were refused
    budget_errors = [e for e in _all_tool_messages(srv) if "tool-call budget of 5 calls" in e]
    assert budget_errors


def _results_from(srv, name):
    return _results(srv.requests[-1]["messages"], name) if srv.requests else []


def _all_tool_messages(srv):
    return [m["content"] for r in srv.requests for m in r["messages"] if m["role"] == "tool"]


def test_rate_limited_tasks_back_off_and_finish(serve):
    seen: set[str] = set()
    inner = swarm_policy({"a": 1, "b": 1, "c": 1})

    def policy(body):
        msgs = body["messages"]
        if "assign_task" not in {t["function"]["name"] for t in body.get("tools") or []}:
            job = msgs[1]["content"]
            if job not in seen:  # every sub-agent's first request is refused with a 429
                seen.add(job)
                return rate_limited(retry_after=0)
        return inner(body)

    events = []
    work, _ = work_tool()
    cfg = SwarmConfig(rate_limit_delay=0.01, capacity_shrink_interval=0)
    with serve(policy) as srv:
        swarm = Swarm(srv.chat_model(), [work], cfg, subagent_model=srv.chat_model(max_retries=0))
        res = asyncio.run(swarm.run("t", on_event=events.append))
    assert res.answer == "done a | done b | done c"
    assert sum(1 for e in events if e["type"] == "task_requeued") == 3
    assert all(t["status"] == "done" for t in res.tasks)


def test_scheduler_ramp_and_capacity():
    cfg = SwarmConfig(ramp_initial=2, ramp_interval=0.5, capacity_shrink_interval=0, capacity_recover_after=1e9)

    async def main():
        sched = Scheduler(cfg)
        starts = []

        async def job():
            await sched.acquire()
            starts.append(time.monotonic())
            await asyncio.sleep(0.01)
            await sched.release()

        t0 = time.monotonic()
        await asyncio.gather(*(job() for _ in range(4)))
        offsets = [s - t0 for s in starts]
        assert offsets[1] < 0.25  # the first two start at once (a wide margin for a loaded machine)
        assert offsets[2] - offsets[1] >= 0.49 and offsets[3] - offsets[2] >= 0.49  # then one per interval
        sched.running = 3
        sched.rate_limited()
        assert sched.capacity == 2
        sched.rate_limited()
        assert sched.capacity == 1
        sched.rate_limited()
        assert sched.capacity == 1  # never below one

    asyncio.run(main())


def test_a_task_timeout_fails_only_that_task(serve):
    # the fast task's model turns must fit in the timeout even on a loaded 2-core CI machine
    work, _ = work_tool(seconds=60)

    @tool
    def quick(job: str, k: int) -> str:
        """Quick work."""
        return "ok"

    jobs = {"slow": 1, "fast": 0}
    with serve(swarm_policy(jobs)) as srv:
        res = asyncio.run(Swarm(srv.chat_model(), [work], SwarmConfig(task_timeout=3.0)).run("t"))
    results = dict((a["prompt"], r) for a, r in _results_from(srv, "assign_task"))
    assert results["job fast"] == "done fast"
    assert results["job slow"].startswith("Error: sub-agent 'worker' did not finish (timeout)")
    assert res.stop_reason == "answer"


def test_a_subagent_cut_at_the_token_limit_is_reported_to_the_orchestrator(serve):
    base = swarm_policy({"ok": 0, "cut": 0})

    def policy(body):
        msgs = body["messages"]
        if msgs[1]["role"] == "user" and msgs[1]["content"] == "job cut":  # this sub-agent runs on and is cut
            return say("", reasoning="again and again and again", finish_reason="length")
        return base(body)

    with serve(policy) as srv:
        res = asyncio.run(Swarm(srv.chat_model(), [], SwarmConfig(ramp_interval=0)).run("t"))
    results = dict((a["prompt"], r) for a, r in _results_from(srv, "assign_task"))
    assert results["job ok"] == "done ok"
    assert results["job cut"] == ("Error: sub-agent 'worker' did not finish (length): its last reply was cut at "
                                  "the token limit before it gave an answer")
    assert sorted(t["status"] for t in res.tasks) == ["done", "length"]


def test_cancelling_a_swarm_stops_every_task(serve):
    cancelled = []

    @tool
    async def work(job: str, k: int) -> str:
        """Long work."""
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(job)
            raise
        return "never"

    with serve(swarm_policy({"a": 1, "b": 1, "c": 1})) as srv:
        async def main():
            run = asyncio.create_task(Swarm(srv.chat_model(), [work]).run("t"))
            for _ in range(500):
                if len([r for r in srv.requests if r["messages"][1]["content"].startswith("job")]) >= 3:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run
            await asyncio.sleep(0)
            return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

        leftover = asyncio.run(main())
    assert sorted(cancelled) == ["a", "b", "c"] and not leftover


def test_a_killed_swarm_resumes_without_redoing_finished_work(serve, tmp_path):
    jobs = {"a": 1, "b": 3, "c": 2}
    record: list = []
    work, _ = work_tool(0.05, record)
    run_dir = tmp_path / "swarm"
    with serve(swarm_policy(jobs)) as srv:
        model = srv.chat_model()

        async def killed():
            me = asyncio.current_task()
            ends = []

            def on_event(e):
                if e["type"] == "task_end":
                    ends.append(e)
                    if len(ends) == 2:
                        me.cancel()

            with pytest.raises(asyncio.CancelledError):
                await Swarm(model, [work]).run("t", run_dir=run_dir, on_event=on_event)

        asyncio.run(killed())
        first = list(record)
        assert len(first) < 6
        with pytest.raises(FileExistsError):
            asyncio.run(Swarm(model, [work]).run("t", run_dir=run_dir))
        res = asyncio.run(Swarm(model, [work]).run("t", run_dir=run_dir, resume=True))
    assert res.answer == "done a | done b | done c"
    assert sorted(record) == sorted(set(record))  # no unit of work ran twice
    assert sorted(record) == [("a", 0), ("b", 0), ("b", 1), ("b", 2), ("c", 0), ("c", 1)]
    assert res.critical_steps == 3 + 4 and res.total_steps == 3 + 2 + 4 + 3
    assert (run_dir / "orchestrator.jsonl").exists() and len(list((run_dir / "tasks").glob("*.jsonl"))) == 3
    bars = timeline(run_dir)
    assert [b["status"] for b in bars] == ["done"] * 3 and {b["stage"] for b in bars} == {2}
    assert all(0 <= b["start"] <= b["end"] for b in bars) and sorted(b["steps"] for b in bars) == [2, 3, 4]
