"""Fixed-horizon chunked rollouts for on-policy RL.

Every slot (a task's env in a pool) makes ``horizon`` decisions per iteration; one decision
samples a whole action chunk, which the env executes until it ends or the task succeeds.
Episodes carry over between iterations (as in CleanRL) and each new episode takes the task's
next *training* configuration. For each decision the batch keeps what chunk-level policy
gradients need: the chunk's discounted reward over the steps actually executed, the discount
``gamma ** steps`` to the next decision, and episode ends (with the value of the last
observation folded into the reward at a time-limit truncation, which is not a real end of the
task). Finished episodes come back as `Episode`s, successes with their trajectory (the
observation at each decision and the actions sent to the env, before the env clips them).

The slots are stepped in ``groups`` (two by default): while the pool executes one group's
chunks, the policy computes the next chunks of the other, so neither waits for the other.
Each slot holds its next training configuration in reserve and the pool resets to it as soon
as an episode ends, so a reset never costs a separate round trip.

A decision lost with an env worker that died (`vlapt.envs.pools`) is marked invalid: it
carries no reward, ends its episode, and its advantage is zero, so it is never learned from;
the partial episode is counted in ``lost_episodes`` and dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from vlapt.interfaces import ChunkPolicy, EnvPool, Episode, stack_observations


@dataclasses.dataclass
class RolloutBatch:
    images: np.ndarray  # (T, S, H, W, 3) uint8
    proprio: np.ndarray  # (T, S, P)
    instructions: list[str]  # (S,) each slot's instruction (a slot runs one task)
    tasks: list[str]  # (S,) each slot's task
    actions: np.ndarray  # (T, S, h, A) chunks as sampled, in the policy's own action space
    log_probs: np.ndarray  # (T, S) of each chunk
    values: np.ndarray  # (T, S)
    rewards: np.ndarray  # (T, S) sum_j gamma^j r_j over executed steps (+ truncation bootstrap)
    discounts: np.ndarray  # (T, S) gamma ** steps executed
    dones: np.ndarray  # (T, S) the episode ended with this decision
    steps: np.ndarray  # (T, S) env steps executed
    last_values: np.ndarray  # (S,) value of the observation after the last decision
    valid: np.ndarray  # (T, S) False where a decision was lost with its env worker

    def observations(self, rows: np.ndarray) -> dict:
        """The flat decisions ``rows`` (indices into T * S, slot-major within a step) as an observation batch."""
        T, S = self.rewards.shape
        images = self.images.reshape(T * S, *self.images.shape[2:])
        proprio = self.proprio.reshape(T * S, -1)
        return {"image": images[rows], "proprio": proprio[rows], "instruction": [self.instructions[r % S] for r in rows]}


class _Trajectory:
    """What one slot saw and sent in its episode so far."""

    def __init__(self) -> None:
        self.observations: list[dict] = []
        self.actions: list[np.ndarray] = []

    def episode(self, task: str, instruction: str, success: bool, steps: int, index: int) -> Episode:
        episode = Episode(task=task, instruction=instruction, success=success, steps=steps, split="train",
                          config_index=index, source="policy")
        return episode.record(self.observations, self.actions) if success else episode


class ChunkedRollout:
    def __init__(self, pool: EnvPool, tasks: Sequence[str], gamma: float, chunk_len: int,
                 start_index: dict[str, int] | None = None, groups: int = 2):
        self.pool = pool
        self.tasks = list(tasks)
        self.gamma = gamma
        self.chunk_len = chunk_len
        self.groups = pool.groups(groups)
        # The next training configuration index not yet handed to any slot, per task.
        self.next_index = dict(start_index or {t: 0 for t in set(tasks)})
        self.lost_episodes = 0
        self.observations: dict[int, dict] = {}
        self._reserved: dict[int, dict] = {}  # slot -> reset options of its next episode
        self._index: dict[int, int] = {}  # slot -> configuration index of its episode in flight
        self._trajectories: dict[int, _Trajectory] = {}
        self.reset_all()

    def reset_all(self) -> None:
        slots = range(len(self.tasks))
        requests = self._next_configs(slots)
        self.observations = {i: obs for i, (obs, _) in self.pool.reset(requests).items()}
        self._index = {i: requests[i]["index"] for i in slots}
        self._reserved = self._next_configs(slots)
        self._trajectories = {i: _Trajectory() for i in slots}

    def _next_configs(self, slots) -> dict[int, dict]:
        requests = {}
        for i in slots:
            task = self.tasks[i]
            requests[i] = {"split": "train", "index": self.next_index[task]}
            self.next_index[task] += 1
        return requests

    def collect(self, policy: ChunkPolicy, horizon: int, generator=None) -> tuple[RolloutBatch, list[Episode]]:
        S = len(self.tasks)
        first = self.observations[0]
        H, W, _ = first["image"].shape
        P = first["proprio"].shape[0]
        images = np.zeros((horizon, S, H, W, 3), np.uint8)
        proprio = np.zeros((horizon, S, P), np.float32)
        actions = np.zeros((horizon, S, self.chunk_len, policy.action_dim), np.float32)
        log_probs = np.zeros((horizon, S), np.float32)
        values = np.zeros((horizon, S), np.float32)
        rewards = np.zeros((horizon, S), np.float32)
        discounts = np.zeros((horizon, S), np.float32)
        dones = np.zeros((horizon, S), bool)
        steps = np.zeros((horizon, S), np.int32)
        valid = np.ones((horizon, S), bool)
        instructions = [self.observations[i]["instruction"] for i in range(S)]
        finished: list[Episode] = []
        seen: dict[int, dict] = {}  # slot -> the observation its in-flight chunk was chosen on
        sent: dict[int, np.ndarray] = {}  # slot -> the chunk in flight, in env units as sent

        def decide(t: int, group: list[int]):
            obs = [self.observations[i] for i in group]
            sample = policy.act(stack_observations(obs), deterministic=False, generator=generator)
            chosen = np.asarray(sample.actions)
            for k, i in enumerate(group):
                images[t, i], proprio[t, i] = obs[k]["image"], obs[k]["proprio"]
                actions[t, i], log_probs[t, i], values[t, i] = chosen[k], sample.log_prob[k], sample.value[k]
                seen[i], sent[i] = obs[k], sample.env_actions[k]
            return self.pool.submit({i: sent[i] for i in group}, {i: self._reserved[i] for i in group})

        pending = [decide(0, group) for group in self.groups]
        for t in range(horizon):
            for g, group in enumerate(self.groups):
                results = self.pool.wait(pending[g])
                truncated_slots, terminal_obs = [], []
                for i in group:
                    r = results[i]
                    trajectory = self._trajectories[i]
                    if r.info.get("lost"):  # no outcome to learn from: zero advantage, the episode dropped
                        valid[t, i], dones[t, i], rewards[t, i] = False, True, values[t, i]
                        self.lost_episodes += 1
                        self._start_next_episode(i, r.reset_observation)
                        continue
                    n = int(r.info["steps"])
                    steps[t, i] = n
                    rewards[t, i] = float(np.sum(r.info["rewards"] * self.gamma ** np.arange(n)))
                    discounts[t, i] = self.gamma**n
                    trajectory.observations.append(seen[i])
                    trajectory.actions.append(sent[i][:n])
                    self.observations[i] = r.observation
                    if r.terminated or r.truncated:
                        dones[t, i] = True
                        if r.truncated and not r.terminated:
                            truncated_slots.append(i)
                            terminal_obs.append(r.observation)
                        finished.append(trajectory.episode(self.tasks[i], seen[i]["instruction"], bool(r.terminated),
                                                           int(r.info["episode_steps"]), self._index[i]))
                        self._start_next_episode(i, r.reset_observation)
                if truncated_slots:  # a time limit is not a task end: bootstrap from the last observation
                    for i, b in zip(truncated_slots, policy.value(stack_observations(terminal_obs))):
                        rewards[t, i] += discounts[t, i] * float(b)
                if t + 1 < horizon:
                    pending[g] = decide(t + 1, group)
        last_values = policy.value(stack_observations([self.observations[i] for i in range(S)]))
        batch = RolloutBatch(images, proprio, instructions, self.tasks, actions, log_probs, values, rewards,
                             discounts, dones, steps, last_values, valid)
        return batch, finished

    def _start_next_episode(self, slot: int, first_observation: dict) -> None:
        self.observations[slot] = first_observation
        self._index[slot] = self._reserved[slot]["index"]
        self._reserved.update(self._next_configs([slot]))
        self._trajectories[slot] = _Trajectory()
