"""The report's learning curves (matplotlib, PNG bytes): one colour per run, one panel per quantity."""

from __future__ import annotations

import io
import math
from typing import Sequence

from vlapt.evaluation.curves import running_mean
from vlapt.report.runs import Run, finite

# (history key, title, y label); success and steps also carry the held-out evaluations
PANELS = (
    ("train_success", "success", "success rate"),
    ("train_steps_to_success", "steps to success", "env steps (successes)"),
    ("bc_weight", "BC weight", "weight of the self-BC loss"),
    ("approx_kl", "KL to the rollout policy", "approx. KL per update"),
    ("explained_variance", "critic: explained variance", "explained variance"),
    ("buffer_self_fraction", "buffer: self-collected share", "fraction of buffer episodes"),
)
HELD_OUT = {"train_success": "success_rate", "train_steps_to_success": "steps_to_success"}


def learning_curves(runs: Sequence[Run], smooth: int = 5) -> bytes | None:
    """A PNG of every run's training curves against env steps (None when no run has a history)."""
    runs = [run for run in runs if run.history]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.6))
    for index, run in enumerate(runs):
        colour = f"C{index % 10}"
        x = [row["env_steps"] for row in run.history]
        marker = "." if len(x) < 3 else None  # a line of one point draws nothing
        for ax, (key, title, ylabel) in zip(axes.flat, PANELS):
            values = [row.get(key, math.nan) for row in run.history]
            values = [v if finite(v) else math.nan for v in values]
            if key.startswith("train_"):
                ax.plot(x, running_mean(values, smooth), color=colour, alpha=0.55, marker=marker,
                        label=f"{run.name} (training)")
            else:
                ax.plot(x, values, color=colour, marker=marker, label=run.name)
            if key in HELD_OUT and run.evaluations:
                held = [(s, m.get(HELD_OUT[key])) for s, m in run.evaluations]
                ax.plot([s for s, _ in held], [v if finite(v) else math.nan for _, v in held], "o-", color=colour,
                        label=f"{run.name} (held-out)")
            ax.set(title=title, xlabel="env steps", ylabel=ylabel)
    axes.flat[0].set_ylim(0, 1.02)
    axes.flat[0].legend(fontsize=7)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()

