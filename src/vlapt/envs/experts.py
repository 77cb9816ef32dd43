"""Experts chosen task by task: one suite's experts, mixed into a single agent."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from vlapt.interfaces import Agent, EnvConfig, EnvSuite, Observation


class PerTaskExpert:
    """``default`` on every task except those ``per_task`` maps to another of the suite's experts.

    For demonstrations that take a faster expert only where a policy learns it as well as the
    default one (``vlapt collect expert_per_task.<task>=<expert>``).
    """

    chunk_len = 1

    def __init__(self, suite: EnvSuite, default: str, per_task: Mapping[str, str]) -> None:
        self.default = suite.make_expert(default)
        self.experts = {name: suite.make_expert(name) for name in sorted(set(per_task.values()))}
        self.per_task = dict(per_task)
        config = self.default.observation_config()
        for name, expert in self.experts.items():
            if expert.observation_config() != config or expert.chunk_len != self.chunk_len:
                raise ValueError(f"expert {name!r} observes or acts differently from {default!r}; they cannot be mixed")
        chosen = "; ".join(f"{name} on {', '.join(t for t, e in sorted(self.per_task.items()) if e == name)}"
                           for name in self.experts)
        self.name = f"{default}; {chosen}"

    def observation_config(self) -> EnvConfig:
        return self.default.observation_config()

    def act(self, observations: Sequence[Observation], tasks: Sequence[str]) -> list[np.ndarray]:
        return [self.experts[self.per_task[task]].act([obs], [task])[0] if task in self.per_task
                else self.default.act([obs], [task])[0] for obs, task in zip(observations, tasks)]


def check_expert_choice(suite: EnvSuite, default: str, per_task: Mapping[str, str]) -> None:
    """A ValueError naming the bad expert or task, and the valid ones."""
    valid = ", ".join(suite.expert_names)
    for task, name in [("", default), *per_task.items()]:
        if name not in suite.expert_names:
            where = f" for {task}" if task else ""
            raise ValueError(f"unknown expert {name!r}{where} in suite {suite.name}; valid experts: {valid}")
        if task:
            suite.check_task(task)


def make_experts(suite: EnvSuite, default: str, per_task: Mapping[str, str] | None = None) -> Agent:
    """The suite's expert ``default``, or a `PerTaskExpert` when ``per_task`` chooses others for some tasks."""
    per_task = {t: e for t, e in (per_task or {}).items() if e != default}
    check_expert_choice(suite, default, per_task)
    return PerTaskExpert(suite, default, per_task) if per_task else suite.make_expert(default)
