"""Demonstrations as a torch dataset of (observation, action chunk) samples.

Every step t of every episode is a sample: the observation at t and the actions t..t+h-1
(or, in relabelled episodes that store one, the expert's plan from t). Chunks that run past
the episode's end are padded with the last action and flagged in ``action_pad`` so losses
can ignore the padding (the episode ended in success, so there is nothing to imitate after it).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vlapt.data.format import RELABELLED, EpisodeData, read_episodes


class ChunkDataset(Dataset):
    def __init__(self, episodes: Sequence[EpisodeData], chunk_len: int, relabelled_label_steps: int = 0):
        """``relabelled_label_steps`` > 0: in relabelled episodes (`vlapt relabel`) only the first
        that many actions of each chunk are targets. The first is the expert's choice at the state
        the policy decided in; later ones react to the policy's own open-loop actions, which the
        observation at the decision cannot show."""
        if chunk_len < 1:
            raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
        if not episodes:
            raise ValueError("no episodes given")
        self.chunk_len = chunk_len
        self.episodes = list(episodes)
        self.images = np.concatenate([e.images for e in episodes])
        self.proprio = np.concatenate([e.proprio for e in episodes]).astype(np.float32)
        self.actions = np.concatenate([e.actions for e in episodes]).astype(np.float32)
        lengths = np.array([len(e) for e in episodes])
        self.episode_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
        self.episode_end = np.repeat(np.cumsum(lengths), lengths)  # exclusive
        # MetaWorld's privileged state, where every episode has it: never a policy input, only a
        # training target (SFT's auxiliary state prediction).
        self.states = (np.concatenate([e.states for e in episodes]).astype(np.float32)
                       if all(e.states is not None for e in episodes) else None)
        self.instructions = [e.instruction for e in episodes]
        self.episode_of = np.repeat(np.arange(len(episodes)), lengths)
        offsets = np.arange(chunk_len)
        idx = np.arange(len(self.actions))[:, None] + offsets[None]
        self.action_pad = idx >= self.episode_end[:, None]
        if relabelled_label_steps > 0:
            relabelled = np.repeat([e.source == RELABELLED for e in episodes], lengths)
            self.action_pad |= relabelled[:, None] & (offsets[None] >= relabelled_label_steps)
        # (N, h, 4) the chunk each sample imitates; indices past the episode's end repeat its last action
        self.targets = self.actions[np.minimum(idx, self.episode_end[:, None] - 1)]
        self._use_plans(episodes, lengths)

    def _use_plans(self, episodes: Sequence[EpisodeData], lengths: np.ndarray) -> None:
        """Where an episode stores the expert's plan for a step (`vlapt relabel labels=plan`), that
        plan is the whole target chunk: actions the expert chose itself from that very state, so
        every step of the chunk is a consistent label; padding marks what the plan lacks."""
        h, starts = self.chunk_len, np.cumsum(lengths) - lengths
        for episode, start in zip(episodes, starts):
            if episode.action_plans is None:
                continue
            for t in np.flatnonzero(episode.plan_lengths > 0):
                n = min(int(episode.plan_lengths[t]), h, episode.action_plans.shape[1])
                row = start + t
                self.targets[row, :n] = episode.action_plans[t, :n]
                self.targets[row, n:] = episode.action_plans[t, n - 1]
                self.action_pad[row] = np.arange(h) >= n

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, chunk_len: int, tasks: Sequence[str] | None = None, demos_per_task: int | None = None
    ) -> "ChunkDataset":
        return cls(read_episodes(path, tasks, demos_per_task), chunk_len)

    def __len__(self) -> int:
        return len(self.actions)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": torch.from_numpy(self.images[i]),
            "proprio": torch.from_numpy(self.proprio[i]),
            "instruction": self.instructions[self.episode_of[i]],
            "actions": torch.from_numpy(self.targets[i]),
            "action_pad": torch.from_numpy(self.action_pad[i]),
        }

    def batch(self, indices: np.ndarray) -> dict:
        """A whole batch by fancy indexing: much faster than collating single samples."""
        batch = {
            "image": torch.from_numpy(self.images[indices]),
            "proprio": torch.from_numpy(self.proprio[indices]),
            "instruction": [self.instructions[e] for e in self.episode_of[indices]],
            "actions": torch.from_numpy(self.targets[indices]),
            "action_pad": torch.from_numpy(self.action_pad[indices]),
        }
        if self.states is not None:
            batch["state"] = torch.from_numpy(self.states[indices])
        return batch

    def statistics(self) -> dict[str, list[float]]:
        """Per-dimension mean/std of proprioception and actions, for the policy's normalisation."""
        eps = 1e-3
        return {
            "proprio_mean": self.proprio.mean(0).tolist(),
            "proprio_std": np.maximum(self.proprio.std(0), eps).tolist(),
            "action_mean": self.actions.mean(0).tolist(),
            "action_std": np.maximum(self.actions.std(0), eps).tolist(),
        }
