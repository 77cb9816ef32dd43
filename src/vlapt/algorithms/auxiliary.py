"""The auxiliary state head: regress privileged simulator state from the features the action head reads.

Training only (SFT, and GRPO's rollouts with ``aux_state_coef > 0``): the head lives in training
checkpoints under ``aux.``, never in a saved policy, and the policy never sees the state. Its
targets are normalised with the mean and std of the demonstrations' states, so one coefficient
weighs every entry alike.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

PREFIX = "aux."  # the head's tensors in a training checkpoint


class StatePredictionHead(nn.Module):
    """Action readout features -> chosen privileged state entries, normalised."""

    def __init__(self, d_model: int, dims: list[int], mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.register_buffer("dims", torch.tensor(dims, dtype=torch.long))
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.net = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, len(dims)))

    @classmethod
    def for_states(cls, d_model: int, dims: list[int], states: np.ndarray) -> "StatePredictionHead":
        """A head whose targets are normalised by the statistics of ``states`` ``(N, S)``."""
        targets = np.asarray(states)[:, dims]
        return cls(d_model, dims, targets.mean(0), np.maximum(targets.std(0), 1e-3))

    def loss(self, features: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        target = (state[:, self.dims] - self.mean) / self.std
        return (self.net(features) - target).square().mean()

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {PREFIX + k: v.detach().cpu() for k, v in self.state_dict().items()}


def checkpointed_head(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head's state dict from a training checkpoint's tensors (empty when the run had no head)."""
    return {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
