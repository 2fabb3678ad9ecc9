"""``k25 agent``, ``k25 swarm`` and ``k25 agent-bench``: the agent runtime from the command line.

The endpoint comes from ``--base-url/--model/--api-key`` or the environment (``K25_BASE_URL`` or
``OPENAI_BASE_URL``; ``K25_API_KEY``, ``OPENAI_API_KEY`` or ``MOONSHOT_API_KEY``; ``K25_MODEL``).
With none, ``k25 agent`` and ``k25 swarm`` start k25's own server in-process on a free localhost
port with the built-in k25-mini (or the checkpoint directory ``--model`` names) and talk to it
over HTTP like to any other endpoint. Progress (steps, sub-agents running, tool calls) goes to
stderr; the answer to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .model import ENV_BASE_URL, ENV_MODEL, ChatModel, ModelError, Pricing, env_first
from .trace import TraceError

if TYPE_CHECKING:
    from ..server.local import LocalServer

DEFAULT_MAX_CONTEXT = 262_144  # Kimi K2.5's context; a local model uses its own


class Progress:
    """Prints one short line per interesting event, with running counters."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.quiet = quiet
        self.tool_calls = 0
        self.running: set[str] = set()
        self.steps: dict[str, int] = {}
        self.labels: dict[str, str] = {}

    def __call__(self, e: dict[str, Any]) -> None:
        kind = e.get("type")
        who = e.get("agent", "")
        line = None
        if kind == "response":
            self.steps[who or "agent"] = e["step"]
            msg = e["message"]
            names = [c["function"]["name"] for c in msg.get("tool_calls") or []]
            line = f"step {e['step']}: " + (f"calls {', '.join(names)}" if names else "answers")
        elif kind == "tool_call":
            self.tool_calls += 1
        elif kind == "tool_result" and e.get("is_error"):
            line = f"{e['name']} failed: {str(e['content'])[:120]}"
        elif kind == "task_start":
            self.running.add(e["task_id"])
            label = self._label(f"{e['agent']}/{e['task_id']}")
            line = f"sub-agent {label} starts: {e['prompt'][:80]}"
        elif kind == "task_end":
            self.running.discard(e["task_id"])
            label = self._label(f"{e['agent']}/{e['task_id']}")
            line = f"sub-agent {label} {e['status']} after {e['steps']} steps"
        elif kind == "compaction":
            line = f"context compacted ({e['summarised_messages']} messages summarised)"
        if line and not self.quiet:
            tag = "swarm" if kind in ("task_start", "task_end") else self._label(e.get("agent") or "agent")
            self.console.print(f"[dim]\\[{tag}][/dim] {line}  [dim](tool calls {self.tool_calls}, "
                               f"sub-agents running {len(self.running)})[/dim]")


    def _label(self, name: str) -> str:
        """Sub-agent runs are named ``agent/task-id``; show them as ``agent#N`` in order of appearance."""
        if "/" not in name:
            return name
        if name not in self.labels:
            base = name.split("/")[0]
            self.labels[name] = f"{base}#{sum(1 for v in self.labels.values() if v.startswith(base + '#')) + 1}"
        return self.labels[name]


def _model(args: argparse.Namespace) -> ChatModel:
    thinking = {"on": True, "off": False}.get(args.thinking)
    return ChatModel(
        model=args.model or env_first(ENV_MODEL) or "kimi-k2.5", base_url=args.base_url, api_key=args.api_key,
        thinking=thinking, thinking_style=args.thinking_style, max_retries=args.retries, stream=args.stream,
        max_completion_tokens=args.max_tokens,
        request_options={k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None},
    )


@contextmanager
def endpoint(args: argparse.Namespace) -> Iterator[LocalServer | None]:
    """Make sure ``args`` names an endpoint for the run: the given one, or a k25 server started here.

    With ``--base-url`` or ``$K25_BASE_URL``/``$OPENAI_BASE_URL`` nothing changes and this yields
    None. Otherwise the built-in k25-mini (or the checkpoint directory ``--model``/``$K25_MODEL``
    names) is served on a free localhost port until the block ends, ``args.base_url``/``args.model``
    point at it, one line on stderr says so, and the :class:`~k25.server.local.LocalServer` is yielded.
    """
    if args.base_url or env_first(ENV_BASE_URL):
        yield None
        return
    from ..server.local import local_server
    from ..weights import DEFAULT_MODEL_NAME, MissingWeightsError, default_model_dir

    named = args.model or env_first(ENV_MODEL)
    if named is not None and Path(named).is_dir():
        model_dir, name = Path(named), Path(named).name
    elif named is None or named == DEFAULT_MODEL_NAME:
        try:
            model_dir, name = default_model_dir(), DEFAULT_MODEL_NAME
        except MissingWeightsError as e:
            raise ModelError(f"no endpoint given (--base-url, $K25_BASE_URL or $OPENAI_BASE_URL) and {e}") from None
    else:
        raise ModelError(
            f"model {named!r} needs an endpoint: pass --base-url URL or set K25_BASE_URL / OPENAI_BASE_URL "
            f"(with no endpoint k25 serves a checkpoint itself: the built-in {DEFAULT_MODEL_NAME}, or the "
            f"directory --model names)")
    with local_server(model_dir, name) as srv:
        args.base_url, args.model = srv.base_url, srv.model_name
        print(f"k25: no endpoint given (--base-url, $K25_BASE_URL or $OPENAI_BASE_URL): serving {srv.model_name} "
              f"from {srv.directory} at {srv.base_url} for this run", file=sys.stderr, flush=True)
        yield srv


def _tools(args: argparse.Namespace) -> list[Any]:
    from .builtin import default_tools
    from .sandbox import Limits

    limits = Limits(cpu_seconds=args.cpu_seconds, memory_mb=args.memory_mb, wall_seconds=args.wall_seconds)
    return default_tools(workspace=args.workspace, docs=args.docs, code=not args.no_code, limits=limits)


def _pricing(args: argparse.Namespace) -> Pricing:
    return Pricing(args.price_input, args.price_output)


def _report(summary: dict[str, Any], answer: str | None, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"answer": answer, **summary}, ensure_ascii=False, indent=2))
        return
    print(answer or "(no answer)")
    print(" ".join(f"{k}={v}" for k, v in summary.items()), file=sys.stderr)


def cmd_agent(args: argparse.Namespace) -> int:
    from .agent import Agent, AgentConfig

    with endpoint(args) as local:
        max_context = args.max_context or (local.max_model_len if local is not None else DEFAULT_MAX_CONTEXT)
        config = AgentConfig(max_steps=args.max_steps, pricing=_pricing(args), max_context_tokens=max_context)
        agent = Agent(_model(args), _tools(args), args.system, config)
        res = asyncio.run(agent.run(args.task, trace=args.trace, resume=args.resume, on_event=Progress(args.quiet)))
    _report({"stop_reason": res.stop_reason, "steps": res.steps, "tool_calls": res.tool_calls,
             "prompt_tokens": res.usage.prompt_tokens, "completion_tokens": res.usage.completion_tokens,
             "cost_usd": round(res.cost, 6), "wall_seconds": round(res.wall_seconds, 2)}, res.answer, args.json)
    return 0 if res.stop_reason == "answer" else 1


def cmd_swarm(args: argparse.Namespace) -> int:
    from .swarm import Swarm, SwarmConfig

    config = SwarmConfig(
        max_subagents=args.max_subagents, max_tool_calls=args.max_tool_calls,
        orchestrator_steps=args.orchestrator_steps, subagent_steps=args.subagent_steps,
        max_concurrency=args.max_concurrency, task_timeout=args.task_timeout, pricing=_pricing(args),
    )
    with endpoint(args):
        swarm = Swarm(_model(args), _tools(args), config, system_prompt=args.system)
        res = asyncio.run(swarm.run(args.task, run_dir=args.run_dir, resume=args.resume,
                                    on_event=Progress(args.quiet)))
    _report(res.summary(), res.answer, args.json)
    return 0 if res.stop_reason == "answer" else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_benchmark

    model = _model(args) if (args.base_url or args.real) else None
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    report = asyncio.run(run_benchmark(model, n_tasks=args.tasks, seed=args.seed, modes=modes,
                                       failure_rate=args.failure_rate, latency=args.latency,
                                       per_sector=args.per_sector))
    data = report.to_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"WideSearch-style offline benchmark: {data['tasks']} tasks, model {data['model']}, "
          f"injected tool failures {data['failure_rate']:.0%}")
    cols = ("item_f1", "row_f1", "success", "critical_steps", "total_steps", "tool_calls", "wall_seconds", "tokens",
            "cost")
    print(f"{'mode':8}" + "".join(f"{c:>15}" for c in cols))
    for mode, row in data["modes"].items():
        print(f"{mode:8}" + "".join(f"{row[c]:>15}" for c in cols))
    if data["speedup"]:
        s = data["speedup"]
        print(f"swarm speed-up: {s['wall']:.2f}x wall clock, {s['critical_steps']:.2f}x critical steps")
    return 0


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ModelError, TraceError, FileExistsError, FileNotFoundError, ValueError, RuntimeError) as e:
            print(f"k25: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("k25: interrupted; rerun with --resume to continue from the trace", file=sys.stderr)
            return 130

    return run


def _endpoint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("endpoint")
    g.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
                                      "(default: $K25_BASE_URL or $OPENAI_BASE_URL; with neither, agent and swarm "
                                      "serve the built-in k25-mini on localhost)")
    g.add_argument("--model", help="model name (default: $K25_MODEL or kimi-k2.5); with no endpoint, a checkpoint "
                                   "directory to serve locally instead of k25-mini")
    g.add_argument("--api-key", help="API key (default: $K25_API_KEY, $OPENAI_API_KEY or $MOONSHOT_API_KEY)")
    g.add_argument("--thinking", choices=("default", "on", "off"), default="default",
                   help="off = Instant mode; default sends nothing (K2.5 thinks by default)")
    g.add_argument("--thinking-style", choices=("both", "moonshot", "vllm"), default="both",
                   help="how to send --thinking: Moonshot's 'thinking' field, vLLM's chat_template_kwargs, or both")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="cap on each model reply's tokens (max_completion_tokens; default: the server's)")
    g.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: the server's; K2.5's is 1.0 thinking, 0.6 instant); "
                        "0 is greedy, which small models such as k25-mini need for their measured accuracy")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: the server's)")
    g.add_argument("--retries", type=int, default=4, help="retries per model call on 429/5xx/transport errors")
    g.add_argument("--stream", action="store_true", help="stream replies; each tool starts as soon as its call "
                                                         "has streamed in")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", help="the task, in words")
    _endpoint_args(p)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--workspace", help="folder the agent may read and write (the interpreter runs in it)")
    p.add_argument("--docs", help="folder of text documents to search (BM25)")
    p.add_argument("--no-code", action="store_true", help="no Python interpreter tool")
    p.add_argument("--cpu-seconds", type=int, default=10, help="interpreter CPU-time limit per run")
    p.add_argument("--memory-mb", type=int, default=1024, help="interpreter memory limit per run")
    p.add_argument("--wall-seconds", type=float, default=30.0, help="interpreter wall-clock limit per run")
    p.add_argument("--price-input", type=float, default=0.60, help="dollars per million input tokens")
    p.add_argument("--price-output", type=float, default=3.00, help="dollars per million output tokens")
    p.add_argument("--resume", action="store_true", help="continue the run recorded in --trace / --run-dir")
    p.add_argument("--json", action="store_true", help="print the answer and the accounting as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def register(subparsers: Any) -> None:
    """Add ``agent``, ``swarm`` and ``agent-bench`` to the ``k25`` CLI."""
    p = subparsers.add_parser("agent", help="run a task in Agent mode against an OpenAI-compatible endpoint")
    _run_args(p)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--max-context", type=int, default=None,
                   help="context size that triggers compaction at 85%% (default: 262144, or the local model's)")
    p.add_argument("--trace", help="JSONL trace file (needed for --resume)")
    p.set_defaults(func=_guard(cmd_agent))

    p = subparsers.add_parser("swarm", help="run a task in Agent Swarm mode (orchestrator + parallel sub-agents)")
    _run_args(p)
    p.add_argument("--run-dir", help="folder for the traces (needed for --resume)")
    p.add_argument("--max-subagents", type=int, default=100)
    p.add_argument("--max-tool-calls", type=int, default=1500)
    p.add_argument("--orchestrator-steps", type=int, default=100)
    p.add_argument("--subagent-steps", type=int, default=100)
    p.add_argument("--max-concurrency", type=int, default=None, help="sub-agent tasks running at once")
    p.add_argument("--task-timeout", type=float, default=1800.0, help="seconds per sub-agent task")
    p.set_defaults(func=_guard(cmd_swarm))

    p = subparsers.add_parser("agent-bench", help="offline WideSearch-style benchmark: single agent vs swarm")
    _endpoint_args(p)
    p.add_argument("--real", action="store_true", help="use the endpoint from the environment instead of the "
                                                       "scripted model (implied by --base-url)")
    p.add_argument("--tasks", type=int, default=6)
    p.add_argument("--per-sector", type=int, default=6, help="companies per sector (rows per table)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="agent,swarm")
    p.add_argument("--failure-rate", type=float, default=0.0, help="fraction of tool calls that fail (injected)")
    p.add_argument("--latency", type=float, default=0.02, help="scripted model: seconds per model call")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guard(cmd_bench))


def main(argv: list[str] | None = None) -> int:
    """``python -m k25.agents.cli agent|swarm|agent-bench ...``: the same commands without loading
    the model stack (no torch import), for quick starts on machines that only run agents."""
    parser = argparse.ArgumentParser(prog="k25-agents", description="k25 Agent mode and Agent Swarm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
