"""Learning curves of RL runs: success and steps to success against env steps.

Reads what `vlapt train` writes: ``history.json`` (or, for a run still going, the history in
its latest checkpoint) for training-episode statistics, and ``evals/iteration_*.json`` for the
held-out evaluations. Plots with matplotlib to a PNG.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence


def load_history(run_dir: str | Path) -> list[dict]:
    run_dir = Path(run_dir)
    if (run_dir / "history.json").is_file():
        return json.loads((run_dir / "history.json").read_text())
    pointer = run_dir / "checkpoints" / "latest"
    if pointer.is_file():
        state = pointer.parent / pointer.read_text().strip() / "state.json"
        if state.is_file():
            return json.loads(state.read_text())["history"]
    raise FileNotFoundError(f"no history.json or checkpoint in {run_dir}; is it a `vlapt train` output_dir?")


def load_evaluations(run_dir: str | Path, history: list[dict]) -> list[tuple[int, dict]]:
    """(env_steps, average metrics) of each held-out evaluation of the run."""
    steps_at = {0: 0, **{row["iteration"]: row["env_steps"] for row in history}}
    out = []
    for path in sorted(Path(run_dir).glob("evals/iteration_*.json")):
        iteration = int(path.stem.split("_")[1])
        if iteration in steps_at:
            out.append((steps_at[iteration], json.loads(path.read_text())["average"]))
    return out


def plot_runs(run_dirs: Sequence[str | Path], output: str | Path, labels: Sequence[str] | None = None, smooth: int = 5) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(labels) if labels else [Path(r).name for r in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir, label in zip(run_dirs, labels):
        history = load_history(run_dir)
        x = [row["env_steps"] for row in history]
        line = axes[0].plot(x, _smooth([row["train_success"] for row in history], smooth), alpha=0.5, label=f"{label} (train)")[0]
        axes[1].plot(x, _smooth([row["train_steps_to_success"] for row in history], smooth), alpha=0.5, color=line.get_color())
        evals = load_evaluations(run_dir, history)
        if evals:
            ex = [s for s, _ in evals]
            axes[0].plot(ex, [m["success_rate"] for _, m in evals], "o-", color=line.get_color(), label=f"{label} (held-out)")
            axes[1].plot(ex, [m["steps_to_success"] if m["steps_to_success"] is not None else math.nan for _, m in evals],
                         "o-", color=line.get_color())
    axes[0].set(xlabel="env steps", ylabel="success rate", ylim=(0, 1.02), title="success")
    axes[1].set(xlabel="env steps", ylabel="env steps to success", title="steps to success (successful episodes)")
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def _smooth(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if v is not None and math.isfinite(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out
