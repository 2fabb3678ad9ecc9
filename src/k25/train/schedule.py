"""Learning-rate schedules as pure functions of the step, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math
from typing import Literal

ScheduleKind = Literal["cosine", "wsd", "constant"]


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    kind: ScheduleKind = "cosine",
    min_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> float:
    """Multiplier on the peak lr for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warmup over ``warmup_steps``, then ``cosine`` (peak → ``min_ratio``·peak by the last
    step), ``wsd`` (warmup-stable-decay, as K2: constant, then cosine to ``min_ratio`` over the
    final ``decay_fraction`` of the steps) or ``constant``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= min_ratio <= 1:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        start = warmup_steps
    elif kind == "wsd":
        if not 0 < decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {decay_fraction}")
        start = max(warmup_steps, total_steps - round(decay_fraction * total_steps))
        if step < start:
            return 1.0
    else:
        raise ValueError(f"unknown schedule {kind!r}; expected 'cosine', 'wsd' or 'constant'")
    span = max(1, total_steps - 1 - start)
    progress = min(1.0, (step - start) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
