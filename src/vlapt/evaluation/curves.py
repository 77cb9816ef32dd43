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

from vlapt.config import staged_file


def load_history(run_dir: str | Path, up_to_env_steps: int | None = None) -> list[dict]:
    """The run's per-iteration rows, only those within ``up_to_env_steps`` if given."""
    rows = _read_history(Path(run_dir))
    return [row for row in rows if up_to_env_steps is None or row["env_steps"] <= up_to_env_steps]


def _read_history(run_dir: Path) -> list[dict]:
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


def plot_runs(run_dirs: Sequence[str | Path], output: str | Path, labels: Sequence[str] | None = None, smooth: int = 5,
              up_to_env_steps: int | None = None) -> Path:
    """Training (smoothed) and held-out curves of each run, cut at ``up_to_env_steps`` if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = _labels(run_dirs, labels)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir, label in zip(run_dirs, labels):
        history = load_history(run_dir, up_to_env_steps)
        x = [row["env_steps"] for row in history]
        line = axes[0].plot(x, running_mean([row["train_success"] for row in history], smooth), alpha=0.5, label=f"{label} (train)")[0]
        axes[1].plot(x, running_mean([row["train_steps_to_success"] for row in history], smooth), alpha=0.5, color=line.get_color())
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
    try:
        with staged_file(output) as staging:
            fig.savefig(staging, dpi=110, format=output.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return output


def compare_runs(run_dirs: Sequence[str | Path], labels: Sequence[str] | None = None,
                 up_to_env_steps: int | None = None, last_iterations: int = 20) -> str:
    """Markdown table comparing runs over the same env-step budget (what an ablation reports).

    Held-out: the starting policy's evaluation (runs from different SFT policies start apart),
    then the mean and range of the periodic evaluations after it, up to the budget (each is only
    ``eval_episodes`` per task, so the mean over several is the steadier figure). Training: the
    last ``last_iterations`` iterations within the budget. Wall time: the run's own clock at the
    budget, periodic evaluations included.
    """
    labels = _labels(run_dirs, labels)
    lines = [
        "| run | env steps | held-out success at start | held-out success: mean (min-max), evaluations "
        "| held-out steps to success | training success | training steps to success | BC weight "
        "| self-collected share of buffer | wall time (min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run_dir, label in zip(run_dirs, labels):
        history = load_history(run_dir, up_to_env_steps)
        if not history:
            first = load_history(run_dir, None)
            raise ValueError(f"{run_dir} has no iteration within {up_to_env_steps} env steps" + (
                f"; its first ends at {first[0]['env_steps']}: raise --up-to" if first else "; has it trained yet?"))
        all_evals = load_evaluations(run_dir, history)
        start = [m["success_rate"] for s, m in all_evals if s == 0]
        evals = [m for s, m in all_evals if s > 0]
        rates = [m["success_rate"] for m in evals]
        eval_steps = [m["steps_to_success"] for m in evals if m["steps_to_success"] is not None]
        recent = history[-last_iterations:]
        held_out = (f"{_mean(rates):.3f} ({min(rates):.2f}-{max(rates):.2f}), {len(rates)}" if rates else "-")
        lines.append(
            f"| {label} | {history[-1]['env_steps']:,} | {_fmt(start[0] if start else math.nan, 2)} "
            f"| {held_out} | {_fmt(_mean(eval_steps), 1)} "
            f"| {_fmt(_mean([r['train_success'] for r in recent]), 3)} "
            f"| {_fmt(_mean([r['train_steps_to_success'] for r in recent]), 1)} "
            f"| {history[-1]['bc_weight']:.3g} | {_fmt(history[-1].get('buffer_self_fraction', math.nan), 2)} "
            f"| {_fmt(history[-1].get('wall_time_s', math.nan) / 60, 1)} |"
        )
    return "\n".join(lines)


def _labels(run_dirs: Sequence[str | Path], labels: Sequence[str] | None) -> list[str]:
    labels = list(labels) if labels else [Path(r).name for r in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs; "
                         "give --labels one comma-separated label per run")
    return labels


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _fmt(value: float, digits: int) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


def running_mean(values: Sequence[float | None], window: int) -> list[float]:
    """The running mean over the last ``window`` finite values (None and NaN skipped; NaN where none)."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if v is not None and math.isfinite(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out
