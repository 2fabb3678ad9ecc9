"""Shared helpers: a scripted OpenAI-compatible server on 127.0.0.1 and a client model for it."""

from __future__ import annotations

import pytest

from k25.agents import ChatModel
from k25.agents.scripted import ScriptedServer


def model_for(server: ScriptedServer, **kw) -> ChatModel:
    """A ChatModel on the scripted server with fast back-off, so retry tests stay quick."""
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("backoff_max", 0.05)
    return ChatModel(base_url=server.base_url, model=server.model, api_key="test", **kw)


@pytest.fixture
def serve():
    """``with serve(script) as srv``; every server is stopped when the test ends."""
    started: list[ScriptedServer] = []

    def start(script, **kw) -> ScriptedServer:
        srv = ScriptedServer(script, **kw)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.__exit__(None, None, None)
