"""The task families: each sampler draws one task and returns its records (with a split key).

A sampler may emit several families at once when they share a task: the arithmetic sampler gives
the same problem in Thinking and Instant mode, the swarm sampler gives the orchestrator's trace
and each sub-agent's own conversation. Every number, tool result and final answer is computed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..agents.swarm import ORCHESTRATOR_PROMPT, SUBAGENT_SUFFIX, batch_result
from .arithmetic import Problem, sample_problem
from .conversation import Chat, record
from .corpus import ATTRIBUTES, Corpus, Town
from .tools import (
    ORCHESTRATOR_TOOLS,
    PYTHON_TOOL,
    SWARM_WORKER_TOOLS,
    calculate,
    create_subagent_results,
    is_error,
    run_python,
    tool_schemas,
)

# Probabilities (fixed: they are part of what a seed means).
INSTANT_FRACTION = 0.25  # tool-use records written in Instant mode
RECOVERY_FRACTION = 0.25  # tool-use records whose first call fails and is then corrected
TRANSIENT_FAILURE = 0.1  # per call, in agent traces: a tool error that a plain retry fixes
CURRENT_YEAR = 2026
# The tool lists `k25 agent` declares (k25.agents.default_tools): plain, and with --docs DIR; the agent family's
# list is the second without open_document.
AGENT_PLAIN_TOOLS = ("calculator", PYTHON_TOOL)
AGENT_TOOLS = (*AGENT_PLAIN_TOOLS, "search")
AGENT_DOCS_TOOLS = (*AGENT_TOOLS, "open_document")

# Injected outages, worded as the runtime reports a tool timing out (k25.agents.tools.Tool.__call__).
TRANSIENT_ERRORS = {
    "calculator": "Error: tool `calculator` timed out after 30 s",
    PYTHON_TOOL: f"Error: tool `{PYTHON_TOOL}` timed out after 60 s",
    "search": "Error: tool `search` timed out after 30 s",
}


HELDOUT_FRACTION = 0.1  # share of tasks (and of towns) held out
MAX_TOWNS_PER_TASK = 6


@dataclass
class World:
    """What samplers share: the corpus, its towns split into a train pool and a held-out pool.

    A held-out town appears only in held-out records, so no fact a held-out question asks about
    (directly, in an agent task or inside a swarm) is ever seen in training.
    """

    corpus: Corpus
    pools: dict[str, list[Town]] = field(init=False)
    town_names: frozenset[str] = field(init=False)  # every town's name, both pools

    def __post_init__(self) -> None:
        towns = self.corpus.towns
        if len(towns) < 3 * MAX_TOWNS_PER_TASK:
            raise ValueError(f"the corpus needs at least {3 * MAX_TOWNS_PER_TASK} towns, got {len(towns)}")
        ranked = sorted(towns, key=lambda t: hashlib.sha256(f"town:{t.name}".encode()).digest())
        held = {t.name for t in ranked[: max(MAX_TOWNS_PER_TASK, math.ceil(len(towns) * HELDOUT_FRACTION))]}
        self.pools = {
            "train": [t for t in towns if t.name not in held],
            "heldout": [t for t in towns if t.name in held],
        }
        self.town_names = frozenset(t.name for t in towns)

    def draw_towns(self, rng: random.Random, n: int) -> tuple[str, list[Town]]:
        """A split (held-out with probability HELDOUT_FRACTION) and ``n`` distinct towns of its pool."""
        split = "heldout" if rng.random() < HELDOUT_FRACTION else "train"
        return split, rng.sample(self.pools[split], n)


@dataclass
class Sample:
    """One task: its split key, the records it produced by family, and a dedup id.

    ``key`` decides the split (every task sharing it lands in the same split); ``uid`` (default:
    the key) tells duplicates apart, so e.g. two passages of one chapter can both be used.
    """

    key: str
    records: dict[str, list[dict[str, Any]]]
    uid: str = ""
    split: str | None = None  # set when the task's towns decide it; else the key's hash does
    images: dict[str, bytes] = field(default_factory=dict)  # path under the data dir -> PNG bytes

    def __post_init__(self) -> None:
        self.uid = self.uid or self.key


class Tools:
    """Executors for the declared tools, with optional injected failures."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.fail_next: str | None = None

    def __call__(self, name: str, args: dict[str, Any]) -> str:
        if self.fail_next is not None:
            message, self.fail_next = self.fail_next, None
            return message
        if name == "calculator":
            return calculate(args["expression"])
        if name == PYTHON_TOOL:
            return run_python(args["code"])
        if name == "search":
            return self.world.corpus.search_tool(args["query"], args["k"])
        raise KeyError(f"no executor for tool {name!r}")


def _fact_sentence(town: Town, attribute: str) -> str:
    """The sentence of the document that states the fact (what the reasoning quotes)."""
    value = town.fact(attribute)
    for sentence in re.split(r"(?<=\.) ", town.text()):
        if value in sentence:
            return sentence
    raise AssertionError(f"{town.name}: no sentence states {attribute}")


_FINAL_FACT = {
    "founded": "{town} was founded in {value}.",
    "population": "The population of {town} is {value}.",
    "mayor": "The mayor of {town} is {value}.",
    "product": "{town} is known for its {value}.",
    "river": "The {value} River flows through {town}.",
}


# ---------------------------------------------------------------------------------------------
# Arithmetic and word problems, Thinking and Instant.


def sample_arithmetic(rng: random.Random, world: World) -> Sample:
    """One problem, as a thinking record (steps in reasoning_content) and an instant record."""
    p = sample_problem(rng)
    out = {}
    for family, thinking in (("arith_think", True), ("arith_instant", False)):
        chat = Chat(None, thinking)
        chat.user(p.question)
        chat.answer(p.reasoning(), p.final)
        out[family] = [record(family, chat, p.answer, "number", p.key, kind=p.kind)]
    return Sample(p.key, out)


# ---------------------------------------------------------------------------------------------
# Calculator.

_THOUSANDS = re.compile(r"\d{4,}")


def _bad_expression(rng: random.Random, p: Problem) -> tuple[str, str, str] | None:
    """A plausible wrong first expression, the lesson the error teaches, and its failure kind."""
    options = []
    if _THOUSANDS.search(p.expression):
        bad = _THOUSANDS.sub(lambda m: f"{int(m.group()):,}", p.expression)
        options.append((bad, "The calculator does not accept thousands separators; write the numbers plainly.", "sep"))
    if "*" in p.expression:
        bad = p.expression.replace("*", rng.choice(("x", "×")), 1)
        options.append((bad, "The calculator needs * for multiplication.", "times"))
    return rng.choice(options) if options else None


def sample_calculator(rng: random.Random, world: World, family: str = "tool_calc") -> Sample:
    """A large-number problem solved with one calculator call, sometimes after a failed call.

    ``tool_calc_agent`` is the same task under the tool list plain ``k25 agent`` declares (the calculator
    and the interpreter): with the interpreter on offer too, a sum is still the calculator's job.
    """
    p = sample_problem(rng, big=True)
    declared = AGENT_PLAIN_TOOLS if family == "tool_calc_agent" else ("calculator",)
    chat = Chat(tool_schemas(*declared), rng.random() >= INSTANT_FRACTION)
    tools = Tools(world)
    chat.user(p.question)
    plan = f"This needs {p.expression}. The numbers are large, so I will use the calculator."
    failure = None
    if rng.random() < RECOVERY_FRACTION:
        bad = _bad_expression(rng, p)
        if bad is not None and rng.random() < 0.7:
            expr, lesson, failure = bad
            result = chat.call(plan, [("calculator", {"expression": expr})], tools, failed=True)[0]
            if not is_error(result):
                raise AssertionError(f"{expr!r} was meant to fail but gave {result}")
            plan = f"{lesson} Retrying with {p.expression}."
        else:
            failure = "transient"
            tools.fail_next = TRANSIENT_ERRORS["calculator"]
            chat.call(plan, [("calculator", {"expression": p.expression})], tools, failed=True)
            plan = "The calculator timed out. I will run the same expression again."
    result = chat.call(plan, [("calculator", {"expression": p.expression})], tools)[0]
    if result != p.answer:
        raise AssertionError(f"calculator gave {result} for {p.expression}, expected {p.answer}")
    chat.answer(f"The calculator returned {result}.", p.final)
    rec = record(family, chat, p.answer, "number", p.key, kind=p.kind, failure=failure)
    return Sample(p.key, {family: [rec]})


def sample_calculator_agent(rng: random.Random, world: World) -> Sample:
    """The calculator task under ``k25 agent``'s default tool list (see :func:`sample_calculator`)."""
    return sample_calculator(rng, world, "tool_calc_agent")


# ---------------------------------------------------------------------------------------------
# Python interpreter.


def _python_task(rng: random.Random, world: World) -> tuple[str, str, str, str, str]:
    """(key, question, code, final template with {out}, answer type)."""
    kind = rng.choice(("squares", "primes", "reverse", "count", "factorial", "fib", "digits", "sort"))
    if kind == "squares":
        n = rng.randint(10, 500)
        return (
            f"py:squares:{n}", f"What is the sum of the squares of the whole numbers from 1 to {n}?",
            f"total = sum(i * i for i in range(1, {n} + 1))\nprint(total)",
            f"The sum of the squares from 1 to {n} is {{out}}.", "number",
        )
    if kind == "primes":
        n = rng.randint(50, 5000)
        code = (
            f"count = 0\nfor n in range(2, {n}):\n    if all(n % d for d in range(2, int(n ** 0.5) + 1)):\n"
            "        count += 1\nprint(count)"
        )
        return f"py:primes:{n}", f"How many prime numbers are smaller than {n}?", code, \
            f"Below {n} there are {{out}} prime numbers.", "number"
    if kind == "reverse":
        word = rng.choice(world.corpus.towns).name.lower()
        return f"py:reverse:{word}", f'What is the word "{word}" spelled backwards?', \
            f'print("{word}"[::-1])', f'"{word}" backwards is "{{out}}".', "text"
    if kind == "count":
        town = rng.choice(world.corpus.towns)
        letter = rng.choice(sorted(set(town.name.lower()) - {" "}))
        sentence = f"{town.name} is known for its {town.product}"
        return (
            f"py:count:{letter}:{sentence}", f'How many times does the letter "{letter}" appear in "{sentence}"?',
            f'print("{sentence}".lower().count("{letter}"))',
            f'The letter "{letter}" appears {{out}} times.', "number",
        )
    if kind == "factorial":
        n = rng.randint(8, 30)
        return f"py:factorial:{n}", f"What is {n} factorial?", f"import math\nprint(math.factorial({n}))", \
            f"{n}! = {{out}}", "number"
    if kind == "fib":
        n = rng.randint(10, 90)
        code = f"a, b = 0, 1\nfor _ in range({n}):\n    a, b = b, a + b\nprint(a)"
        return f"py:fib:{n}", f"What is Fibonacci number {n} (with F(0) = 0 and F(1) = 1)?", code, \
            f"F({n}) = {{out}}", "number"
    if kind == "digits":
        n = rng.randint(20, 200)
        return f"py:digits:{n}", f"What is the sum of the digits of 2 to the power {n}?", \
            f"print(sum(int(d) for d in str(2 ** {n})))", f"The digits of 2^{n} add up to {{out}}.", "number"
    values = [rng.randint(1, 999) for _ in range(rng.randint(4, 8))]
    listed = ", ".join(map(str, values))
    return f"py:sort:{listed}", f"Sort these numbers from smallest to largest: {listed}.", \
        f"print(', '.join(str(v) for v in sorted([{listed}])))", "Sorted: {out}.", "text"


def _broken_code(rng: random.Random, code: str) -> tuple[str, str, str]:
    """A first attempt that fails, the lesson, and the failure kind (all errors come from running it)."""
    if code.startswith("import math\n"):
        return code.removeprefix("import math\n"), "I forgot to import math.", "missing_import"
    if rng.random() < 0.5 and "print(" in code:
        bare = re.sub(r"print\((.*)\)$", r"\1", code.rstrip())
        return bare, "The code printed nothing; I need to print the result.", "missing_print"
    printed = re.search(r"print\(([a-z_]+)\)", code)
    if printed:  # misspell the printed variable
        name = printed.group(1)
        bad = code[: printed.start(1)] + name + "x" + code[printed.end(1) :]
        return bad, f"I misspelled the variable {name}.", "typo"
    return code.replace("print(", "prnt(", 1), "I misspelled print.", "typo"


def sample_python(rng: random.Random, world: World) -> Sample:
    """A counting/number task answered by running code, sometimes after a failed first run."""
    key, question, code, final, answer_type = _python_task(rng, world)
    chat = Chat(tool_schemas(PYTHON_TOOL), rng.random() >= INSTANT_FRACTION)
    tools = Tools(world)
    chat.user(question)
    plan = "I will compute this exactly with a short Python program."
    failure = None
    if rng.random() < RECOVERY_FRACTION:
        bad, lesson, failure = _broken_code(rng, code)
        out = chat.call(plan, [(PYTHON_TOOL, {"code": bad})], tools, failed=True)[0]
        if not is_error(out):
            raise AssertionError(f"{key}: broken code unexpectedly worked: {out!r}")
        plan = f"{lesson} Fixing it and running again."
    out = chat.call(plan, [(PYTHON_TOOL, {"code": code})], tools)[0]
    if is_error(out):
        raise AssertionError(f"{key}: code failed: {out}")
    chat.answer(f"The program printed {out}.", final.format(out=out))
    rec = record("tool_python", chat, out, answer_type, key, failure=failure)
    return Sample(key, {"tool_python": [rec]})


# ---------------------------------------------------------------------------------------------
# Document search.


def _query(town: Town, attribute: str) -> str:
    """The search query the traces write for one fact: the town's name and the attribute's keyword."""
    return f"{town.name} {ATTRIBUTES[attribute][1]}"


def _search(
    chat: Chat, tools: Tools, rng: random.Random, town: Town, attribute: str, plan: str, transient: float,
    ks: tuple[int, ...] = (1, 2, 3, 3),
) -> str:
    """Search for one fact (retrying once after an injected outage); returns the quoted sentence."""
    k = rng.choice(ks)
    args = {"query": _query(town, attribute), "k": k}
    if rng.random() < transient:
        tools.fail_next = TRANSIENT_ERRORS["search"]
        chat.call(plan, [("search", args)], tools, failed=True)
        plan = "The search timed out. I will run the same search again."
    hits = json.loads(chat.call(plan, [("search", args)], tools)[0])
    if not hits or hits[0]["doc_id"] != Corpus.doc_id(town):
        raise AssertionError(f"search {args} did not rank {town.name} first: {hits[:1]}")
    return _fact_sentence(town, attribute)


def _search_chat(
    rng: random.Random, world: World, town: Town, attribute: str, thinking: bool | None = None
) -> tuple[Chat, Tools, str, str]:
    """The search task's conversation up to its first call: the chat, its tools, the question, the plan.

    The mode is drawn (a quarter Instant) unless ``thinking`` sets it.
    """
    if thinking is None:
        thinking = rng.random() >= INSTANT_FRACTION
    chat = Chat(tool_schemas("search"), thinking)
    question = rng.choice(ATTRIBUTES[attribute][0]).format(town=town.name)
    chat.user(question)
    return chat, Tools(world), question, f"I do not know this; I will search the documents for {town.name}."


def _search_sample(
    family: str, chat: Chat, town: Town, attribute: str, sentence: str, question: str, split: str,
    check: str = "", **meta: Any
) -> Sample:
    """The answer quoting the found sentence (after ``check``, a reasoning sentence), and the search task's record."""
    key = f"search:{town.name}:{attribute}"
    value = town.fact(attribute)
    prefix = f"{check} " if check else ""
    chat.answer(f'{prefix}The document says: "{sentence}"', _FINAL_FACT[attribute].format(town=town.name, value=value))
    answer_type = "number" if attribute in ("founded", "population") else "text"
    rec = record(family, chat, value, answer_type, key, towns=[town.name], attribute=attribute, **meta)
    return Sample(key, {family: [rec]}, uid=f"{key}:{question}", split=split)


def sample_search(rng: random.Random, world: World) -> Sample:
    """A fact about a town, found with one search (sometimes after a misspelled or failed search)."""
    split, (town,) = world.draw_towns(rng, 1)
    attribute = rng.choice(list(ATTRIBUTES))
    chat, tools, question, plan = _search_chat(rng, world, town, attribute)
    failure = None
    if rng.random() < RECOVERY_FRACTION:
        typo = town.name[:2] + town.name[3:]
        result = world.corpus.search_tool(typo, 3)
        if result == "[]" and rng.random() < 0.6:
            failure = "no_match"
            chat.call(plan, [("search", {"query": typo, "k": 3})], tools, failed=True)
            plan = f"Nothing matched; I misspelled the name. Searching for {town.name} instead."
        else:
            failure = "transient"
    sentence = _search(chat, tools, rng, town, attribute, plan, 1.0 if failure == "transient" else 0.0)
    return _search_sample("tool_search", chat, town, attribute, sentence, question, split, failure=failure)


def _misspell(rng: random.Random, name: str, taken: frozenset[str]) -> str:
    """``name`` with one letter dropped, doubled or changed (never another town's name): the slips
    k25-mini makes when it copies a name it has never seen into a query."""
    while True:
        i = rng.randrange(1, len(name))
        kind = rng.choice(("drop", "double", "change"))
        if kind == "drop":
            typo = name[:i] + name[i + 1 :]
        elif kind == "double":
            typo = name[:i] + name[i] + name[i:]
        else:
            typo = name[:i] + rng.choice([c for c in "aeiourlnst" if c != name[i].lower()]) + name[i + 1 :]
        if typo != name and typo not in taken:
            return typo


def _wrong_name(rng: random.Random, world: World, town: Town) -> tuple[str, str]:
    """A name the first query gets wrong: a training town's that looks like ``town``'s, or a one-letter slip."""
    if rng.random() < 0.5:
        others = [t.name for t in world.pools["train"] if t.name != town.name]
        close = difflib.get_close_matches(town.name, others, n=3, cutoff=0.6)
        if close:
            return rng.choice(close), "lookalike"
    return _misspell(rng, town.name, world.town_names), "typo"


def _hit_towns(corpus: Corpus, result: str) -> list[str]:
    """The towns a search result's hits are about, in rank order."""
    return [corpus.by_doc[h["doc_id"]].name for h in json.loads(result)]


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


@dataclass
class _WrongSearch:
    """A first query with the town's name wrong: its arguments, the name written and its kind, the hits' towns."""

    args: dict[str, Any]
    typo: str
    kind: str
    found: list[str]


def _draw_wrong_search(rng: random.Random, world: World) -> tuple[str, Town, str, _WrongSearch]:
    """A town, an attribute and a wrong first query for them whose hits are other towns' documents."""
    corpus = world.corpus
    while True:  # the keyword alone ranks a few documents first; a town among them cannot be missed
        split, (town,) = world.draw_towns(rng, 1)
        attribute = rng.choice(list(ATTRIBUTES))
        typo, kind = _wrong_name(rng, world, town)
        args = {"query": f"{typo} {ATTRIBUTES[attribute][1]}", "k": rng.choice((1, 2, 3, 3))}
        found = _hit_towns(corpus, corpus.search_tool(args["query"], args["k"]))
        if found and town.name not in found:
            return split, town, attribute, _WrongSearch(args, typo, kind, found)


def sample_search_check(rng: random.Random, world: World) -> Sample:
    """A search that reads whose documents the hits are before it uses them (Thinking mode).

    The reasoning after every search names the hits' towns, then either finds the asked town among
    them ("…: Pomoor is the town asked.") and quotes its document, or does not ("…, not Pomoor: I
    wrote Pomoel for Pomoor.") and searches again. Both outcomes come from the same opening, so the
    sentence alone cannot decide which follows: the model has to compare the names. (The family's
    first version, which runs 11-13 trained on, wrote the check only on wrong hits, and a model this
    size learnt to write it on right ones too; Instant mode, which has no reasoning to hold it,
    learnt a second search without a reason.)

    Half the records search right the first time. In the other half the first query gets the name
    wrong next to the attribute's keyword: a training town that looks like the asked one (the hits
    are that town's), else a one-letter slip of the name (the keyword still matches every document,
    so the hits are the ones it ranks first, not ``[]`` as for ``tool_search``'s misspelled names
    alone). That turn is context, not a target.
    """
    corpus = world.corpus
    if rng.random() < 0.5:
        split, town, attribute, wrong = _draw_wrong_search(rng, world)
    else:
        split, (town,) = world.draw_towns(rng, 1)
        attribute, wrong = rng.choice(list(ATTRIBUTES)), None
    chat, tools, question, plan = _search_chat(rng, world, town, attribute, thinking=True)
    meta: dict[str, Any] = {"failure": None}
    if wrong is not None:
        found = _hit_towns(corpus, chat.call(plan, [("search", wrong.args)], tools, failed=True)[0])
        if found != wrong.found:
            raise AssertionError(f"search {wrong.args} gave {found} in the conversation and {wrong.found} before it")
        plan = (f"The hits are about {_listed(found)}, not {town.name}: I wrote {wrong.typo} for {town.name}. "
                f"Searching for {town.name} instead.")
        meta = {"failure": "wrong_hits", "typo": wrong.typo, "wrong_name": wrong.kind}
    sentence = _search(chat, tools, rng, town, attribute, plan, 0.0)
    found = _hit_towns(corpus, chat.messages[-1]["content"])
    check = f"The hits are about {_listed(found)}: {town.name} is the town asked."
    return _search_sample("tool_search_check", chat, town, attribute, sentence, question, split, check, **meta)


# ---------------------------------------------------------------------------------------------
# Multi-step agent tasks: several sequential tool calls.


def sample_agent(rng: random.Random, world: World, family: str = "agent") -> Sample:
    """Search several facts one call at a time, then compute with the calculator or Python.

    ``agent_docs`` is the same task under the tool list ``k25 agent --docs`` declares, which adds
    ``open_document``: the snippets already hold the whole document, so it is declared and never
    needed, and the model learns that an extra tool changes nothing.
    """
    kind = rng.choice(("total_population", "years_between", "average_population", "age_in", "prime_population"))
    n = {"total_population": 2, "years_between": 2, "average_population": 3}.get(kind, 1)
    split, towns = world.draw_towns(rng, n)
    names = [t.name for t in towns]
    attribute = "founded" if kind in ("years_between", "age_in") else "population"
    year = rng.randint(2030, 2100) if kind == "age_in" else CURRENT_YEAR
    if kind == "total_population":
        question = f"What is the combined population of {names[0]} and {names[1]}?"
    elif kind == "years_between":
        question = f"How many years apart were {names[0]} and {names[1]} founded?"
    elif kind == "average_population":
        question = f"What is the average population of {names[0]}, {names[1]} and {names[2]}?"
    elif kind == "age_in":
        question = f"How many years old will {names[0]} be in {year}?"
    else:
        question = f"Is the population of {names[0]} a prime number?"
    declared = AGENT_DOCS_TOOLS if family == "agent_docs" else AGENT_TOOLS
    chat = Chat(tool_schemas(*declared), rng.random() >= INSTANT_FRACTION)
    tools = Tools(world)
    chat.user(question)
    values = []
    for i, town in enumerate(towns):
        what = "founding year" if attribute == "founded" else attribute
        if i > 0:
            plan = f"Found: {_fact_sentence(towns[i - 1], attribute)} Next, {town.name}."
        elif len(towns) == 1:
            plan = f"I need the {what} of {town.name}; I will search the documents for it."
        else:
            plan = f"I need the {what} of {', '.join(names)}; I will look them up one at a time, starting with "
            plan += f"{town.name}."
        _search(chat, tools, rng, town, attribute, plan, TRANSIENT_FAILURE)
        values.append(int(town.fact(attribute)))
    facts = " ".join(_fact_sentence(t, attribute) for t in towns)
    if kind == "prime_population":
        code = (
            f"n = {values[0]}\nprint(n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1)))"
        )
        call = [(PYTHON_TOOL, {"code": code})]
        out = chat.call(f"{facts} I will test it for primality with Python.", call, tools)[0]
        answer = {"True": "yes", "False": "no"}[out]
        final = f"Yes, {values[0]} is a prime number." if answer == "yes" else f"No, {values[0]} is not a prime number."
        rec = record(family, chat, answer, "text", f"{family}:{kind}:{names[0]}", kind=kind, towns=names)
        return _finish(chat, rec, f"Python printed {out}.", final, split)
    if kind == "total_population":
        expression = f"{values[0]} + {values[1]}"
    elif kind == "years_between":
        expression = f"{max(values)} - {min(values)}"
    elif kind == "average_population":
        expression = f"({values[0]} + {values[1]} + {values[2]}) / 3"
    else:
        expression = f"{year} - {values[0]}"
    result = chat.call(f"{facts} Now I compute {expression}.", [("calculator", {"expression": expression})], tools)[0]
    if kind == "total_population":
        final = f"Together {names[0]} and {names[1]} have {result} people."
    elif kind == "years_between":
        final = f"They were founded {result} years apart."
    elif kind == "average_population":
        final = f"The average population is {result}."
    else:
        final = f"In {year}, {names[0]} will be {result} years old."
    key = f"{family}:{kind}:{':'.join(sorted(names))}:{year if kind == 'age_in' else ''}"
    rec = record(family, chat, result, "number", key, kind=kind, towns=names)
    return _finish(chat, rec, f"The calculator returned {result}.", final, split)


def _finish(chat: Chat, rec: dict[str, Any], reasoning: str, final: str, split: str) -> Sample:
    chat.answer(reasoning, final)
    rec["meta"]["tool_calls"] = chat.tool_calls
    rec["meta"]["critical_steps"] = sum(1 for m in chat.messages if m["role"] == "assistant")
    return Sample(rec["meta"]["key"], {rec["family"]: [rec]}, split=split)


def sample_agent_docs(rng: random.Random, world: World) -> Sample:
    """The agent task under ``k25 agent --docs``'s tool list (see :func:`sample_agent`)."""
    return sample_agent(rng, world, "agent_docs")


# ---------------------------------------------------------------------------------------------
# Swarm: an orchestrator creates sub-agents, assigns parts in parallel, combines the answers.

_RESEARCHER_PROMPT = (
    "You research towns. Use the search tool to find facts in the documents and the calculator for "
    "arithmetic. Reply with one short sentence that gives the facts you were asked for."
)


def _subagent_run(
    world: World, rng: random.Random, name: str, system: str, prompt: str, towns: list[Town], parallel: bool = False
) -> tuple[dict[str, Any], str, int]:
    """A sub-agent's own conversation: search each town, one calculator call, a one-sentence answer.

    One town: its age in CURRENT_YEAR. Two towns: how many years apart they were founded; one
    search after the other, or with ``parallel`` (the batch form's ``swarm_batch_sub``) both
    searches in one turn, whose reasoning then names each town's year. Run 6 skipped the second
    of two sequential searches in most held-out pairs: the turn after the first search and the
    one after the second open with the same sentence ("It was founded in ..."), so which comes
    next hangs on counting searches. Returns (record, final answer, assistant steps).
    """
    chat = Chat(tool_schemas("search", "calculator"), True, system=system + SUBAGENT_SUFFIX)
    tools = Tools(world)
    chat.user(prompt)
    years = [t.founded for t in towns]
    if parallel and len(towns) == 2:
        calls = [("search", {"query": _query(t, "founded"), "k": rng.choice((1, 2))})
                 for t in towns]
        for town, out in zip(towns, chat.call(f"I will search for {towns[0].name} and {towns[1].name}.", calls,
                                              tools), strict=True):
            if json.loads(out)[0]["doc_id"] != Corpus.doc_id(town):
                raise AssertionError(f"search for {town.name} did not rank it first")
        facts = f"{towns[0].name} was founded in {years[0]} and {towns[1].name} in {years[1]}."
    else:
        plan = f"I will search for {towns[0].name}."
        for i, town in enumerate(towns):
            _search(chat, tools, rng, town, "founded", plan, 0.0, ks=(1, 2))
            if i + 1 < len(towns):
                plan = f"{_fact_sentence(town, 'founded')} Now {towns[i + 1].name}."
        facts = " ".join(_fact_sentence(t, "founded") for t in towns)
    expression = f"{CURRENT_YEAR} - {years[0]}" if len(towns) == 1 else f"{max(years)} - {min(years)}"
    value = chat.call(f"{facts} Now {expression}.", [("calculator", {"expression": expression})], tools)[0]
    if len(towns) == 1:
        final = f"{towns[0].name} was founded in {years[0]}, so in {CURRENT_YEAR} it is {value} years old."
    else:
        final = (
            f"{towns[0].name} was founded in {years[0]} and {towns[1].name} in {years[1]}, "
            f"so they were founded {value} years apart."
        )
    chat.answer(f"The calculator returned {value}.", final)
    steps = sum(1 for m in chat.messages if m["role"] == "assistant")
    family = "swarm_batch_sub" if parallel else "swarm_sub"
    rec = record(family, chat, value, "number", "", towns=[t.name for t in towns], agent=name)
    return rec, final, steps


@dataclass
class _SwarmTask:
    """A swarm question: independent parts (one town, or a pair), each part's value, and the goal."""

    kind: str  # "ages" or "gaps"
    goal: str  # "max", "min" or "total"
    split: str
    towns: list[Town]
    parts: list[list[Town]]
    labels: list[str]  # one per part: the town, or "A and B"; the batch form's items
    values: dict[str, int]
    question: str
    template: str  # a part's sub-agent prompt, with {{item}} for its label

    def key(self, family: str) -> str:
        return f"{family}:{self.kind}:{self.goal}:{'|'.join(self.labels)}"

    @property
    def what(self) -> str:
        """What the parts are, in the orchestrator's reasoning."""
        return "towns" if self.kind == "ages" else "pairs"

    def prompt(self, label: str) -> str:
        return self.template.replace("{{item}}", label)


def _draw_swarm_task(rng: random.Random, world: World) -> _SwarmTask:
    """Ages: 3-5 towns, one part each; then the oldest, the newest or the total. Gaps: 3 pairs, one
    part each; then the pair furthest apart or the total. Ties fall back to the total."""
    kind = rng.choice(("ages", "gaps"))
    if kind == "ages":
        split, towns = world.draw_towns(rng, rng.randint(3, MAX_TOWNS_PER_TASK - 1))
        parts = [[t] for t in towns]
        values = {t.name: CURRENT_YEAR - t.founded for t in towns}
        labels = [t.name for t in towns]
    else:
        split, towns = world.draw_towns(rng, MAX_TOWNS_PER_TASK)
        parts = [towns[i : i + 2] for i in range(0, len(towns), 2)]
        labels = [f"{a.name} and {b.name}" for a, b in parts]
        values = {lab: abs(a.founded - b.founded) for lab, (a, b) in zip(labels, parts, strict=True)}
    goal = rng.choice(("max", "min", "total") if kind == "ages" else ("max", "total"))
    if goal != "total":
        best = (max if goal == "max" else min)(values.values())
        if list(values.values()).count(best) > 1:
            goal = "total"  # a tie has no single answer
    names = [t.name for t in towns]
    if kind == "ages":
        ask = {
            "max": "Which of them is the oldest?",
            "min": "Which of them was founded most recently?",
            "total": "What do their ages add up to?",
        }[goal]
        question = f"How many years has each of these towns existed in {CURRENT_YEAR}: {', '.join(names)}? {ask}"
        template = (
            f"Find the year {{{{item}}}} was founded and compute how many years it has existed in {CURRENT_YEAR}. "
            "Answer in one sentence."
        )
    else:
        ask = "Which pair was founded furthest apart?" if goal == "max" else "What do the gaps add up to?"
        question = (
            f"For each pair of towns, how many years apart were they founded: {'; '.join(labels)}? {ask}"
        )
        template = (
            "Find the years {{item}} were founded and compute how many years apart they were founded. "
            "Answer in one sentence."
        )
    return _SwarmTask(kind, goal, split, towns, parts, labels, values, question, template)


def _swarm_answer(
    task: _SwarmTask, chat: Chat, run_tool: Callable[[str, dict[str, Any]], str] | None
) -> tuple[str, str]:
    """The orchestrator's last turns: the parts' values listed, then the pick or the total.

    With ``run_tool`` the total comes from one calculator call (the batch form, whose orchestrator
    has the workers' tools); without, it is added up in the reasoning. Returns (answer, answer type).
    """
    labels, values = task.labels, task.values
    unit = "years old" if task.kind == "ages" else "years apart"
    listing = "; ".join(f"{lab}: {values[lab]}" for lab in labels)
    if task.goal == "total":
        total = sum(values.values())
        terms = " + ".join(str(values[lab]) for lab in labels)
        if run_tool is None:
            reasoning = f"{listing}. Total: {terms} = {total}."
        else:
            result = chat.call(f"{listing}. I add them up with the calculator.",
                               [("calculator", {"expression": terms})], run_tool)[0]
            assert result == str(total), (result, total)
            reasoning = f"The calculator returned {total}."
        chat.answer(reasoning, f"{listing}. Together they add up to {total} years.")
        return str(total), "number"
    pick = next(lab for lab in labels if values[lab] == (max if task.goal == "max" else min)(values.values()))
    reasoning = f"{listing}. The {'largest' if task.goal == 'max' else 'smallest'} is {pick} with {values[pick]}."
    if task.kind == "ages":
        final = f"{pick} is the {'oldest' if task.goal == 'max' else 'newest'}, at {values[pick]} {unit} ({listing})."
    else:
        final = f"{pick} were founded furthest apart, {values[pick]} {unit} ({listing})."
    chat.answer(reasoning, final)
    return pick, "text"


def sample_swarm(rng: random.Random, world: World) -> Sample:
    """Independent parts (town ages, or founding gaps of town pairs) run by sub-agents in parallel, combined.

    The orchestrator creates one shared researcher or one per part, sends every part's prompt
    with ``assign_task`` in one turn, and combines the answers in its reasoning.
    """
    task = _draw_swarm_task(rng, world)
    parts, labels, key = task.parts, task.labels, task.key("swarm")
    prompts = [task.prompt(lab) for lab in labels]
    chat = Chat(tool_schemas(*ORCHESTRATOR_TOOLS), True, system=ORCHESTRATOR_PROMPT)
    chat.user(task.question)
    shared = rng.random() < 0.5
    agents = ["town_researcher"] if shared else [f"researcher_{i + 1}" for i in range(len(parts))]
    created = {a: _RESEARCHER_PROMPT for a in agents}
    creations = dict(zip(agents, create_subagent_results([(a, created[a]) for a in agents]), strict=True))
    answers: dict[str, str] = {}

    def run_tool(name: str, args: dict[str, Any]) -> str:
        if name == "create_subagent":
            return creations[args["name"]]
        return answers[args["prompt"]]

    what = task.what
    plan = f"The {len(parts)} {what} are independent, so I will research them in parallel. " + (
        "One researcher sub-agent can take every part." if shared else "I will create one researcher per part."
    )
    chat.call(plan, [("create_subagent", {"name": a, "system_prompt": created[a]}) for a in agents], run_tool)
    subs, sub_steps, assignments = [], [], []
    for i, (part, prompt) in enumerate(zip(parts, prompts, strict=True)):
        agent = agents[0] if shared else agents[i]
        rec, final, steps = _subagent_run(world, rng, agent, created[agent], prompt, part)
        rec["meta"]["key"] = key
        subs.append(rec)
        answers[prompt] = final
        sub_steps.append(steps)
        assignments.append(("assign_task", {"agent": agent, "prompt": prompt}))
    chat.call(f"Now I assign the {len(parts)} {what} in one turn so they run at the same time.", assignments, run_tool)
    answer, answer_type = _swarm_answer(task, chat, None)
    # Critical steps: per stage, orchestrator steps plus the longest sub-agent (create, assign, answer).
    critical = 1 + (1 + max(sub_steps)) + 1
    single = sum(s - 1 for s in sub_steps) + 1  # one agent making the same tool calls in sequence
    rec = record(
        "swarm", chat, answer, answer_type, key, kind=task.kind, goal=task.goal, towns=[t.name for t in task.towns],
        subagents=len(parts), critical_steps=critical, single_agent_steps=single,
    )
    return Sample(key, {"swarm": [rec], "swarm_sub": subs}, split=task.split)


def sample_swarm_batch(rng: random.Random, world: World) -> Sample:
    """The swarm task in the batch form: one researcher, one ``assign_batch`` over the parts, a calculator total.

    The orchestrator also holds the workers' tools (``search``, ``calculator``), as ``k25 swarm``
    gives them by default. It copies only the parts' names (the template is fixed), which a
    small model does far better than whole prompts, and adds the total with the calculator
    instead of in its head. The sub-agents get ``swarm_sub``'s prompts; their conversations
    (``swarm_batch_sub``) search both towns of a pair in one turn.
    """
    task = _draw_swarm_task(rng, world)
    key = task.key("swarm_batch")
    chat = Chat(tool_schemas(*ORCHESTRATOR_TOOLS, *SWARM_WORKER_TOOLS), True, system=ORCHESTRATOR_PROMPT)
    chat.user(task.question)
    agent = "town_researcher"
    creation = create_subagent_results([(agent, _RESEARCHER_PROMPT)])[0]
    subs, outcomes, sub_steps = [], [], []
    for part, label in zip(task.parts, task.labels, strict=True):
        sub, final, steps = _subagent_run(world, rng, agent, _RESEARCHER_PROMPT, task.prompt(label), part, True)
        sub["meta"]["key"] = key
        subs.append(sub)
        outcomes.append(("done", final))
        sub_steps.append(steps)
    tools = Tools(world)

    def run_tool(name: str, args: dict[str, Any]) -> str:
        if name == "create_subagent":
            return creation
        if name == "assign_batch":
            return batch_result(args["items"], outcomes)
        return tools(name, args)

    what = task.what
    chat.call(f"The {len(task.parts)} {what} are independent, so one researcher sub-agent can take them all in "
              "parallel.", [("create_subagent", {"name": agent, "system_prompt": _RESEARCHER_PROMPT})], run_tool)
    chat.call(f"I run the same task for each of the {len(task.parts)} {what} in one batch.",
              [("assign_batch", {"agent": agent, "prompt_template": task.template, "items": task.labels})], run_tool)
    answer, answer_type = _swarm_answer(task, chat, run_tool)
    extra = 1 if task.goal == "total" else 0  # the calculator turn
    critical = 1 + (1 + max(sub_steps)) + extra + 1
    single = sum(s - 1 for s in sub_steps) + extra + 1
    rec = record(
        "swarm_batch", chat, answer, answer_type, key, kind=task.kind, goal=task.goal,
        towns=[t.name for t in task.towns], subagents=len(task.parts), critical_steps=critical,
        single_agent_steps=single,
    )
    return Sample(key, {"swarm_batch": [rec], "swarm_batch_sub": subs}, split=task.split)


Sampler = Callable[[random.Random, World], Sample]
