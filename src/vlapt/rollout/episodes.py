"""Run whole episodes of an agent over a pool of env slots, one batched decision at a time.

Shared by evaluation (outcomes only), demonstration collection and relabelling (recorded
trajectories). Each slot works through its own queue of configuration indices; a callback sees
every finished `Episode` (with its slot) and may queue more work (collection keeps going until it has enough
successes). The order of decisions depends only on the queues, so runs are reproducible. An
episode lost to an env worker that died is run again from the start on the same configuration.
Episodes picked by ``video`` keep the video frames their env reports (``info["frames"]``, when
its `EnvConfig.video_size` asks for them) in ``Episode.frames``; the others skip rendering them.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Callable, Sequence

import numpy as np

from vlapt.interfaces import Agent, EnvPool, Episode

log = logging.getLogger("vlapt.rollout")

# execute(episodes, observations, chunks) -> the chunks the env runs instead of the agent's (whose chunks stay the labels)
ExecuteFn = Callable[[list[Episode], list[dict], list[np.ndarray]], list[np.ndarray]]


class _Running:
    """An episode in flight: its identity and, when recorded, what was seen and done so far."""

    def __init__(self, slot: int, task: str, split: str, index: int):
        self.slot, self.task, self.split, self.index = slot, task, split, index
        self.observations: list[dict] = []
        self.actions: list[np.ndarray] = []
        self.rewards: list[np.ndarray] = []
        self.frames: list[np.ndarray] = []

    def finish(self, success: bool, steps: int, instruction: str, config_seed: int, source: str, record: bool) -> Episode:
        episode = Episode(task=self.task, instruction=instruction, success=success, steps=steps, split=self.split,
                          config_index=self.index, config_seed=config_seed, source=source)
        if record:
            episode.record(self.observations, self.actions)
            episode.rewards = np.concatenate(self.rewards).astype(np.float32)
        if self.frames:
            episode.frames = np.concatenate(self.frames)
        return episode


def run_episodes(
    agent: Agent,
    pool: EnvPool,
    slot_tasks: Sequence[str],
    queues: Sequence[deque],
    split: str,
    on_episode: Callable[[Episode, int], None],
    record: bool = False,
    execute: ExecuteFn | None = None,
    config_seed: int = 0,
    source: str = "policy",
    video: Callable[[str, int], bool] | None = None,
) -> int:
    """Run until every slot's queue is empty; returns the env steps executed.

    ``execute`` returns, for one decision of all active slots, the chunks the env executes
    instead of the agent's: another policy acting while the agent (an expert) only labels. The
    recorded actions stay the agent's, i.e. the labels. ``video(task, index)`` says which
    episodes keep their video frames (None: the env's default, frames for every episode when it
    renders them).
    """
    current: dict[int, _Running] = {}
    observations: dict[int, dict] = {}
    env_steps = 0

    def start_next(slot_ids) -> None:
        requests = {}
        for i in slot_ids:
            if queues[i]:
                index = queues[i].popleft()
                current[i] = _Running(i, slot_tasks[i], split, index)
                requests[i] = {"split": split, "index": index}
                if video is not None:
                    requests[i]["video"] = bool(video(slot_tasks[i], index))
            else:
                current.pop(i, None)
        for i, (obs, info) in pool.reset(requests).items():
            observations[i] = obs
            if "frames" in info:
                current[i].frames.append(info["frames"])

    start_next(range(len(slot_tasks)))
    while current:
        active = sorted(current)
        chunks = agent.act([observations[i] for i in active], [slot_tasks[i] for i in active])
        executed = execute([current[i] for i in active], [observations[i] for i in active], chunks) if execute else chunks
        results = pool.wait(pool.submit({i: np.asarray(c, dtype=np.float32) for i, c in zip(active, executed)}))
        finished = []
        for i, chunk in zip(active, chunks):
            result, running = results[i], current[i]
            if result.info.get("lost"):  # its env worker died: run the configuration again from its start
                log.warning("episode of %s on configuration %d lost with its env worker; running it again",
                            running.task, running.index)
                queues[i].appendleft(running.index)
                finished.append(i)
                continue
            steps = result.info["steps"]
            env_steps += steps
            if "frames" in result.info:
                running.frames.append(result.info["frames"])
            if record:
                running.observations.append(observations[i])
                running.actions.append(np.asarray(chunk, dtype=np.float32)[:steps])
                running.rewards.append(result.info["rewards"])
            instruction = observations[i]["instruction"]
            observations[i] = result.observation
            if result.terminated or result.truncated:
                on_episode(running.finish(bool(result.terminated), int(result.info["episode_steps"]), instruction,
                                          config_seed, source, record), i)
                finished.append(i)
        if finished:
            start_next(finished)
    return env_steps
