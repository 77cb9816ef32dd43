"""LeRobot's ACT (Action Chunking Transformer) as a vlapt `ChunkPolicy`, so chunked PPO + self-BC can post-train it.

The chunk distribution is a diagonal Gaussian whose mean is ACT's predicted chunk (its first
``n_action_steps`` actions, the ones it executes) in LeRobot's normalised action space, with a
learned, state-independent log-std: the same closed-form chunk likelihood as vlapt's VLA. A value
head reads ACT's transformer-encoder output (mean over its tokens); the rest of ACT is LeRobot's
own module, unchanged, weights and all.

ACT runs in eval mode inside this wrapper: its VAE encoder is not used (the latent is zero, as at
LeRobot's inference) and dropout is off, so the chunk mean is a deterministic function of the
observation, as PPO's likelihood ratio needs. Behaviour cloning (`bc_loss`) is the Gaussian's
negative log-likelihood of the demonstrated chunk, not ACT's L1 + KL training loss.

Inputs, from vlapt's observations: ``image`` (uint8 RGB) -> ACT's one image feature, scaled to
[0, 1] and normalised with the preprocessor's statistics; ``proprio`` -> ``observation.state``.
The instruction is not an ACT input. ACT configurations that read ``observation.environment_state``
(privileged simulator state) or several cameras are refused: vlapt policies see one camera.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from vlapt.interfaces import EnvConfig, camera_views
from vlapt.policies.checkpoint import CheckpointError, check_state_matches
from vlapt.policies.gaussian import GaussianChunk, GaussianChunkPolicy
from vlapt.policies.lerobot import (
    HEADS_FILE, POSTPROCESSOR, PREPROCESSOR, WEIGHTS_FILE, Normalization, kept_files, read_normalization, read_sidecar,
    require_lerobot, training_observation, write_policy_dir,
)

log = logging.getLogger("vlapt.policies")

POLICY_TYPE = "lerobot-act"
LEROBOT_TYPE = "act"
OBS_STATE = "observation.state"
OBS_IMAGES = "observation.images"
ACTION = "action"


class LeRobotACTPolicy(GaussianChunkPolicy):
    """LeRobot's ACTPolicy plus a learned chunk log-std and a value head; see the module docstring."""

    policy_type = POLICY_TYPE

    def __init__(self, lerobot_policy: nn.Module, files: dict[str, bytes], normalize: Normalization, unnormalize: Normalization,
                 observation: dict[str, Any], init_log_std: float = -1.0, value_hidden: int = 256,
                 min_log_std: float = -5.0, max_log_std: float = 1.0, where: str = ""):
        super().__init__()
        config = lerobot_policy.config
        images = list(config.image_features)
        problems = []
        if len(images) != 1:
            problems.append(f"it reads {len(images)} cameras ({images}); vlapt envs render one")
        if config.env_state_feature is not None:
            problems.append("it reads observation.environment_state, privileged simulator state that vlapt policies never see")
        if config.robot_state_feature is None:
            problems.append(f"it has no {OBS_STATE} input (LeRobot's ACT needs one to run without a VAE target)")
        if config.action_feature is None:
            problems.append(f"it has no {ACTION} output")
        if config.temporal_ensemble_coeff is not None:
            problems.append("it averages overlapping chunks (temporal_ensemble_coeff), which is not a chunk policy: "
                            "set temporal_ensemble_coeff to null and n_action_steps to the chunk it should execute")
        if problems:
            raise CheckpointError(f"the ACT policy in {where} cannot be post-trained by vlapt: " + "; ".join(problems))
        self.lerobot_policy = lerobot_policy  # LeRobot's ACTPolicy
        self.image_key = images[0]
        channels, height, width = config.image_features[self.image_key].shape
        views = len(camera_views(str(observation.get("camera", ""))))
        if channels != 3 or width != views * height:
            raise CheckpointError(f"the ACT policy in {where} reads {channels}x{height}x{width} images; vlapt renders "
                                  f"RGB images of {views} square view(s) side by side (camera "
                                  f"{observation.get('camera') or 'default'!r})")
        self.image_size, self.image_width = int(height), int(width)
        self.proprio_dim = int(config.robot_state_feature.shape[0])
        self._chunk_len = int(config.n_action_steps)
        self._action_dim = int(config.action_feature.shape[0])
        self.observation = {"camera": "", "camera_fovy": 0.0, **observation, "image_size": self.image_size}
        self.files = dict(files)
        self.normalize = normalize
        self.unnormalize = unnormalize
        self.min_log_std, self.max_log_std = float(min_log_std), float(max_log_std)
        self.value_hidden = int(value_hidden)
        with torch.random.fork_rng(devices=[]):  # the same fresh heads on every load
            torch.manual_seed(0)
            self.log_std = nn.Parameter(torch.full((self._chunk_len, self._action_dim), float(init_log_std)))
            self.value_head = nn.Sequential(nn.Linear(config.dim_model, value_hidden), nn.Tanh(), nn.Linear(value_hidden, 1))
            nn.init.normal_(self.value_head[-1].weight, std=1e-2)
            nn.init.zeros_(self.value_head[-1].bias)
        self._encoder_out: torch.Tensor | None = None
        self.lerobot_policy.model.encoder.register_forward_hook(self._keep_encoder_output)
        self.lerobot_policy.eval()

    def _keep_encoder_output(self, module, inputs, output) -> None:
        self._encoder_out = output  # (tokens, B, dim_model)

    def train(self, mode: bool = True) -> "LeRobotACTPolicy":
        super().train(mode)
        self.lerobot_policy.eval()  # always: zero VAE latent, no dropout (see the module docstring)
        return self

    @property
    def chunk_len(self) -> int:
        return self._chunk_len

    @property
    def action_dim(self) -> int:
        return self._action_dim

    # -- the network -------------------------------------------------------------------------------
    def make_batch(self, observations: Mapping[str, Any]) -> dict[str, Any]:
        """vlapt observations -> ACT's normalised inputs (shapes checked against ACT's config)."""
        missing = [key for key in ("image", "proprio") if key not in observations]
        if missing:
            raise ValueError(f"observation is missing {missing}; ACT reads 'image' and 'proprio'")
        size, width = self.image_size, self.image_width
        image = np.asarray(observations["image"])
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[1:] != (size, width, 3) or image.dtype != np.uint8:
            raise ValueError(f"observation 'image' must be uint8 with shape (B, {size}, {width}, 3) for this ACT policy "
                             f"({self.image_key}: 3x{size}x{width}), got {image.dtype} {image.shape}")
        proprio = np.asarray(observations["proprio"], dtype=np.float32)
        if proprio.ndim == 1:
            proprio = proprio[None]
        if proprio.shape != (image.shape[0], self.proprio_dim):
            raise ValueError(f"observation 'proprio' must have shape (B, {self.proprio_dim}) for this ACT policy "
                             f"({OBS_STATE}), got {proprio.shape}")
        device = self.log_std.device
        pixels = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(0, 3, 1, 2).float() / 255.0
        state = torch.from_numpy(np.ascontiguousarray(proprio)).to(device)
        pixels = self.normalize(self.image_key, pixels)
        return {OBS_STATE: self.normalize(OBS_STATE, state), self.image_key: pixels, OBS_IMAGES: [pixels]}

    def forward(self, batch: dict[str, Any]) -> GaussianChunk:
        """The chunk's Gaussian in LeRobot's normalised action space; ``features``: the encoder's mean token."""
        chunk, _ = self.lerobot_policy.model(batch)
        features = self._encoder_out.mean(dim=0)
        self._encoder_out = None
        # the outputs in float32 whatever the autocast precision, so likelihoods and ratios stay exact
        mean = chunk[:, : self._chunk_len].float()
        value = self.value_head(features).squeeze(-1).float()
        return GaussianChunk(mean, self.clamped_log_std().expand_as(mean), value, features)

    # -- the ChunkPolicy interface (sampling, scoring and BC: GaussianChunkPolicy) ------------------
    def observation_config(self) -> EnvConfig:
        o = self.observation
        return EnvConfig(camera=o["camera"], camera_fovy=float(o["camera_fovy"]), image_size=self.image_size, render=True)

    def normalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """Env-unit actions -> LeRobot's normalised action space (where the Gaussian lives)."""
        return self.normalize(ACTION, actions)

    def unnormalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """Normalised actions -> env units, with the postprocessor's statistics (not clipped)."""
        return self.unnormalize(ACTION, actions, inverse=True)

    # -- saving: LeRobot's layout plus vlapt's heads -----------------------------------------------
    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        heads = {"log_std": self.log_std, **{f"value_head.{k}": v for k, v in self.value_head.state_dict().items()}}
        sidecar = {
            "policy_type": POLICY_TYPE,
            "lerobot_type": LEROBOT_TYPE,
            "observation": {k: self.observation[k] for k in ("camera", "camera_fovy", "image_size")},
            "chunk_len": self._chunk_len,
            "value_hidden": self.value_hidden,
            "min_log_std": self.min_log_std,
            "max_log_std": self.max_log_std,
        }
        if metadata is not None:
            sidecar["metadata"] = metadata
        return write_policy_dir(path, self.files, {WEIGHTS_FILE: self.lerobot_policy.state_dict(), HEADS_FILE: heads}, sidecar)

    def __repr__(self) -> str:
        c = self.lerobot_policy.config
        return (f"LeRobotACTPolicy(params={self.num_parameters():,}, chunk_len={self._chunk_len}, "
                f"chunk_size={c.chunk_size}, image={self.image_key} {self.image_size}px, dim_model={c.dim_model})")


def load_act(path: Path) -> LeRobotACTPolicy:
    """The `load_policy` loader of LeRobot ``"type": "act"`` directories (LeRobot's own or saved by vlapt)."""
    from safetensors.torch import load_file

    require_lerobot(f"post-training the ACT policy in {path}")
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.act.modeling_act import ACTPolicy

    try:
        config = PreTrainedConfig.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - draccus reports a bad config in its own error types
        raise CheckpointError(f"{path / 'config.json'} is not a valid LeRobot ACT config ({exc})") from exc
    config.device = "cpu"
    config.pretrained_backbone_weights = None  # model.safetensors holds the backbone: nothing to download
    sidecar = read_sidecar(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}; the LeRobot policy directory is incomplete")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{weights} is not a readable safetensors file ({exc})") from exc
    try:
        act = ACTPolicy(config)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise CheckpointError(f"cannot build the ACT policy that {path / 'config.json'} describes: {exc}") from exc
    check_state_matches(act, tensors, path)
    act.load_state_dict(tensors, strict=True)

    normalize = read_normalization(path, PREPROCESSOR, "normalizer_processor")
    unnormalize = read_normalization(path, POSTPROCESSOR, "unnormalizer_processor")
    if normalize is None or unnormalize is None:
        raise CheckpointError(f"{path} lacks LeRobot's processor files ({PREPROCESSOR} and {POSTPROCESSOR} with their "
                              "normaliser steps); policies saved by LeRobot before 0.4 keep their statistics inside "
                              "the model: migrate them with python -m lerobot.processor.migrate_policy_normalization")
    if sidecar is not None:
        observation = dict(sidecar.get("observation") or {})
        settings = {k: sidecar[k] for k in ("value_hidden", "min_log_std", "max_log_std") if k in sidecar}
    else:
        observation = training_observation(path) or {}
        settings = {}
        if not observation:
            log.warning("%s records no camera settings (it was not trained on a dataset vlapt wrote): it will see the "
                        "suite's default camera at %dpx; add a vlapt_policy.json to choose another", path,
                        config.image_features[next(iter(config.image_features))].shape[-1] if config.image_features else 0)
    files = {name: content for name, content in kept_files(path).items()}
    policy = LeRobotACTPolicy(act, files, normalize, unnormalize, observation, where=str(path), **settings)
    if sidecar is not None:
        heads = load_file(str(path / HEADS_FILE))
        expected = {"log_std": policy.log_std, **{f"value_head.{k}": v for k, v in policy.value_head.state_dict().items()}}
        wrong = sorted(set(expected) ^ set(heads)) + [k for k in expected if k in heads and heads[k].shape != expected[k].shape]
        if wrong:
            raise CheckpointError(f"{path / HEADS_FILE} does not match {path / 'vlapt_policy.json'}: {wrong[:4]}")
        with torch.no_grad():
            policy.log_std.copy_(heads["log_std"])
        policy.value_head.load_state_dict({k[len("value_head."):]: v for k, v in heads.items() if k.startswith("value_head.")})
    return policy
