"""Group rollouts for critic-free policy gradients (GRPO, RLOO).

Every slot runs one complete episode; slots come in groups of ``group_size`` that share a
training configuration, so an episode's outcome can be compared with its group's (the baseline
a critic would otherwise give). For each decision the batch keeps what chunk-level policy
gradients need (observation, chunk, its log-likelihood, the env steps it ran, its episode);
successes come back as `Episode`s with their trajectory (the observation at each decision and
the actions sent to the env, before the env clips them), ready for a self-BC buffer.

An episode lost with an env worker that died (`vlapt.envs.pools`) is dropped: its decisions
leave the batch and its group goes on without it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vlapt.interfaces import ChunkPolicy, EnvPool, Episode, stack_observations


@dataclasses.dataclass
class GroupBatch:
    """Every decision of an iteration's episodes, and each episode's group and outcome."""

    observations: dict  # batched: image (N, H, W, 3), proprio (N, P), instruction list of N
    actions: np.ndarray  # (N, h, A) in the policy's action space
    log_probs: np.ndarray  # (N,)
    executed: np.ndarray  # (N,) env steps each chunk ran
    episode_of: np.ndarray  # (N,) the episode each decision belongs to
    env_steps: int  # every env step the iteration ran, those of episodes lost with an env worker included
    episodes: list[Episode]  # one per slot, with trajectories for successes (BC samples for the buffer)
    groups: list[list[int]]  # episode indices of each group (episodes lost with an env worker left out)


def run_groups(policy: ChunkPolicy, pool: EnvPool, slot_tasks: list[str], configurations: list[int],
               group_size: int, generator) -> GroupBatch:
    """Run one episode in every slot; slots ``g * group_size ... (g + 1) * group_size - 1`` share configuration g."""
    S = len(slot_tasks)
    if group_size < 1 or S % group_size or len(configurations) != S // group_size:
        raise ValueError(f"{S} slots make {S / max(group_size, 1):g} groups of {group_size}: give a whole number of "
                         f"groups and one configuration per group (got {len(configurations)})")
    requests = {i: {"split": "train", "index": configurations[i // group_size]} for i in range(S)}
    observations = {i: obs for i, (obs, _) in pool.reset(requests).items()}
    rows: dict[str, list] = {k: [] for k in ("image", "proprio", "instruction", "actions", "log_probs", "executed",
                                              "episode_of")}
    sent: dict[int, list] = {i: [] for i in range(S)}  # per slot: the env actions it sent, per decision
    seen: dict[int, list] = {i: [] for i in range(S)}
    outcome: dict[int, tuple[bool, int]] = {}
    active = list(range(S))
    while active:
        batch = stack_observations([observations[i] for i in active])
        sample = policy.act(batch, deterministic=False, generator=generator)
        results = pool.wait(pool.submit({i: sample.env_actions[k] for k, i in enumerate(active)}))
        still = []
        for k, i in enumerate(active):
            r = results[i]
            if r.info.get("lost"):  # its env worker died: the partial episode is dropped, never learned from
                outcome[i] = None
                continue
            n = int(r.info["steps"])
            rows["image"].append(batch["image"][k])
            rows["proprio"].append(batch["proprio"][k])
            rows["instruction"].append(batch["instruction"][k])
            rows["actions"].append(np.asarray(sample.actions[k]))
            rows["log_probs"].append(sample.log_prob[k])
            rows["executed"].append(n)
            rows["episode_of"].append(i)
            seen[i].append(observations[i])
            sent[i].append(sample.env_actions[k][:n])
            observations[i] = r.observation
            if r.terminated or r.truncated:
                outcome[i] = (bool(r.terminated), int(r.info["episode_steps"]))
            else:
                still.append(i)
        active = still
    lost = {i for i in range(S) if outcome[i] is None}
    keep = np.array([i not in lost for i in rows["episode_of"]], dtype=bool)
    episodes = []
    for i in range(S):
        success, steps = outcome[i] or (False, 0)
        episode = Episode(task=slot_tasks[i], instruction=seen[i][0]["instruction"] if seen[i] else "", success=success,
                          steps=steps, split="train", config_index=configurations[i // group_size], source="policy")
        episodes.append(episode.record(seen[i], sent[i]) if success else episode)
    def kept(name: str, dtype=None) -> np.ndarray:
        return np.asarray(rows[name], dtype=dtype)[keep]

    return GroupBatch(
        observations={"image": kept("image"), "proprio": kept("proprio"),
                      "instruction": [text for text, k in zip(rows["instruction"], keep) if k]},
        actions=kept("actions", np.float32), log_probs=kept("log_probs", np.float32),
        executed=kept("executed"), episode_of=kept("episode_of"),
        env_steps=int(np.sum(rows["executed"])), episodes=episodes,
        groups=[[e for e in range(g * group_size, (g + 1) * group_size) if e not in lost] for g in range(S // group_size)])
