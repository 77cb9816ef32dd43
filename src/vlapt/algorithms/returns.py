"""Returns and advantages over decisions that each executed several env steps."""

from __future__ import annotations

import numpy as np


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
