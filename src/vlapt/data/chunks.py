"""Action chunks as behaviour-cloning targets: the one place they are cut from an episode."""

from __future__ import annotations

import numpy as np


def chunk_targets(actions: np.ndarray, starts: np.ndarray, chunk_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The chunk of ``chunk_len`` actions that follows each start step, and which entries are padding.

    ``actions`` ``(T, A)`` are an episode's per-step actions and ``starts`` ``(N,)`` the steps
    where a chunk begins (every step for demonstrations, each decision for a chunked policy).
    Returns ``targets`` ``(N, chunk_len, A)`` and ``pad`` ``(N, chunk_len)``: past the episode's end
    a chunk repeats its last action, and ``pad`` marks those entries, which losses ignore (the
    episode ended in success, so there is nothing to imitate after it).
    """
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    actions = np.asarray(actions, dtype=np.float32)
    if len(actions) == 0:
        raise ValueError("an episode with no actions has no chunks")
    idx = np.asarray(starts)[:, None] + np.arange(chunk_len)[None]
    pad = idx >= len(actions)
    return actions[np.minimum(idx, len(actions) - 1)], pad
