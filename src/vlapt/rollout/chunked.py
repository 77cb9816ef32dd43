"""Fixed-horizon chunked rollouts for on-policy RL.

Every slot (a task's env in a worker) makes ``horizon`` decisions per iteration; one
decision samples a whole action chunk, which the env executes until it ends or the task
succeeds. Episodes carry over between iterations (as in CleanRL) and each new episode
takes the task's next *training* configuration. For each decision the buffer keeps what
chunk-level PPO needs: the chunk's discounted reward over the steps actually executed, the
discount ``gamma ** steps`` to the next decision, and episode ends (with the value of the
last observation folded into the reward at a time-limit truncation, which is not a real
end of the task). With ``shaping_coef`` c > 0 the chunk's reward also gets
c * (gamma^n * phi(end) - phi(start)), potential-based shaping from MetaWorld's dense reward
(`MetaWorldVLAEnv.potential`): it telescopes over an episode, so it changes no optimal policy
of the sparse task, but it tells the critic which chunks made progress in episodes that fail.

The slots are stepped in ``groups`` (two by default): while the workers execute one group's
chunks, the policy computes the next chunks of the other, so neither waits for the other.
Each slot holds its next training configuration in reserve and the worker resets to it as
soon as an episode ends, so a reset never costs a separate round trip.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from vlapt.data.demo_buffer import BufferEpisode
from vlapt.envs.vector import EnvPool

# act(observations) -> (normalised chunks (B, h, A), executed chunks (B, h, A), log_probs (B,), values (B,)).
# The executed chunks are in the raw action space, as sent to the env (which clips them to [-1, 1]); a success's
# BC samples hold them as they were sent
ActFn = Callable[[list[dict]], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
ValueFn = Callable[[list[dict]], np.ndarray]


@dataclasses.dataclass
class RolloutBatch:
    images: np.ndarray  # (T, S, H, W, 3) uint8
    proprio: np.ndarray  # (T, S, P)
    tasks: list[str]  # (S,) task of each slot
    actions: np.ndarray  # (T, S, h, A) normalised chunks as sampled
    log_probs: np.ndarray  # (T, S)
    values: np.ndarray  # (T, S)
    rewards: np.ndarray  # (T, S) sum_j gamma^j r_j over executed steps (+ truncation bootstrap)
    discounts: np.ndarray  # (T, S) gamma ** steps executed
    dones: np.ndarray  # (T, S) the episode ended with this decision
    steps: np.ndarray  # (T, S) env steps executed
    last_values: np.ndarray  # (S,) value of the observation after the last decision


@dataclasses.dataclass
class FinishedEpisode:
    task: str
    success: bool
    steps: int
    trajectory: BufferEpisode | None  # BC samples of a successful episode
    # discounted return of the episode from its first decision, and the critic's value of that decision's
    # observation when it was taken (their difference is what the buffer's "advantage" admission compares)
    episode_return: float = 0.0
    first_value: float = float("nan")
    # the scripted expert's steps to success on the same configuration (envs with expert_reference; else NaN)
    reference_steps: float = float("nan")


class ChunkedRollout:
    def __init__(self, pool: EnvPool, tasks: Sequence[str], gamma: float, chunk_len: int,
                 start_index: dict[str, int] | None = None, groups: int = 2, shaping_coef: float = 0.0):
        self.pool = pool
        self.shaping_coef = shaping_coef
        self.tasks = list(tasks)
        self.gamma = gamma
        self.chunk_len = chunk_len
        self.groups = pool.groups(groups)
        # The next training configuration index not yet handed to any slot, per task.
        self.next_index = dict(start_index or {t: 0 for t in set(tasks)})
        self.observations: dict[int, dict] = {}
        self._reserved: dict[int, dict] = {}  # slot -> reset options of its next episode
        self._trajectories: dict[int, list] = {}
        self._returns: dict[int, list[float]] = {}  # slot -> [discounted return so far, discount to the next chunk, V(s_0)]
        self.reset_all()

    def reset_all(self) -> None:
        slots = range(len(self.tasks))
        self.observations = {i: obs for i, (obs, _) in self.pool.reset(self._next_configs(slots)).items()}
        self._reserved = self._next_configs(slots)
        self._trajectories = {i: [] for i in slots}
        self._returns = {i: [0.0, 1.0, float("nan")] for i in slots}

    def _next_configs(self, slots) -> dict[int, dict]:
        requests = {}
        for i in slots:
            task = self.tasks[i]
            requests[i] = {"split": "train", "index": self.next_index[task]}
            self.next_index[task] += 1
        return requests

    def collect(self, act: ActFn, value: ValueFn, horizon: int) -> tuple[RolloutBatch, list[FinishedEpisode]]:
        S = len(self.tasks)
        first = self.observations[0]
        H, W, _ = first["image"].shape
        P = first["proprio"].shape[0]
        images = np.zeros((horizon, S, H, W, 3), np.uint8)
        proprio = np.zeros((horizon, S, P), np.float32)
        actions = np.zeros((horizon, S, self.chunk_len, 4), np.float32)
        log_probs = np.zeros((horizon, S), np.float32)
        values = np.zeros((horizon, S), np.float32)
        rewards = np.zeros((horizon, S), np.float32)
        discounts = np.zeros((horizon, S), np.float32)
        dones = np.zeros((horizon, S), bool)
        steps = np.zeros((horizon, S), np.int32)
        finished: list[FinishedEpisode] = []
        seen: dict[int, dict] = {}  # slot -> the observation its in-flight chunk was chosen on
        executed_chunks: dict[int, np.ndarray] = {}

        def decide(t: int, group: list[int]):
            obs = [self.observations[i] for i in group]
            normalised, executed, logp, v = act(obs)
            for k, i in enumerate(group):
                images[t, i], proprio[t, i] = obs[k]["image"], obs[k]["proprio"]
                actions[t, i], log_probs[t, i], values[t, i] = normalised[k], logp[k], v[k]
                seen[i], executed_chunks[i] = obs[k], executed[k]
                if not self._trajectories[i]:  # the episode's first decision
                    self._returns[i][2] = float(v[k])
            return self.pool.submit_step({i: executed_chunks[i] for i in group}, {i: self._reserved[i] for i in group})

        pending = [decide(0, group) for group in self.groups]
        for t in range(horizon):
            for g, group in enumerate(self.groups):
                results = pending[g].wait()
                truncated_slots, terminal_obs = [], []
                for i in group:
                    r, reset_observation = results[i]
                    n = int(r.info["steps"])
                    steps[t, i] = n
                    rewards[t, i] = float(np.sum(r.info["rewards"] * self.gamma ** np.arange(n)))
                    discounts[t, i] = self.gamma**n
                    if self.shaping_coef:
                        rewards[t, i] += self.shaping_coef * (discounts[t, i] * r.info["potential_end"] - r.info["potential_start"])
                    self._trajectories[i].append((seen[i]["image"], seen[i]["proprio"], executed_chunks[i][:n]))
                    running = self._returns[i]
                    running[0] += running[1] * float(rewards[t, i])
                    running[1] *= float(discounts[t, i])
                    self.observations[i] = r.observation
                    if r.terminated or r.truncated:
                        dones[t, i] = True
                        if r.truncated and not r.terminated:
                            truncated_slots.append(i)
                            terminal_obs.append(r.observation)
                        finished.append(self._finish(i, bool(r.terminated), int(r.info["episode_steps"]),
                                                     float(r.info.get("reference_steps", np.nan))))
                        self.observations[i] = reset_observation
                        self._reserved.update(self._next_configs([i]))
                if truncated_slots:  # a time limit is not a task end: bootstrap from the last observation
                    for i, b in zip(truncated_slots, value(terminal_obs)):
                        rewards[t, i] += discounts[t, i] * float(b)
                if t + 1 < horizon:
                    pending[g] = decide(t + 1, group)
        last_values = value([self.observations[i] for i in range(S)])
        batch = RolloutBatch(images, proprio, self.tasks, actions, log_probs, values, rewards, discounts, dones, steps, last_values)
        return batch, finished

    def _finish(self, slot: int, success: bool, episode_steps: int, reference_steps: float) -> FinishedEpisode:
        trajectory = self._trajectories[slot]
        self._trajectories[slot] = []
        episode_return, _, first_value = self._returns[slot]
        self._returns[slot] = [0.0, 1.0, float("nan")]
        samples = None
        if success:
            h = self.chunk_len
            chunk_actions = np.zeros((len(trajectory), h, 4), np.float32)
            pad = np.ones((len(trajectory), h), bool)
            for k, (_, _, executed) in enumerate(trajectory):
                n = len(executed)
                chunk_actions[k, :n] = executed
                chunk_actions[k, n:] = executed[-1]
                pad[k, :n] = False
            samples = BufferEpisode(
                task=self.tasks[slot], length=episode_steps,
                images=np.stack([im for im, _, _ in trajectory]), proprio=np.stack([p for _, p, _ in trajectory]),
                actions=chunk_actions, pad=pad, source="self", advantage=episode_return - first_value,
                reference_steps=reference_steps,
            )
        return FinishedEpisode(self.tasks[slot], success, episode_steps, samples, episode_return, first_value,
                               reference_steps)


def chunk_gae(
    rewards: np.ndarray, values: np.ndarray, discounts: np.ndarray, dones: np.ndarray, last_values: np.ndarray, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """GAE over decisions, with a per-decision discount ``gamma ** steps``.

    delta_k = R_k + gamma^{n_k} V(s_{k+1}) (1 - done_k) - V(s_k)
    A_k     = delta_k + gamma^{n_k} lambda (1 - done_k) A_{k+1}
    Returns (advantages, returns) shaped like ``rewards`` ((T,) or (T, S)).
    """
    T = len(rewards)
    advantages = np.zeros_like(rewards, dtype=np.float64)
    next_adv = np.zeros_like(last_values, dtype=np.float64)
    next_value = np.asarray(last_values, dtype=np.float64)
    for t in reversed(range(T)):
        cont = 1.0 - dones[t].astype(np.float64)
        delta = rewards[t] + discounts[t] * next_value * cont - values[t]
        next_adv = delta + discounts[t] * lam * cont * next_adv
        advantages[t] = next_adv
        next_value = values[t]
    return advantages.astype(np.float32), (advantages + values).astype(np.float32)
