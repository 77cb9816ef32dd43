"""Per-task and averaged metrics of the evaluation protocol.

- success rate: fraction of episodes with ``info["success"]`` at any step;
- steps to success: env steps until the first success, averaged over successful episodes;
- steps (failures as limit): the same with failed episodes counted as the step limit, so a
  policy cannot look fast by failing its hard episodes.
Averages are over tasks (each task weighs the same), as in the MT10 literature.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class EpisodeRecord:
    task: str
    config_index: int
    success: bool
    steps: int


@dataclasses.dataclass(frozen=True)
class TaskMetrics:
    episodes: int
    success_rate: float
    steps_to_success: float | None  # None when no episode succeeded
    steps_failures_as_limit: float


def task_metrics(episodes: Sequence[EpisodeRecord], max_episode_steps: int) -> TaskMetrics:
    if not episodes:
        raise ValueError("no episodes to summarise")
    successes = [e.steps for e in episodes if e.success]
    return TaskMetrics(
        episodes=len(episodes),
        success_rate=len(successes) / len(episodes),
        steps_to_success=(sum(successes) / len(successes)) if successes else None,
        steps_failures_as_limit=sum(e.steps if e.success else max_episode_steps for e in episodes) / len(episodes),
    )


def summarize(episodes: Iterable[EpisodeRecord], tasks: Sequence[str], max_episode_steps: int) -> dict:
    episodes = list(episodes)
    per_task = {}
    for task in tasks:
        mine = [e for e in episodes if e.task == task]
        per_task[task] = dataclasses.asdict(task_metrics(mine, max_episode_steps))
    steps = [m["steps_to_success"] for m in per_task.values() if m["steps_to_success"] is not None]
    average = {
        "episodes": sum(m["episodes"] for m in per_task.values()),
        "success_rate": _mean(m["success_rate"] for m in per_task.values()),
        "steps_to_success": _mean(steps) if steps else None,
        "steps_failures_as_limit": _mean(m["steps_failures_as_limit"] for m in per_task.values()),
    }
    return {"per_task": per_task, "average": average}


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def format_table(summary: dict, title: str | None = None) -> str:
    """Markdown table: one row per task and the average."""

    def fmt_steps(x):
        return "-" if x is None else f"{x:.1f}"

    lines = []
    if title:
        lines += [f"**{title}**", ""]
    lines += [
        "| task | episodes | success | steps to success | steps (failures = limit) |",
        "|---|---|---|---|---|",
    ]
    rows = list(summary["per_task"].items()) + [("**average**", summary["average"])]
    for name, m in rows:
        lines.append(
            f"| {name} | {m['episodes']} | {m['success_rate']:.3f} | {fmt_steps(m['steps_to_success'])} | "
            f"{m['steps_failures_as_limit']:.1f} |"
        )
    return "\n".join(lines)
