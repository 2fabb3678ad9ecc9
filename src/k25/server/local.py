"""Serving a checkpoint directory: load it behind the engine, and run the API in-process on a free port.

``k25 serve`` uses :func:`load_backend`; ``k25 agent`` / ``k25 swarm`` without an endpoint use
:func:`local_server`, so the agent runtime stays a plain OpenAI client of a real k25 server (the
same HTTP path as a remote Kimi K2.5 endpoint) instead of calling the engine directly.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine_backend import EngineBackend


def load_backend(
    directory: str | Path, name: str, *, dtype: str | None = None, vision: bool = True, cache_tokens: int = 32768,
    max_num_seqs: int = 16, max_waiting: int = 64, max_model_len: int | None = None,
) -> EngineBackend:
    """An :class:`~k25.server.engine_backend.EngineBackend` over a checkpoint directory with its tokenizer.

    One place for what ``k25 serve`` and the in-process server both need: the tokenizer check,
    the model (the vision tower too when the checkpoint has one and ``vision``), the engine.
    """
    from ..chat.tokenizer import KimiTokenizer
    from ..checkpoint.model_io import load_model, text_model
    from ..engine.engine import EngineConfig, LLMEngine
    from ..model.multimodal import K25ForConditionalGeneration
    from .engine_backend import EngineBackend
    from .protocol import SamplingDefaults

    directory = Path(directory)
    if not (directory / "tiktoken.model").exists():
        raise FileNotFoundError(f"{directory}: no tiktoken.model there; serving needs a checkpoint with its tokenizer")
    tokenizer = KimiTokenizer.from_pretrained(directory)
    full = load_model(directory, dtype=dtype, vision=None if vision else False)
    vision_model = full if isinstance(full, K25ForConditionalGeneration) else None
    engine = LLMEngine(text_model(full), EngineConfig(cache_tokens=cache_tokens, max_num_seqs=max_num_seqs),
                       tokenizer=tokenizer)
    defaults = SamplingDefaults.from_generation_config(directory / "generation_config.json")
    return EngineBackend(engine, tokenizer, name, max_waiting=max_waiting, max_model_len=max_model_len,
                         vision_model=vision_model, sampling_defaults=defaults)


class AppThread:
    """Run an ASGI app with uvicorn in a daemon thread on a socket bound here (port 0: a free one).

    Binding the socket before uvicorn starts leaves no window in which another process could take
    the port between choosing it and listening on it.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level=log_level,
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="k25-local-server")

    def __enter__(self) -> AppThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.sock.close()
                raise RuntimeError(f"the local k25 server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@dataclass
class LocalServer:
    """What a client needs to reach the in-process server."""

    url: str  # http://127.0.0.1:PORT (the playground is at /)
    model_name: str
    directory: Path
    max_model_len: int

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible root, as ``--base-url`` / ``OpenAI(base_url=...)`` expect it."""
        return self.url + "/v1"


@contextmanager
def local_server(
    model_dir: str | Path | None = None, name: str | None = None, *, host: str = "127.0.0.1", port: int = 0,
    **backend_kwargs: Any,
) -> Iterator[LocalServer]:
    """Serve a checkpoint (default: the shipped k25-mini) on localhost for the duration of a ``with`` block.

    ``name`` is the served model id (default: ``k25-mini`` for the shipped model, else the folder
    name). Keyword arguments go to :func:`load_backend`. The engine and the server stop on exit.
    """
    from ..weights import DEFAULT_MODEL_NAME, default_model_dir
    from .app import create_app

    directory = Path(model_dir) if model_dir is not None else default_model_dir()
    served = name or (DEFAULT_MODEL_NAME if model_dir is None else directory.name)
    backend = load_backend(directory, served, **backend_kwargs)
    try:
        with AppThread(create_app(backend), host=host, port=port) as thread:
            yield LocalServer(thread.url, served, directory, backend.max_model_len)
    finally:
        backend.close()
