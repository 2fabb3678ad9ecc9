"""Agent mode and Agent Swarm over any OpenAI-compatible endpoint (k25's server, vLLM, Moonshot).

Quick use::

    from k25.agents import Agent, ChatModel, default_tools
    agent = Agent(ChatModel(base_url="http://127.0.0.1:8000/v1", model="kimi-k2.5"),
                  default_tools(workspace="work", docs="corpus"))
    result = asyncio.run(agent.run("Summarise the corpus into work/summary.md", trace="run.jsonl"))

``Swarm`` runs the same tools under an orchestrator (``create_subagent``/``assign_task``);
``k25.agents.bench`` is the offline WideSearch-style benchmark; ``k25.agents.scripted`` a scripted
OpenAI-compatible server for tests. See docs/agents.md.
"""

from .agent import Agent, AgentConfig, AgentResult, ToolBudget
from .builtin import DocumentSearch, Workspace, code_interpreter, default_tools
from .model import ChatModel, ModelError, ModelReply, Pricing, RateLimited, Usage
from .sandbox import Limits, RunResult, Sandbox, available_isolation
from .swarm import Swarm, SwarmConfig, SwarmResult, critical_steps, timeline
from .tools import Tool, ToolContext, ToolError, ToolResult, Toolset, tool
from .trace import Trace, TraceError, read_events, replay

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentResult",
    "ChatModel",
    "DocumentSearch",
    "Limits",
    "ModelError",
    "ModelReply",
    "Pricing",
    "RateLimited",
    "RunResult",
    "Sandbox",
    "Swarm",
    "SwarmConfig",
    "SwarmResult",
    "Tool",
    "ToolBudget",
    "ToolContext",
    "ToolError",
    "ToolResult",
    "Toolset",
    "Trace",
    "TraceError",
    "Usage",
    "Workspace",
    "available_isolation",
    "code_interpreter",
    "critical_steps",
    "default_tools",
    "read_events",
    "replay",
    "timeline",
    "tool",
]
