"""The diagonal Gaussian over an action chunk: the likelihood chunked PPO and self-BC need, in one place.

Families whose chunk distribution is a diagonal Gaussian (a mean per action entry, a learned
log standard deviation) share these; `mean`, `log_std` and `actions` are ``(B, h, A)`` in the
family's normalised action space, and everything is computed in the dtype of ``mean``.
"""

from __future__ import annotations

import math

import torch

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def chunk_log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor, per_step: bool = False) -> torch.Tensor:
    """Log-density of whole chunks ``(B,)``: the sum over the ``h * A`` entries; ``per_step``: of each action, ``(B, h)``."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - LOG_SQRT_2PI).sum(dim=-1 if per_step else (-2, -1))


def chunk_entropy(log_std: torch.Tensor, per_step: bool = False) -> torch.Tensor:
    return (log_std + 0.5 + LOG_SQRT_2PI).sum(dim=-1 if per_step else (-2, -1))


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
