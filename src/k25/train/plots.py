"""Plots of training metrics (matplotlib, headless): one metric of several runs against tokens seen."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .trainer import TrainError, read_metrics


def metric_series(
    runs: Sequence[str | Path], metric: str, chain: bool = False, smooth: int = 1,
) -> list[tuple[float, list[float], list[float]]]:
    """Each run's ``metric`` as (start, tokens, values), the curves :func:`plot_runs` draws.

    ``chain`` treats the runs as consecutive phases of one training: each run's tokens start where
    the previous run's ended, so a multi-phase recipe reads as one curve. ``smooth`` > 1 replaces
    each value with the mean of the last ``smooth`` values (per-step losses of packed SFT batches
    vary by an order of magnitude from step to step).
    """
    if smooth < 1:
        raise TrainError(f"smooth must be >= 1, got {smooth}")
    out: list[tuple[float, list[float], list[float]]] = []
    offset = 0.0
    for run in runs:
        records = read_metrics(run)
        last_tokens = max((r["tokens"] for r in records if "tokens" in r), default=0)
        records = [r for r in records if r.get(metric) is not None]
        if not records:
            raise TrainError(f"{run}: no records with metric {metric!r}")
        values = [float(r[metric]) for r in records]
        windows = (values[max(0, i - smooth + 1):i + 1] for i in range(len(values)))
        values = [sum(w) / len(w) for w in windows]
        out.append((offset, [offset + r["tokens"] for r in records], values))
        if chain:
            offset += last_tokens
    return out


def plot_runs(
    runs: Sequence[str | Path],
    metric: str,
    out: str | Path,
    labels: Sequence[str] | None = None,
    log_y: bool = False,
    title: str | None = None,
    hline: float | None = None,
    chain: bool = False,
    smooth: int = 1,
) -> Path:
    """Draw ``metric`` (e.g. ``loss``, ``eval_loss``, ``max_logit``) of each run vs tokens; save to ``out``.

    ``hline`` draws a reference level (e.g. the QK-Clip threshold τ); ``chain`` and ``smooth`` are
    :func:`metric_series`'s (chained runs get a dotted line where each phase starts).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if labels is not None and len(labels) != len(runs):
        raise TrainError(f"{len(labels)} labels for {len(runs)} runs")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (run, (start, xs, ys)) in enumerate(zip(runs, metric_series(runs, metric, chain, smooth), strict=True)):
        label = labels[i] if labels else Path(run).name
        line, = ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, ms=3)
        if chain and i > 0:
            ax.axvline(start, color=line.get_color(), ls=":", lw=0.8)
    if hline is not None:
        ax.axhline(hline, color="grey", ls="--", lw=1, label=f"{hline:g}")
    ax.set_xlabel("tokens")
    ax.set_ylabel(metric)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if chain:
        # a chain's phases fill the whole x range: the legend goes below the axes, never over a curve
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize="small")
    else:
        ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out
