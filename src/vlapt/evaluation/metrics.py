"""Per-task and averaged metrics of the evaluation protocol.

- success rate: fraction of episodes with ``info["success"]`` at any step;
- steps to success: env steps until the first success, averaged over successful episodes;
- steps (failures as limit): the same with failed episodes counted as the step limit, so a
  policy cannot look fast by failing its hard episodes;
- success within N steps: the fraction of episodes that succeeded in at most N env steps, read
  from the same episodes (the success rate under a protocol whose episodes end after N steps,
  such as RLinf's 100 or LeRobot's 400).
Averages are over tasks (each task weighs the same), as in the MT10 literature.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Iterable, Sequence

from vlapt.interfaces import Episode


@dataclasses.dataclass(frozen=True)
class TaskMetrics:
    episodes: int
    success_rate: float
    steps_to_success: float | None  # None when no episode succeeded
    steps_failures_as_limit: float
    success_within: dict[str, float]  # "100" -> fraction of episodes that succeeded within 100 env steps (limits
    # above the episode limit are left out: an episode cut at 100 steps says nothing of success within 400)


SUCCESS_WITHIN = (100, 400)  # the episode lengths of RLinf's and LeRobot's MetaWorld protocols


def task_metrics(episodes: Sequence[Episode], max_episode_steps: int,
                 success_within: Sequence[int] = SUCCESS_WITHIN) -> TaskMetrics:
    if not episodes:
        raise ValueError("no episodes to summarise")
    successes = [e.steps for e in episodes if e.success]
    return TaskMetrics(
        episodes=len(episodes),
        success_rate=len(successes) / len(episodes),
        steps_to_success=(sum(successes) / len(successes)) if successes else None,
        steps_failures_as_limit=sum(e.steps if e.success else max_episode_steps for e in episodes) / len(episodes),
        success_within={str(n): sum(s <= n for s in successes) / len(episodes)
                        for n in _within_reach(success_within, max_episode_steps)},
    )


def _within_reach(success_within: Sequence[int], max_episode_steps: int) -> list[int]:
    """The step limits an episode of at most ``max_episode_steps`` can speak for (within 400 needs 400 steps)."""
    return [n for n in success_within if n <= max_episode_steps]


def summarize(episodes: Iterable[Episode], tasks: Sequence[str], max_episode_steps: int,
              success_within: Sequence[int] = SUCCESS_WITHIN) -> dict:
    episodes = list(episodes)
    per_task = {}
    for task in tasks:
        mine = [e for e in episodes if e.task == task]
        per_task[task] = dataclasses.asdict(task_metrics(mine, max_episode_steps, success_within))
    steps = [m["steps_to_success"] for m in per_task.values() if m["steps_to_success"] is not None]
    average = {
        "episodes": sum(m["episodes"] for m in per_task.values()),
        "success_rate": _mean(m["success_rate"] for m in per_task.values()),
        "steps_to_success": _mean(steps) if steps else None,
        "steps_failures_as_limit": _mean(m["steps_failures_as_limit"] for m in per_task.values()),
        "success_within": {str(n): _mean(m["success_within"][str(n)] for m in per_task.values())
                           for n in _within_reach(success_within, max_episode_steps)},
    }
    return {"per_task": per_task, "average": average}


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def format_table(summary: dict, title: str | None = None) -> str:
    """Markdown table: one row per task and the average."""

    def fmt_steps(x):
        return "-" if x is None else f"{x:.1f}"

    within = list(summary["average"].get("success_within", {}))
    lines = []
    if title:
        lines += [f"**{title}**", ""]
    lines += [
        "| task | episodes | success | steps to success | steps (failures = limit) |"
        + "".join(f" success within {n} |" for n in within),
        "|---|---|---|---|---|" + "---|" * len(within),
    ]
    rows = list(summary["per_task"].items()) + [("**average**", summary["average"])]
    for name, m in rows:
        lines.append(
            f"| {name} | {m['episodes']} | {m['success_rate']:.3f} | {fmt_steps(m['steps_to_success'])} | "
            f"{m['steps_failures_as_limit']:.1f} |" + "".join(f" {m['success_within'][n]:.3f} |" for n in within)
        )
    return "\n".join(lines)


def paired_pace(reference: dict, result: dict) -> dict:
    """Steps to success of ``result`` relative to ``reference`` on the configurations both solved.

    Both are evaluation results (`vlapt eval` JSON) under the same protocol, so episode k of a
    task ran on the same configuration in both. Averages over each result's own successes mix
    pace with which configurations were solved; pairing by configuration separates them. Per
    task: the configurations both solved, their mean steps in each, the median and range of the
    per-configuration ratio, and the correlation of the two step counts (near 1 with a ratio
    near 1: the same strategy at the same pace; a low correlation: the lengths no longer follow
    the reference's, a different strategy). The average is over tasks, like `summarize`'s.
    """
    for key in ("split", "config_seed", "max_episode_steps"):
        if reference["protocol"].get(key) != result["protocol"].get(key):
            raise ValueError(f"the results were evaluated under different protocols ({key}: "
                             f"{reference['protocol'].get(key)!r} vs {result['protocol'].get(key)!r}); "
                             "evaluate both with the same split, config_seed and step limit")

    def solved(r):
        return {(e["task"], e["config_index"]): e["steps"] for e in r["episodes"] if e["success"]}

    ref, mine = solved(reference), solved(result)
    tasks = [t for t in reference["protocol"]["tasks"] if t in result["protocol"]["tasks"]]
    if not tasks:
        raise ValueError(f"the results share no task (reference: {', '.join(reference['protocol']['tasks'])}; "
                         f"result: {', '.join(result['protocol']['tasks'])}); compare evaluations of the same tasks")
    per_task = {}
    for task in tasks:
        keys = sorted(k for k in ref.keys() & mine.keys() if k[0] == task)
        if not keys:
            per_task[task] = {"configurations": 0}
            continue
        a = [ref[k] for k in keys]
        b = [mine[k] for k in keys]
        ratios = sorted(y / x for x, y in zip(a, b))  # sorted: the range is its ends
        per_task[task] = {
            "configurations": len(keys), "reference_steps": _mean(a), "steps": _mean(b),
            "median_ratio": statistics.median(ratios), "min_ratio": ratios[0], "max_ratio": ratios[-1],
            "correlation": _correlation(a, b),
        }
    paired = [m for m in per_task.values() if m["configurations"]]
    average = {
        "configurations": sum(m["configurations"] for m in paired),
        "reference_steps": _mean(m["reference_steps"] for m in paired),
        "steps": _mean(m["steps"] for m in paired),
        "median_ratio": _mean(m["median_ratio"] for m in paired),
    }
    return {"per_task": per_task, "average": average}


def _correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson's r; NaN when either side does not vary (or there are fewer than two pairs)."""
    try:
        return statistics.correlation(a, b)
    except statistics.StatisticsError:
        return math.nan


def format_pace_table(pace: dict, reference_name: str = "reference") -> str:
    def fmt(x, spec):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    lines = [f"| task | configurations both solved | {reference_name} steps | steps | ratio: median (range) | correlation |",
             "|---|---|---|---|---|---|"]
    for task, m in pace["per_task"].items():
        if not m["configurations"]:
            lines.append(f"| {task} | 0 | - | - | - | - |")
            continue
        lines.append(f"| {task} | {m['configurations']} | {m['reference_steps']:.1f} | {m['steps']:.1f} | "
                     f"{m['median_ratio']:.2f} ({m['min_ratio']:.2f}-{m['max_ratio']:.2f}) | {fmt(m['correlation'], '.2f')} |")
    a = pace["average"]
    lines.append(f"| **average** | {a['configurations']} | {fmt(a['reference_steps'], '.1f')} | {fmt(a['steps'], '.1f')} | "
                 f"{fmt(a['median_ratio'], '.2f')} | |")
    return "\n".join(lines)
