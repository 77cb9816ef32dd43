"""A bounded cache of a frozen image encoder's features, keyed by the bytes of each image.

With a frozen encoder the same image always gives the same features, and post-training sees
each image many times: once when a rollout acts on it, again in every PPO epoch, and in self-BC
minibatches for as long as its trajectory stays in the buffer. The cache computes an image's
features the first time and hands out the stored copy after that, on any call path (``act``,
``evaluate``, ``bc_loss``, ``value``), so the policy's interface does not change.

Entries are keyed by a 128-bit BLAKE2 digest of the image's shape and bytes and evicted least
recently used once they exceed ``max_bytes``. The policy clears the cache whenever the frozen
weights could change (loading weights, moving devices, changing what is frozen).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch


class FeatureCache:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def stats(self) -> dict[str, float]:
        lookups = self.hits + self.misses
        return {"entries": len(self._entries), "megabytes": self.bytes / 2**20, "hits": self.hits,
                "misses": self.misses, "hit_rate": self.hits / lookups if lookups else float("nan")}

    def lookup(self, images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Features of ``images`` (B, ...): stored rows where known, ``compute(new images)`` for the rest.

        ``compute`` runs once on the batch of distinct unseen images, without gradients; what it
        returns is stored (and returned) as plain tensors, also when called under inference mode,
        so cached features can feed layers that are being trained.
        """
        array = images.detach().cpu().numpy()
        keys = [_key(row) for row in array]
        rows: list[torch.Tensor | None] = [None] * len(keys)
        pending: dict[bytes, list[int]] = {}
        for i, key in enumerate(keys):
            found = self._entries.get(key)
            if found is None:
                pending.setdefault(key, []).append(i)
            else:
                self._entries.move_to_end(key)
                rows[i] = found
                self.hits += 1
        if pending:
            first = [positions[0] for positions in pending.values()]
            with torch.inference_mode(False), torch.no_grad():
                computed = compute(images[first].clone())
            for (key, positions), feature in zip(pending.items(), computed):
                feature = feature.float().clone()  # its own float32 storage (whatever autocast computed it in)
                self.misses += len(positions)
                for i in positions:
                    rows[i] = feature
                self._store(key, feature)
        return torch.stack(rows)  # type: ignore[arg-type]

    def _store(self, key: bytes, feature: torch.Tensor) -> None:
        size = feature.numel() * feature.element_size()
        if size > self.max_bytes:
            return
        self._entries[key] = feature
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()


def _key(image: np.ndarray) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((image.shape, image.dtype.str)).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.digest()
