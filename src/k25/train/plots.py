"""Plots of training metrics (matplotlib, headless): one metric of several runs against tokens seen."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .trainer import TrainError, read_metrics


def plot_runs(
    runs: Sequence[str | Path],
    metric: str,
    out: str | Path,
    labels: Sequence[str] | None = None,
    log_y: bool = False,
    title: str | None = None,
    hline: float | None = None,
) -> Path:
    """Draw ``metric`` (e.g. ``loss``, ``eval_loss``, ``max_logit``) of each run vs tokens; save to ``out``.

    ``hline`` draws a reference level (e.g. the QK-Clip threshold τ).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if labels is not None and len(labels) != len(runs):
        raise TrainError(f"{len(labels)} labels for {len(runs)} runs")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, run in enumerate(runs):
        records = [r for r in read_metrics(run) if r.get(metric) is not None]
        if not records:
            raise TrainError(f"{run}: no records with metric {metric!r}")
        label = labels[i] if labels else Path(run).name
        ax.plot([r["tokens"] for r in records], [r[metric] for r in records], label=label,
                marker="o" if len(records) < 30 else None, ms=3)
    if hline is not None:
        ax.axhline(hline, color="grey", ls="--", lw=1, label=f"{hline:g}")
    ax.set_xlabel("tokens")
    ax.set_ylabel(metric)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
