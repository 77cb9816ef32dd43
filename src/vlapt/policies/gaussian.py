"""The diagonal Gaussian over an action chunk: the likelihood chunked PPO and self-BC need, in one place.

Families whose chunk distribution is a diagonal Gaussian (a mean per action entry, a learned
log standard deviation) share these; `mean`, `log_std` and `actions` are ``(B, h, A)`` in the
family's normalised action space, and everything is computed in the dtype of ``mean``.

`GaussianChunkPolicy` is the base of such families (vlapt's VLA, LeRobot's ACT): a family writes
its network (`make_batch`, `forward` returning a `GaussianChunk`), its action normalisation, its
observation config and `save`; sampling, scoring, values, behaviour cloning and exploration come
from here, the same for every family.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch
from torch import nn

from vlapt.interfaces import BCLoss, ChunkEvaluation, ChunkSample
from vlapt.policies.base import ChunkPolicyBase

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def chunk_log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Log-density of whole chunks ``(B,)``: the sum over the ``h * A`` entries."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - LOG_SQRT_2PI).sum(dim=(-2, -1))


def chunk_entropy(log_std: torch.Tensor) -> torch.Tensor:
    return (log_std + 0.5 + LOG_SQRT_2PI).sum(dim=(-2, -1))


def chunk_nll(mean: torch.Tensor, log_std: torch.Tensor, target: torch.Tensor,
              pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Behaviour cloning of ``target`` chunks: the mean per-entry NLL over entries not marked in ``pad`` ``(B, h)``
    (trains the mean and a calibrated std), and the squared error of the mean (detached, for logs)."""
    valid = (~pad).unsqueeze(-1).float().expand_as(target)
    count = valid.sum().clamp_min(1.0)
    sq = (mean - target).square()
    mse = (sq * valid).sum() / count
    log_var = 2.0 * log_std
    nll = 0.5 * sq * torch.exp(-log_var) + 0.5 * log_var + LOG_SQRT_2PI
    return (nll * valid).sum() / count, mse.detach()


class GaussianChunk(NamedTuple):
    """What a Gaussian family's ``forward`` returns for a batch of B observations."""

    mean: torch.Tensor  # (B, h, A) in the normalised action space, float32
    log_std: torch.Tensor  # (B, h, A), already clamped (`GaussianChunkPolicy.clamped_log_std`)
    value: torch.Tensor  # (B,) the critic's value, float32
    features: torch.Tensor | None  # (B, d) what the action head reads (SFT's auxiliary state loss), or None


class GaussianChunkPolicy(ChunkPolicyBase):
    """A `ChunkPolicy` whose chunk is a diagonal Gaussian with a learned, state-independent log-std.

    A subclass provides:

    - ``log_std``, an ``nn.Parameter`` of shape ``(chunk_len, action_dim)``, and ``value_head``, the
      module holding the critic's own parameters (the optimiser's "critic" group);
    - ``min_log_std`` and ``max_log_std``, the bounds `clamped_log_std` keeps the std within;
    - ``make_batch(observations)``, raw observations to the network's input, and
      ``forward(batch) -> GaussianChunk`` (its ``log_std`` from `clamped_log_std`);
    - ``normalize_actions`` / ``unnormalize_actions`` between env units and the Gaussian's space;
    - ``chunk_len``, ``action_dim``, ``observation_config`` and ``save`` (see `ChunkPolicyBase`).
    """

    log_std: nn.Parameter
    value_head: nn.Module
    min_log_std: float
    max_log_std: float

    chunk_log_prob = staticmethod(chunk_log_prob)
    chunk_entropy = staticmethod(chunk_entropy)

    # -- to implement ------------------------------------------------------------------------------
    def make_batch(self, observations: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def forward(self, batch: Any) -> GaussianChunk:
        raise NotImplementedError

    def normalize_actions(self, actions):
        raise NotImplementedError

    def unnormalize_actions(self, actions):
        raise NotImplementedError

    # -- the distribution --------------------------------------------------------------------------
    def clamped_log_std(self) -> torch.Tensor:
        return self.log_std.clamp(self.min_log_std, self.max_log_std)

    def _scored_steps(self, steps: int) -> int:
        if not 0 <= steps <= self.chunk_len:
            raise ValueError(f"steps must be in [0, {self.chunk_len}] (0: the whole chunk), got {steps}")
        return steps or self.chunk_len

    # -- the ChunkPolicy interface -----------------------------------------------------------------
    def act(self, observations, deterministic: bool = False, generator: torch.Generator | None = None) -> ChunkSample:
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                out = self(self.make_batch(observations))
                if deterministic:
                    actions = out.mean
                else:
                    noise = torch.randn(out.mean.shape, generator=generator, dtype=out.mean.dtype,
                                        device=generator.device if generator is not None else out.mean.device)
                    actions = out.mean + noise.to(out.mean.device) * out.log_std.exp()
                log_prob = self.chunk_log_prob(out.mean, out.log_std, actions)
                env_actions = self.unnormalize_actions(actions)
        finally:
            self.train(was_training)
        return ChunkSample(actions.cpu(), env_actions.cpu().numpy(), log_prob.cpu().numpy(), out.value.cpu().numpy())

    def evaluate(self, observations, actions: torch.Tensor, steps: int = 0) -> ChunkEvaluation:
        out = self(self.make_batch(observations))
        if actions.shape != out.mean.shape:
            raise ValueError(f"actions must have shape (B, chunk_len, action_dim) = {tuple(out.mean.shape)}, "
                             f"got {tuple(actions.shape)}")
        k = self._scored_steps(steps)
        actions = actions.to(out.mean.device, out.mean.dtype)
        log_prob = self.chunk_log_prob(out.mean[:, :k], out.log_std[:, :k], actions[:, :k])
        return ChunkEvaluation(log_prob, self.chunk_entropy(out.log_std[:, :k]), out.value)

    def value(self, observations) -> np.ndarray:
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self(self.make_batch(observations)).value.cpu().numpy()
        finally:
            self.train(was_training)

    def bc_loss(self, observations, actions: torch.Tensor, pad: torch.Tensor) -> BCLoss:
        """Chunk Gaussian NLL of env-unit chunks (trains the mean and a calibrated std), padding masked out."""
        out = self(self.make_batch(observations))
        actions, pad = torch.as_tensor(actions), torch.as_tensor(pad)
        if actions.shape != out.mean.shape or pad.shape != actions.shape[:2]:
            raise ValueError(f"BC targets must be chunks of shape (B, chunk_len, action_dim) = {tuple(out.mean.shape)} "
                             f"with a (B, chunk_len) padding mask, got {tuple(actions.shape)} and {tuple(pad.shape)}")
        target = self.normalize_actions(actions.to(out.mean.device, out.mean.dtype))
        loss, mse = chunk_nll(out.mean, out.log_std, target, pad.to(out.mean.device))
        return BCLoss(loss, mse, out.features)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The trained parameters (frozen ones are left out): the value head's, and the rest."""
        critic = [p for p in self.value_head.parameters() if p.requires_grad]
        ids = {id(p) for p in critic}
        return {"actor": [p for p in self.parameters() if p.requires_grad and id(p) not in ids], "critic": critic}

    def reset_exploration(self, log_std: float) -> None:
        with torch.no_grad():
            self.log_std.fill_(log_std)

    def exploration_std(self) -> float:
        return float(self.clamped_log_std().detach().exp().mean())
