"""Agent Swarm runs started from the playground, executed against this server's own /v1 API.

The server stays an OpenAI-compatible endpoint; a swarm run is just a client of it (the
`k25.agents` runtime), started in the background so the page can poll its timeline of
sub-agent tasks while it runs. Runs live under one folder, one sub-folder (traces, workspace)
each.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..agents import ChatModel, Swarm, SwarmConfig, SwarmResult, default_tools, timeline


@dataclass
class SwarmRun:
    run_id: str
    task: str
    run_dir: Path
    started: float = field(default_factory=time.time)
    status: str = "running"
    result: SwarmResult | None = None
    error: str | None = None
    job: asyncio.Task | None = None

    def view(self) -> dict[str, Any]:
        """What the page polls: status, the timeline so far, and the answer with accounting."""
        bars = timeline(self.run_dir) if (self.run_dir / "tasks.jsonl").exists() else []
        out: dict[str, Any] = {"id": self.run_id, "task": self.task, "status": self.status, "timeline": bars,
                               "error": self.error}
        if self.result is not None:
            out["answer"] = self.result.answer
            out["summary"] = self.result.summary()
        return out


class SwarmRuns:
    """Start, list and cancel swarm runs; at most `max_running` at a time."""

    def __init__(self, root: str | Path | None = None, max_running: int = 2, max_subagents: int = 16) -> None:
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="k25-swarm-runs-"))
        self.max_running = max_running
        self.max_subagents = max_subagents
        self.runs: dict[str, SwarmRun] = {}

    def running(self) -> int:
        return sum(r.status == "running" for r in self.runs.values())

    def start(self, task: str, *, base_url: str, model: str, api_key: str | None, thinking: bool,
              max_subagents: int) -> SwarmRun:
        run_id = uuid.uuid4().hex[:12]
        run = SwarmRun(run_id, task, self.root / run_id)
        run.run_dir.mkdir(parents=True)
        chat = ChatModel(model=model, base_url=base_url, api_key=api_key or "none", thinking=thinking,
                         max_retries=2)
        workspace = run.run_dir / "workspace"
        workspace.mkdir()
        swarm = Swarm(chat, default_tools(workspace=workspace),
                      SwarmConfig(max_subagents=min(max_subagents, self.max_subagents), orchestrator_steps=30,
                                  subagent_steps=30))
        run.job = asyncio.create_task(self._run(run, swarm))
        self.runs[run_id] = run
        return run

    async def _run(self, run: SwarmRun, swarm: Swarm) -> None:
        try:
            run.result = await swarm.run(run.task, run_dir=run.run_dir)
            run.status = "done"
        except asyncio.CancelledError:
            run.status = "cancelled"
            raise
        except Exception as e:  # the run fails, the server does not
            run.status, run.error = "failed", f"{type(e).__name__}: {e}"

    def cancel(self, run_id: str) -> bool:
        run = self.runs.get(run_id)
        if run is None or run.job is None or run.job.done():
            return False
        run.job.cancel()
        return True
