"""Expert relabelling (DAgger): the policy acts, the scripted expert labels the states it visits.

A policy cloned from demonstrations only ever saw the expert's states; once its own small
errors carry it elsewhere it has no data for getting back (on MT10 the SFT policy fails on
its own training configurations about as often as on held-out ones). MetaWorld's experts
read the simulator state, so any state the policy reaches can be labelled for free: the
env executes the policy's chunks one action per step (so every step is rendered and
stored), and the dataset stores, at each step, the expert's action from that state.
Training on these episodes together with the demonstrations is one DAgger round.

For a chunk policy a per-step label is only half the answer: at a decision state it must
predict a whole chunk, and the labels at the next states react to its own open-loop actions.
With ``labels="plan"`` the expert also plays out its own next ``plan_steps`` actions from each
decision state in the simulator, which is then rewound (`EnvPool.expert_plans`); that plan is
a consistent chunk label, stored as ``action_plans``.

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

from vlapt.data.collect import _to_episode_data, dataset_env_args
from vlapt.data.format import RELABELLED, DemoWriter, check_writable
from vlapt.envs.experts import ScriptedExpert
from vlapt.envs.metaworld_env import MAX_EPISODE_STEPS
from vlapt.envs.tasks import resolve_tasks
from vlapt.envs.vector import EnvPool, SlotSpec
from vlapt.rollout.episodes import Episode, run_episodes

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
    # "step": the expert's action at every visited state. "plan": also, at each state where the
    # policy decided, the expert's next plan_steps actions from there (simulated and rewound), a
    # whole consistent chunk label; SFT then imitates the full chunk at those states.
    labels: str = "step"
    plan_steps: int = 0  # 0: the policy's chunk length
    config_seed: int = 0
    num_workers: int = 2
    envs_per_task: int = 1
    output: str = "datasets/mt10_relabelled.hdf5"
    overwrite: bool = False

    def validate(self) -> "RelabelConfig":
        if not self.policy:
            raise ValueError("relabel needs policy=<saved policy directory> (e.g. runs/pipeline/sft/policy)")
        resolve_tasks(self.suite, self.tasks)
        if self.episodes_per_task < 1 or self.envs_per_task < 1 or self.num_workers < 0 or self.first_config_index < 0:
            raise ValueError("episodes_per_task and envs_per_task must be >= 1, num_workers and first_config_index >= 0")
        if self.labels not in ("step", "plan"):
            raise ValueError(f"labels must be step or plan, got {self.labels!r}")
        if self.plan_steps < 0:
            raise ValueError(f"plan_steps must be >= 0 (0: the policy's chunk length), got {self.plan_steps}")
        if not 1 <= self.max_episode_steps <= MAX_EPISODE_STEPS:
            raise ValueError(f"max_episode_steps must be in [1, {MAX_EPISODE_STEPS}], got {self.max_episode_steps}")
        return self


class PolicyExecution:
    """The `execute` hook of `run_episodes`: the env runs the policy's chunks, one action per step.

    The policy decides once per chunk, batched over the slots whose chunk is used up, exactly
    as when it is evaluated; in between, its remaining actions are played open-loop. With a
    ``pool`` and ``plan_steps``, each decision also asks the scripted expert for its own plan
    from that state (`EnvPool.expert_plans`), kept per episode step (`take_plans`).
    """

    def __init__(self, agent, pool=None, plan_steps: int = 0):
        self.agent, self.pool, self.plan_steps = agent, pool, plan_steps
        self._plans: dict[int, tuple[Episode, deque]] = {}  # slot -> (its episode, actions left)
        self._expert_plans: dict[int, dict[int, np.ndarray]] = {}  # id(episode) -> {step: expert plan}

    def __call__(self, episodes: list[Episode], observations: list[dict], labels: list[np.ndarray]) -> list[np.ndarray]:
        need = [k for k, e in enumerate(episodes) if not self._has_plan(e)]
        if need:
            chunks = self.agent.act([observations[k] for k in need], [episodes[k].task for k in need])
            for k, chunk in zip(need, chunks):
                self._plans[episodes[k].slot] = (episodes[k], deque(np.asarray(chunk, dtype=np.float32)))
            if self.pool is not None and self.plan_steps:
                plans = self.pool.expert_plans({episodes[k].slot: self.plan_steps for k in need})
                for k in need:  # one recorded step per call: the step about to be taken
                    step = len(episodes[k].actions)
                    self._expert_plans.setdefault(id(episodes[k]), {})[step] = plans[episodes[k].slot]
        return [self._plans[e.slot][1].popleft()[None] for e in episodes]

    def take_plans(self, episode: Episode, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """The finished episode's expert plans as ``(action_plans (T, plan_steps, 4), plan_lengths (T,))``."""
        plans = np.zeros((steps, self.plan_steps, 4), np.float32)
        lengths = np.zeros(steps, np.int32)
        for t, plan in self._expert_plans.pop(id(episode), {}).items():
            if t < steps and len(plan):
                plans[t, : len(plan)] = plan
                lengths[t] = len(plan)
        return plans, lengths

    def _has_plan(self, episode: Episode) -> bool:
        plan = self._plans.get(episode.slot)
        return plan is not None and plan[0] is episode and len(plan[1]) > 0


def relabel(config: RelabelConfig, progress: bool = True) -> dict:
    """Write the relabelled dataset and return a summary (episodes, policy successes, steps per task)."""
    from vlapt.evaluation.agents import CheckpointAgent, env_config_for_policy

    config.validate()
    check_writable(config.output, config.overwrite)
    tasks = resolve_tasks(config.suite, config.tasks)
    agent = CheckpointAgent(config.policy)
    env_config = env_config_for_policy(agent.policy.config, privileged_state=True, max_episode_steps=config.max_episode_steps)
    slots = [SlotSpec(t, env_config, 1, config.config_seed) for t in tasks for _ in range(config.envs_per_task)]
    n, per, first = config.episodes_per_task, config.envs_per_task, config.first_config_index
    queues = [deque(range(first + k, first + n, per)) for _ in tasks for k in range(per)]
    env_args = {
        **dataset_env_args(tasks, env_config, config.config_seed),
        RELABELLED: {"executed_policy": str(config.policy), "deterministic": True,
                       "first_config_index": first,
                       "note": "the env executed the policy's chunks; actions stores the expert's action at each visited state"},
        "success": "success of the executed policy; episodes end at its first success or at max_episode_steps",
    }
    stats = {t: {"episodes": 0, "policy_successes": 0, "steps": 0} for t in tasks}
    plan_steps = (config.plan_steps or agent.policy.config.chunk_len) if config.labels == "plan" else 0
    if plan_steps:
        env_args[RELABELLED]["plan_steps"] = plan_steps
    start = time.perf_counter()
    bar = tqdm(total=n * len(tasks), desc="relabel", unit="episode", disable=not progress, dynamic_ncols=True)
    writer = DemoWriter(config.output, env_args, overwrite=config.overwrite)

    def finished(episode: Episode) -> None:
        data = _to_episode_data(episode, config.config_seed, source=RELABELLED)
        if plan_steps:
            data.action_plans, data.plan_lengths = behaviour.take_plans(episode, len(data))
        writer.add(data)
        s = stats[episode.task]
        s["episodes"] += 1
        s["policy_successes"] += int(episode.success)
        s["steps"] += episode.steps
        bar.update(1)

    with writer, bar, EnvPool(slots, num_workers=config.num_workers) as pool:
        behaviour = PolicyExecution(agent, pool, plan_steps)
        env_steps = run_episodes(ScriptedExpert(), pool, [s.task for s in slots], queues, "train", finished,
                                 record=True, execute=behaviour)
    return {"output": str(writer.path), "tasks": stats, "env_steps": env_steps, "wall_time_s": time.perf_counter() - start}
