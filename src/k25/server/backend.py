"""What the HTTP layer needs from an engine: submit token ids, get token steps back, abort.

The server owns HTTP, the chat format and the modes; an engine adapter implements
:class:`Backend` (continuous batching lives behind it). Keeping the contract this small lets
the HTTP tests drive the server with a scripted backend, and the engine with a real one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..chat.tokenizer import KimiTokenizer


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at its limit; the server answers 429 with Retry-After."""

    def __init__(self, retry_after: float = 1.0) -> None:
        super().__init__("the server is at capacity; retry later")
        self.retry_after = retry_after


@dataclass
class StepOutput:
    """New tokens of one request since the previous step.

    `finish_reason` is `"stop"` (EOS, `<|im_end|>`, a stop id or string) or `"length"` on the
    request's last step, else None. `logprobs` holds, per new token, `(logprob, top)` where
    `top` is a list of `(token_id, logprob)`.
    """

    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    stop_reason: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    model_name: str
    tokenizer: KimiTokenizer
    max_model_len: int

    def stream(
        self, request_id: str, prompt_ids: list[int], sampling: dict[str, Any], max_tokens: int | None,
        media: tuple[Any, Any] | None = None,
    ) -> AsyncIterator[StepOutput]:
        """Generate for one request; raises QueueFullError before the first step when full.

        `media` = (pixel_values, grid_thws) for the prompt's `<|media_pad|>` runs, in order; only
        backends with `supports_media = True` get it.
        """
        ...

    def abort(self, request_id: str) -> None:
        """Stop a request and free everything it holds (client went away)."""
        ...

    def stats(self) -> dict[str, float]:
        """Gauges for /metrics: at least `queue_depth` and `running`."""
        ...
