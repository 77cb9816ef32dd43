"""Expert relabelling (DAgger): the policy acts, the scripted expert labels the states it visits.

A policy cloned from demonstrations only ever saw the expert's states; once its own small
errors carry it elsewhere it has no data for getting back. Scripted experts
read the simulator state, so any state the policy reaches can be labelled for free: the
env executes the policy's chunks one action per step (so every step is rendered and
stored), and the dataset stores, at each step, the expert's action from that state.
Training on these episodes together with the demonstrations is one DAgger round.

For a chunk policy a per-step label is only half the answer: the labels after a decision
react to the policy's own open-loop actions, which the observation at the decision cannot
show, so SFT takes only the first ``relabelled_label_steps`` of each relabelled chunk.

The stored actions are labels, not what was executed: the file does not replay, its
episodes are not successes of the stored actions (``source`` is ``"relabelled"``), and it
must never seed the self-BC buffer, which `vlapt train` checks.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque

import numpy as np
from tqdm import tqdm

from vlapt.config import check_at_least
from vlapt.data.collect import dataset_env_args
from vlapt.data.format import RELABELLED, DemoWriter, check_writable
from vlapt.envs import get_suite
from vlapt.envs.experts import check_expert_choice, make_experts
from vlapt.envs.pools import check_backend, make_pool
from vlapt.interfaces import Agent, Episode, SlotSpec
from vlapt.rollout.episodes import run_episodes


@dataclasses.dataclass
class RelabelConfig:
    policy: str = ""  # saved policy directory whose own rollouts get labelled
    suite: str = "mt10"
    tasks: list[str] = dataclasses.field(default_factory=list)  # overrides suite when given
    episodes_per_task: int = 50
    # Training configurations from this index on: past the ones demonstrations use (collect
    # takes indices 0, 1, ... and a few more to replace the expert's failures).
    first_config_index: int = 100_000
    max_episode_steps: int = 200  # a stuck policy is labelled this long, not for all 500 steps
    expert: str = "scripted"  # the suite's expert that labels
    expert_per_task: dict[str, str] = dataclasses.field(default_factory=dict)  # task -> another expert labels that task
    config_seed: int = 0
    num_workers: int = 2
    env_backend: str = "local"  # where env slots run: local worker processes, or "ray" (vlapt.envs.pools)
    envs_per_task: int = 1
    output: str = "datasets/mt10_relabelled.hdf5"
    overwrite: bool = False

    def validate(self) -> "RelabelConfig":
        if not self.policy:
            raise ValueError("relabel needs policy=<saved policy directory> (e.g. runs/pipeline/sft/policy)")
        suite = get_suite(self.suite)
        suite.resolve_tasks(self.tasks)
        check_expert_choice(suite, self.expert, self.expert_per_task)
        check_backend(self.env_backend)
        check_at_least(self, 1, "episodes_per_task", "envs_per_task")
        check_at_least(self, 0, "num_workers", "first_config_index")
        if not 1 <= self.max_episode_steps <= suite.max_episode_steps:
            raise ValueError(f"max_episode_steps must be in [1, {suite.max_episode_steps}], got {self.max_episode_steps}")
        return self


class PolicyExecution:
    """The `execute` hook of `run_episodes`: the env runs the policy's chunks, one action per step.

    The policy decides once per chunk, batched over the slots whose chunk is used up, exactly
    as when it is evaluated; in between, its remaining actions are played open-loop.
    """

    def __init__(self, agent):
        self.agent = agent
        self._plans: dict[int, tuple[object, deque]] = {}  # slot -> (its episode in flight, actions left)

    def __call__(self, episodes: list, observations: list[dict], labels: list[np.ndarray]) -> list[np.ndarray]:
        need = [k for k, e in enumerate(episodes) if not self._has_plan(e)]
        if need:
            chunks = self.agent.act([observations[k] for k in need], [episodes[k].task for k in need])
            for k, chunk in zip(need, chunks):
                self._plans[episodes[k].slot] = (episodes[k], deque(np.asarray(chunk, dtype=np.float32)))
        return [self._plans[e.slot][1].popleft()[None] for e in episodes]

    def _has_plan(self, episode) -> bool:
        plan = self._plans.get(episode.slot)
        return plan is not None and plan[0] is episode and len(plan[1]) > 0


def relabel(config: RelabelConfig, agent: Agent, progress: bool = True) -> dict:
    """Write the relabelled dataset and return a summary (episodes, policy successes, steps per task).

    ``agent`` is the policy ``config.policy`` names, acting deterministically; the caller loads it
    (``vlapt.evaluation.CheckpointAgent(config.policy)``), so that the data layer never imports models.
    """
    config.validate()
    check_writable(config.output, config.overwrite)
    suite = get_suite(config.suite)
    tasks = suite.resolve_tasks(config.tasks)
    expert = make_experts(suite, config.expert, config.expert_per_task)
    env_config = suite.check_env_config(dataclasses.replace(
        agent.observation_config(), privileged_state=True, max_episode_steps=config.max_episode_steps))
    slots = [SlotSpec(suite, t, env_config, 1, config.config_seed) for t in tasks for _ in range(config.envs_per_task)]
    n, per, first = config.episodes_per_task, config.envs_per_task, config.first_config_index
    queues = [deque(range(first + k, first + n, per)) for _ in tasks for k in range(per)]
    env_args = {
        **dataset_env_args(suite, tasks, env_config, config.config_seed),
        "policy": f"{suite.family} {expert.name} expert labels, actions clipped to the action bounds",
        "expert": config.expert,
        "expert_per_task": dict(config.expert_per_task),
        RELABELLED: {"executed_policy": str(config.policy), "agent": agent.name,
                     "deterministic": bool(getattr(agent, "deterministic", True)), "first_config_index": first,
                     "note": "the env executed the policy's chunks; actions stores the expert's action at each visited state"},
        "success": "success of the executed policy; episodes end at its first success or at max_episode_steps",
    }
    stats = {t: {"episodes": 0, "policy_successes": 0, "steps": 0} for t in tasks}
    start = time.perf_counter()
    bar = tqdm(total=n * len(tasks), desc="relabel", unit="episode", disable=not progress, dynamic_ncols=True)
    writer = DemoWriter(config.output, env_args, overwrite=config.overwrite, config=config)

    def finished(episode: Episode, slot: int) -> None:
        writer.add(episode)
        s = stats[episode.task]
        s["episodes"] += 1
        s["policy_successes"] += int(episode.success)
        s["steps"] += episode.steps
        bar.update(1)

    with writer, bar, make_pool(slots, num_workers=config.num_workers, backend=config.env_backend) as pool:
        env_steps = run_episodes(expert, pool, [s.task for s in slots], queues, "train", finished,
                                 record=True, execute=PolicyExecution(agent), config_seed=config.config_seed,
                                 source=RELABELLED)
    return {"output": str(writer.path), "tasks": stats, "env_steps": env_steps, "wall_time_s": time.perf_counter() - start}
