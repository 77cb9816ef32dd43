"""What every policy family shares: inference (`predict`), input checks, and loading by path.

A family subclasses `ChunkPolicyBase` (a torch module implementing `vlapt.interfaces.ChunkPolicy`;
a family with a diagonal-Gaussian chunk, `vlapt.policies.gaussian.GaussianChunkPolicy`),
gives itself a ``policy_type`` name, writes its checkpoints with `vlapt.policies.checkpoint` and
registers a loader (`register_policy_type`); `load_policy(path)` then rebuilds it from its
directory, whatever the family.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from vlapt.interfaces import ChunkSample, EnvConfig, Observation, stack_observations

log = logging.getLogger("vlapt.policies")


class ChunkPolicyBase(nn.Module):
    """Shared behaviour of `ChunkPolicy` implementations: seeded sampling and the inference API.

    Subclasses implement ``act``, ``evaluate``, ``value``, ``bc_loss``, ``param_groups``,
    ``reset_exploration``, ``exploration_std``, ``observation_config``, ``save`` and set
    ``chunk_len`` / ``action_dim``; ``predict`` and ``predict_batch`` come from here.
    """

    policy_type = "base"
    chunk_len: int
    action_dim: int

    def __init__(self) -> None:
        super().__init__()
        self._generator: torch.Generator | None = None
        self._seed = 0
        self._warned_words: set[str] = set()

    # -- to implement ------------------------------------------------------------------------------
    def act(self, observations: Observation, deterministic: bool = False, generator: Any = None) -> ChunkSample:
        raise NotImplementedError

    def observation_config(self) -> EnvConfig:
        raise NotImplementedError

    def unknown_words(self, instructions: list[str]) -> list[str]:
        """Words of ``instructions`` the policy cannot read (default: none)."""
        return []

    def freeze(self, parts: list[str]) -> None:
        """Optional: stop training the named parts (e.g. ``["vision"]``); a family that can, overrides this."""
        if parts:
            raise ValueError(f"policy type {self.policy_type!r} cannot freeze parts of itself ({list(parts)}); "
                             "train it whole")

    # -- inference ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def seed(self, seed: int) -> None:
        """Restart the sampling noise of `predict`; the same seed reproduces the same stochastic chunks."""
        self._seed = int(seed)
        self._generator = None

    def _inference_generator(self) -> torch.Generator:
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device).manual_seed(self._seed)
        return self._generator

    def predict(self, observation: Observation, deterministic: bool = True) -> np.ndarray:
        """Action chunk ``(chunk_len, action_dim)`` (float32, clipped to [-1, 1]) for one observation."""
        if not isinstance(observation, Mapping):
            raise ValueError(f"predict takes one observation as a dict, got {type(observation).__name__}")
        image = observation.get("image")
        if image is None or np.ndim(image) != 3:
            shape = None if image is None else np.shape(image)
            raise ValueError(f"predict takes a single observation with an (H, W, 3) image, got image shape {shape}; "
                             "use predict_batch for batches")
        batch = {k: (np.asarray(v)[None] if k in ("image", "proprio") else [v] if k == "instruction" else v)
                 for k, v in observation.items()}
        return self.predict_batch(batch, deterministic=deterministic)[0]

    def predict_batch(self, observations: Observation, deterministic: bool = True) -> np.ndarray:
        """Action chunks ``(B, chunk_len, action_dim)`` (float32, clipped to [-1, 1]) for a batch."""
        check_observation_batch(observations)
        instructions = observations["instruction"]
        self._warn_unknown_words([instructions] if isinstance(instructions, str) else list(instructions))
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                sample = self.act(observations, deterministic=deterministic, generator=self._inference_generator())
        finally:
            self.train(was_training)
        return np.clip(np.asarray(sample.env_actions, dtype=np.float32), -1.0, 1.0)

    def _warn_unknown_words(self, instructions: list[str]) -> None:
        new = sorted(set(self.unknown_words(instructions)) - self._warned_words)
        if new:
            self._warned_words.update(new)
            log.warning("instruction words this policy never saw in training (read as unknown): %s", ", ".join(new))

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def check_observation_batch(observations: Observation) -> None:
    """Reject what no policy can act on sensibly: missing keys, non-finite numbers, bad instructions."""
    if not isinstance(observations, Mapping):
        raise ValueError(f"observations must be a dict with 'image', 'proprio' and 'instruction', got {type(observations).__name__}")
    missing = [key for key in ("image", "proprio", "instruction") if key not in observations]
    if missing:
        raise ValueError(f"observation is missing {missing}; expected keys 'image', 'proprio', 'instruction'")
    image = np.asarray(observations["image"])
    if image.dtype != np.uint8:
        raise ValueError(f"observation 'image' must be uint8 RGB in 0-255, got dtype {image.dtype}")
    try:
        proprio = np.asarray(observations["proprio"], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"observation 'proprio' must be numbers: {exc}") from None
    if not np.all(np.isfinite(proprio)):
        raise ValueError("observation 'proprio' holds NaN or inf; send finite joint readings")
    instructions = observations["instruction"]
    if isinstance(instructions, str) or not isinstance(instructions, (list, tuple, np.ndarray)):
        instructions = [instructions]
    for text in instructions:
        if not isinstance(text, str):
            raise ValueError(f"observation 'instruction' must be a str, got {type(text).__name__} ({text!r})")
        if not text.strip():
            raise ValueError("observation 'instruction' is empty; say what the robot should do")


class PolicyAgent:
    """A policy acting as an `Agent`: what evaluation, collection and relabelling run."""

    def __init__(self, policy: ChunkPolicyBase, deterministic: bool = True, name: str | None = None):
        self.policy, self.deterministic = policy, deterministic
        self.name = name or f"policy:{policy.policy_type}"
        self.chunk_len = policy.chunk_len

    def observation_config(self) -> EnvConfig:
        return self.policy.observation_config()

    def act(self, observations, tasks) -> list[np.ndarray]:
        return list(self.policy.predict_batch(stack_observations(list(observations)), deterministic=self.deterministic))


# -- families and loading ------------------------------------------------------------------------------
PolicyLoader = Callable[[dict, dict, str], ChunkPolicyBase]
_POLICY_TYPES: dict[str, PolicyLoader | str] = {
    "vla": "vlapt.policies.vla:load_vla",
}
# installed packages declare their families' loaders in this entry-point group, so that any process (a fresh
# `vlapt eval`, a policy server) finds them without importing the package first; a checkpoint only names its type
ENTRY_POINT_GROUP = "vlapt.policy_types"


def register_policy_type(name: str, loader: PolicyLoader | str) -> None:
    """Make checkpoints whose config.json says ``"policy_type": name`` loadable by `load_policy`.

    ``loader(document, tensors, where)`` rebuilds the policy from the parsed config.json, the
    weights and the checkpoint directory's path; a string ``"module:function"`` is imported on first use.
    """
    if name in _POLICY_TYPES and _POLICY_TYPES[name] != loader:
        raise ValueError(f"policy type {name!r} is already registered")
    _POLICY_TYPES[name] = loader


def policy_types() -> list[str]:
    """The registered policy types and those installed packages declare as entry points."""
    from vlapt.plugins import declared_names

    return sorted(set(_POLICY_TYPES) | declared_names(ENTRY_POINT_GROUP))


def _loader(name: str) -> PolicyLoader:
    import importlib

    from vlapt.policies.checkpoint import CheckpointError

    loader = _POLICY_TYPES.get(name)
    if loader is None:
        from vlapt.plugins import NOT_DECLARED, load_declared

        declared = load_declared(ENTRY_POINT_GROUP, name, what="policy_type", error=CheckpointError)
        if declared is not NOT_DECLARED:
            return declared
        raise CheckpointError(f"unknown policy_type {name!r}; known types: {', '.join(policy_types())} "
                              "(a family of your own registers with vlapt.policies.register_policy_type, or, to be "
                              f"found by every vlapt process, declares its loader in the {ENTRY_POINT_GROUP!r} "
                              "entry-point group of its package)")
    if isinstance(loader, str):
        module, _, function = loader.partition(":")
        loader = getattr(importlib.import_module(module), function)
    return loader


def load_policy(path: str | os.PathLike, device: str | torch.device = "cpu", seed: int = 0) -> ChunkPolicyBase:
    """Rebuild the policy saved in directory ``path`` (any registered family, or a LeRobot policy directory
    of a type vlapt wraps: `vlapt.policies.lerobot`), in eval mode, on ``device``."""
    from vlapt.policies.checkpoint import read_checkpoint
    from vlapt.policies.lerobot import load_lerobot_policy, lerobot_policy_type

    device = resolve_device(device)
    lerobot_type = lerobot_policy_type(path)
    if lerobot_type is not None:
        policy = load_lerobot_policy(path, lerobot_type)
    else:
        document, tensors = read_checkpoint(Path(path))
        policy = _loader(document.get("policy_type", "vla"))(document, tensors, str(path))
    policy.seed(seed)
    return policy.to(device).eval()


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device that exists here; ``"auto"`` is CUDA where there is a GPU, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r} ({exc}); use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use device='cpu'")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {str(device)!r} requested but MPS is not available; use device='cpu'")
    return device
