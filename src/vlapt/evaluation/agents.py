"""What evaluation and collection can run: anything that maps a batch of observations to
a batch of action chunks and says what it needs to observe.

Evaluation only reads checkpoints: a trained policy enters here through `load_policy`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

import numpy as np

from vlapt.envs.experts import ScriptedExpert  # noqa: F401  (an Agent too)
from vlapt.envs.metaworld_env import EnvConfig


class Agent(Protocol):
    name: str
    chunk_len: int

    def observation_config(self) -> EnvConfig:
        """The camera, image size and state the agent needs to see."""

    def act(self, observations: Sequence[dict[str, Any]], tasks: Sequence[str]) -> list[np.ndarray]:
        """One action chunk (n, 4) per observation."""


class CheckpointAgent:
    """A trained VLA policy loaded from a checkpoint directory."""

    def __init__(self, path: str, deterministic: bool = True, device: str = "cpu", seed: int = 0):
        from vlapt.models import load_policy

        self.path = str(path)
        self.policy = load_policy(path, device=device, seed=seed)
        self.deterministic = deterministic
        self.name = f"checkpoint:{path}"
        self.chunk_len = self.policy.chunk_len

    def observation_config(self) -> EnvConfig:
        return env_config_for_policy(self.policy.config)

    def act(self, observations, tasks):
        batch = stack_observations(observations)
        chunks = self.policy.predict_batch(batch, deterministic=self.deterministic)
        return list(chunks)


def env_config_for_policy(policy_config, **overrides) -> EnvConfig:
    """The env settings that render what a policy was trained on (camera, field of view, image size)."""
    return EnvConfig(camera=policy_config.camera, camera_fovy=policy_config.camera_fovy,
                     image_size=policy_config.image_size, render=True, **overrides).validate()


def stack_observations(observations: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """List of per-env observation dicts -> one batched dict (strings stay a list)."""
    keys = observations[0].keys()
    out: dict[str, Any] = {}
    for key in keys:
        values = [obs[key] for obs in observations]
        out[key] = values if isinstance(values[0], str) else np.stack(values)
    return out


def with_episode_limit(config: EnvConfig, max_episode_steps: int) -> EnvConfig:
    return dataclasses.replace(config, max_episode_steps=max_episode_steps).validate()
