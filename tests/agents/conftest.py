"""Shared fixture: scripted OpenAI-compatible servers on 127.0.0.1, always stopped at the end."""

from __future__ import annotations

import pytest

from k25.agents.scripted import ScriptedServer


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
