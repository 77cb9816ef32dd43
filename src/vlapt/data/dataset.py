"""Demonstrations as a torch dataset of (observation, action chunk) samples.

Every step t of every episode is a sample: the observation at t and the actions t..t+h-1
(`vlapt.data.chunks.chunk_targets`: past the episode's end a chunk is padded, and
``action_pad`` flags the padding for the losses).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vlapt.data.chunks import chunk_targets
from vlapt.data.format import RELABELLED, read_episodes
from vlapt.interfaces import Episode


class ChunkDataset(Dataset):
    def __init__(self, episodes: Sequence[Episode], chunk_len: int, relabelled_label_steps: int = 0):
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
        # The privileged state, where every episode has it: never a policy input, only a
        # training target (SFT's auxiliary state prediction).
        self.states = (np.concatenate([e.states for e in episodes]).astype(np.float32)
                       if all(e.states is not None for e in episodes) else None)
        self.instructions = [e.instruction for e in episodes]
        self.episode_of = np.repeat(np.arange(len(episodes)), lengths)
        parts = [chunk_targets(e.actions, np.arange(len(e)), chunk_len) for e in episodes]
        self.targets = np.concatenate([targets for targets, _ in parts])  # (N, h, A) the chunk each sample imitates
        self.action_pad = np.concatenate([pad for _, pad in parts])
        if relabelled_label_steps > 0:
            relabelled = np.repeat([e.source == RELABELLED for e in episodes], lengths)
            self.action_pad |= relabelled[:, None] & (np.arange(chunk_len)[None] >= relabelled_label_steps)

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
