"""The image-encoder base class every vision backbone of the VLA policy can build on (`vlapt.policies.vla.network`)."""

from __future__ import annotations

import torch
from torch import nn


class VisionEncoder(nn.Module):
    """An image encoder split at its frozen part: ``forward(image) = tokens(features(image))``.

    ``features`` runs the part that ``vision_trainable`` freezes (nothing when everything trains),
    ``tokens`` the rest. While `cacheable` holds (the frozen part is non-empty and none of its
    parameters needs a gradient) the policy may store ``features`` per image and skip recomputing
    them (`vlapt.policies.vla.features.FeatureCache`). The frozen part always runs in eval mode, so
    its output does not depend on whether the policy is training (no dropout, fixed norm statistics).
    """

    num_tokens: int
    trainable: str = "all"

    def features(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.tokens(self.features(image))

    def frozen_modules(self) -> list[nn.Module]:
        """The modules ``features`` runs with weights (empty when everything trains)."""
        raise NotImplementedError

    def set_trainable(self, mode: str) -> None:
        """Freeze the encoder to ``mode`` ("all", "none" or "last_<k>"); subclasses decide what a block is."""
        raise NotImplementedError

    def cacheable(self) -> bool:
        modules = self.frozen_modules()
        return bool(modules) and not any(p.requires_grad for m in modules for p in m.parameters())

    def train(self, mode: bool = True) -> "VisionEncoder":
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self
