"""Inference: from environment observations to executable action chunks.

:func:`make_batch` is the one place raw observations become model inputs, so
training, rollouts and deployment preprocess identically. :class:`Policy` adds
what execution needs on top of :class:`VLAPolicy`: tokenisation, action
unnormalisation and clipping to the environment's bounds, and its own seeded
random generator so stochastic rollouts are reproducible without touching the
global torch RNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from vlapt.models.checkpoint import load_pretrained, save_pretrained
from vlapt.models.config import PolicyConfig
from vlapt.models.tokenizer import Tokenizer
from vlapt.models.vla import VLAPolicy


def make_batch(
    observations: Mapping[str, Any],
    tokenizer: Tokenizer,
    config: PolicyConfig | VLAPolicy,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Turn one observation or a batch of them into the tensor batch :class:`VLAPolicy` reads.

    ``observations`` holds ``"image"`` (uint8, ``(H, W, 3)`` or ``(B, H, W, 3)``),
    ``"proprio"`` (``(P,)`` or ``(B, P)``) and ``"instruction"`` (a str, shared by
    the whole batch, or a sequence of B strs). Shapes are checked against
    ``config`` so a wrong camera resolution or proprio layout fails loudly here
    rather than as a silent mis-prediction.
    """
    if isinstance(config, VLAPolicy):
        config = config.config
    if not isinstance(config, PolicyConfig):
        raise TypeError(
            "make_batch(observations, tokenizer, config, device): config must be a PolicyConfig or VLAPolicy, "
            f"got {type(config).__name__}"
        )
    missing = [key for key in ("image", "proprio", "instruction") if key not in observations]
    if missing:
        raise ValueError(f"observation is missing {missing}; expected keys 'image', 'proprio', 'instruction'")

    size, proprio_dim = config.image_size, config.proprio_dim
    image = np.asarray(observations["image"])
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[1:] != (size, size, 3):
        raise ValueError(
            f"observation 'image' must have shape ({size}, {size}, 3) or (B, {size}, {size}, 3), "
            f"got {image.shape}; render the '{config.camera}' camera at {size}x{size} RGB"
        )
    if image.dtype != np.uint8:
        raise ValueError(f"observation 'image' must be uint8 RGB in 0-255, got dtype {image.dtype}")
    batch_size = image.shape[0]

    proprio = np.asarray(observations["proprio"], dtype=np.float32)
    if proprio.ndim == 1:
        proprio = proprio[None]
    if proprio.shape != (batch_size, proprio_dim):
        raise ValueError(
            f"observation 'proprio' must have shape ({proprio_dim},) or (B, {proprio_dim}) with B={batch_size} "
            f"matching the images, got {np.asarray(observations['proprio']).shape} "
            f"(fields: {config.proprio_fields})"
        )

    instructions = observations["instruction"]
    if isinstance(instructions, str):
        instructions = [instructions] * batch_size
    else:
        instructions = [str(text) for text in np.asarray(instructions, dtype=object).reshape(-1)]
        if len(instructions) != batch_size:
            raise ValueError(f"got {len(instructions)} instructions for a batch of {batch_size} images")
    ids, mask = tokenizer.encode(instructions, config.max_instruction_tokens)

    return {
        "image": torch.from_numpy(np.ascontiguousarray(image)).to(device),
        "proprio": torch.from_numpy(np.ascontiguousarray(proprio)).to(device),
        "instruction_ids": ids.to(device),
        "instruction_mask": mask.to(device),
    }


class Policy:
    """A trained VLA policy ready to act: observations in, clipped action chunks out."""

    def __init__(
        self,
        model: VLAPolicy,
        tokenizer: Tokenizer | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ):
        self.device = _resolve_device(device)
        self.model = model.to(self.device)  # predict switches to eval mode per call, so a training model can be shared
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer(model.config.vocab)
        config_vocab = model.config.vocab
        if (config_vocab and self.tokenizer.vocab != config_vocab) or len(self.tokenizer) > model.config.vocab_size:
            raise ValueError(
                "tokenizer vocabulary does not match the policy config's vocab; "
                "use Tokenizer(policy.config.vocab) (or omit the tokenizer argument)"
            )
        self._generator = torch.Generator(device=self.device)
        self.seed(seed)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu", seed: int = 0) -> "Policy":
        return cls(load_pretrained(path, device="cpu"), device=device, seed=seed)

    def save_pretrained(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
        return save_pretrained(self.model, path, metadata=metadata)

    def seed(self, seed: int) -> None:
        """Restart the sampling noise stream; the same seed reproduces the same stochastic chunks."""
        self._generator.manual_seed(int(seed))

    @property
    def config(self) -> PolicyConfig:
        return self.model.config

    @property
    def chunk_len(self) -> int:
        return self.model.config.chunk_len

    @property
    def action_dim(self) -> int:
        return self.model.config.action_dim

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def camera(self) -> str:
        return self.model.config.camera

    def make_batch(self, observations: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return make_batch(observations, self.tokenizer, self.model.config, self.device)

    def predict(self, observation: Mapping[str, Any], deterministic: bool = True) -> np.ndarray:
        """Action chunk ``(chunk_len, action_dim)`` (float32, in [-1, 1]) for one observation."""
        image = np.asarray(observation.get("image")) if isinstance(observation, Mapping) else None
        if image is None or image.ndim != 3:
            shape = None if image is None else image.shape
            raise ValueError(
                f"predict takes a single observation with an (H, W, 3) image, got image shape {shape}; "
                "use predict_batch for batches"
            )
        return self.predict_batch(observation, deterministic=deterministic)[0]

    def predict_batch(self, observations: Mapping[str, Any], deterministic: bool = True) -> np.ndarray:
        """Action chunks ``(B, chunk_len, action_dim)`` (float32, in [-1, 1]) for a batch."""
        batch = self.make_batch(observations)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                actions, _, _ = self.model.sample(batch, deterministic=deterministic, generator=self._generator)
                actions = self.model.unnormalize_actions(actions).clamp_(-1.0, 1.0)
        finally:
            self.model.train(was_training)
        return actions.to("cpu", torch.float32).numpy()

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Policy(size={c.size!r}, params={self.model.num_parameters():,}, chunk_len={c.chunk_len}, "
            f"image_size={c.image_size}, camera={c.camera!r}, device={str(self.device)!r})"
        )


def load_policy(path: str | os.PathLike, device: str | torch.device = "cpu", seed: int = 0) -> Policy:
    """Load a checkpoint directory as a ready-to-act :class:`Policy`."""
    return Policy.from_pretrained(path, device=device, seed=seed)


def _resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use device='cpu'")
    return device
