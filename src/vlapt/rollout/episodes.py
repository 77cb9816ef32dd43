"""Run whole episodes of an agent over a pool of env slots, one batched decision at a time.

Shared by evaluation (metrics only) and demonstration collection (full trajectories).
Each slot works through its own queue of configuration indices; a callback sees every
finished episode and may queue more work (collection keeps going until it has enough
successes). The order of decisions depends only on the queues, so runs are reproducible.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any, Callable, Sequence

import numpy as np

from vlapt.envs.vector import EnvPool


@dataclasses.dataclass
class Episode:
    slot: int
    task: str
    split: str
    config_index: int
    success: bool
    steps: int
    # With record=True: one entry per decision (observation before it, the agent's actions, rewards).
    # The agent's actions are what the env executed unless `run_episodes` was given an ``execute``.
    observations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    actions: list[np.ndarray] = dataclasses.field(default_factory=list)
    rewards: list[np.ndarray] = dataclasses.field(default_factory=list)


def run_episodes(
    agent,
    pool: EnvPool,
    slot_tasks: Sequence[str],
    queues: Sequence[deque],
    split: str,
    on_episode: Callable[[Episode], None],
    record: bool = False,
    execute: Callable[[list[Episode], list[dict], list[np.ndarray]], list[np.ndarray]] | None = None,
) -> int:
    """Run until every slot's queue is empty; returns the env steps executed.

    ``execute(episodes, observations, chunks)`` returns, for one decision of all active slots,
    the chunks the env executes instead of the agent's: noise injection for demonstrations, or
    another policy acting while the agent (an expert) only labels. The recorded actions stay
    the agent's, i.e. the labels.
    """
    current: dict[int, Episode] = {}
    observations: dict[int, dict] = {}
    env_steps = 0

    def start_next(slot_ids) -> None:
        requests = {}
        for i in slot_ids:
            if queues[i]:
                index = queues[i].popleft()
                current[i] = Episode(i, slot_tasks[i], split, index, False, 0)
                requests[i] = {"split": split, "index": index}
            else:
                current.pop(i, None)
        for i, (obs, _) in pool.reset(requests).items():
            observations[i] = obs

    start_next(range(len(slot_tasks)))
    while current:
        active = sorted(current)
        chunks = agent.act([observations[i] for i in active], [slot_tasks[i] for i in active])
        executed = execute([current[i] for i in active], [observations[i] for i in active], chunks) if execute else chunks
        results = pool.step({i: np.asarray(c, dtype=np.float32) for i, c in zip(active, executed)})
        finished = []
        for i, chunk in zip(active, chunks):
            result = results[i]
            episode = current[i]
            steps = result.info["steps"]
            env_steps += steps
            if record:
                episode.observations.append(observations[i])
                episode.actions.append(np.asarray(chunk, dtype=np.float32)[:steps])
                episode.rewards.append(result.info["rewards"])
            observations[i] = result.observation
            if result.terminated or result.truncated:
                episode.success = bool(result.terminated)
                episode.steps = int(result.info["episode_steps"])
                on_episode(episode)
                finished.append(i)
        if finished:
            start_next(finished)
    return env_steps
