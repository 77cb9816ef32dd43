"""The VLA policy: a vision-language-action actor-critic over action chunks (a `ChunkPolicy`).

Observation tokens (instruction words, image tokens, proprioception) are mixed by an
Octo-style readout transformer: two learned readout tokens gather what the action and value
heads need, and observation tokens never attend to readouts, so a head cannot change the
features another head sees.

The action distribution is a diagonal Gaussian over the whole chunk of ``chunk_len``
actions, in normalised action space, with a state-independent learned standard deviation:
PPO needs exact log-likelihoods and entropies of chunks, which this gives in closed form,
and the chunk's log-likelihood is the sum over its ``h x A`` entries.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from vlapt.interfaces import EnvConfig, split_views
from vlapt.policies.checkpoint import CheckpointError, check_state_matches, write_checkpoint
from vlapt.policies.gaussian import GaussianChunk, GaussianChunkPolicy
from vlapt.policies.vla.config import PolicyConfig
from vlapt.policies.vla.features import FeatureCache
from vlapt.policies.vla.network import Transformer, _mlp_head, build_vision_backbone
from vlapt.policies.vla.tokenizer import Tokenizer

# Token types, in trunk order.
_LANGUAGE, _IMAGE, _PROPRIO, _ACTION_READOUT, _VALUE_READOUT = range(5)

BATCH_KEYS = ("image", "proprio", "instruction_ids", "instruction_mask")
INSTRUCTION_CACHE_BYTES = 64 * 2**20  # a frozen language tower's features of distinct instructions
POLICY_TYPE = "vla"


def make_batch(observations: Mapping[str, Any], tokenizer: Tokenizer, config: PolicyConfig,
               device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """One observation or a batch of them -> the tensor batch the network reads.

    ``observations`` holds ``"image"`` (uint8, ``(H, W, 3)`` or ``(B, H, W, 3)``), ``"proprio"``
    (``(P,)`` or ``(B, P)``) and ``"instruction"`` (a str shared by the batch, or B strs). Shapes
    are checked against ``config`` so a wrong camera resolution or proprio layout fails here
    rather than as a silent mis-prediction.
    """
    if not isinstance(config, PolicyConfig):
        raise TypeError(f"make_batch(observations, tokenizer, config, device): config must be a PolicyConfig, "
                        f"got {type(config).__name__} (a policy builds its own batches: policy.make_batch(observations))")
    missing = [key for key in ("image", "proprio", "instruction") if key not in observations]
    if missing:
        raise ValueError(f"observation is missing {missing}; expected keys 'image', 'proprio', 'instruction'")
    size, width, proprio_dim = config.image_size, config.views * config.image_size, config.proprio_dim
    image = np.asarray(observations["image"])
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[1:] != (size, width, 3):
        camera = config.camera or "default"
        views = f", {config.views} views of {size}x{size} side by side" if config.views > 1 else ""
        raise ValueError(f"observation 'image' must have shape ({size}, {width}, 3) or (B, {size}, {width}, 3), "
                         f"got {image.shape}; render the {camera!r} camera at {width}x{size} RGB{views}")
    if image.dtype != np.uint8:
        raise ValueError(f"observation 'image' must be uint8 RGB in 0-255, got dtype {image.dtype}")
    batch_size = image.shape[0]
    proprio = np.asarray(observations["proprio"], dtype=np.float32)
    if proprio.ndim == 1:
        proprio = proprio[None]
    if proprio.shape != (batch_size, proprio_dim):
        raise ValueError(f"observation 'proprio' must have shape ({proprio_dim},) or (B, {proprio_dim}) with "
                         f"B={batch_size} matching the images, got {np.asarray(observations['proprio']).shape} "
                         f"(fields: {config.proprio_fields})")
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


class VLAPolicy(GaussianChunkPolicy):
    """Actor-critic VLA policy over action chunks; see the module docstring for the design."""

    policy_type = POLICY_TYPE

    def __init__(self, config: PolicyConfig, files: Mapping[str, str] | None = None):
        """``files``: the text files a saved policy carries beside its weights (a pretrained tokenizer), by name."""
        super().__init__()
        config = copy.deepcopy(config).validate()
        self.config = config
        d = config.d_model

        self.vision = build_vision_backbone(config)
        # each view is encoded on its own by the same encoder; the positional embedding tells the views apart
        self.num_image_tokens = config.views * self.vision.num_tokens
        self.image_pos = nn.Parameter(torch.zeros(1, self.num_image_tokens, d))

        if config.language_backbone == "hf":
            from vlapt.policies.vla.backbones import TOKENIZER_FILE, HFLanguageEncoder

            self.language_tower = HFLanguageEncoder(config, (files or {}).get(TOKENIZER_FILE))
            self.tokenizer = self.language_tower.tokenizer
        else:
            self.tokenizer = Tokenizer(config.vocab)
            self.token_embed = nn.Embedding(config.vocab_size, d)
            self.language_pos = nn.Parameter(torch.zeros(1, config.max_instruction_tokens, d))
            self.language_encoder = Transformer(config.language_layers, d, config.n_heads, config.mlp_ratio, config.dropout)

        self.proprio_embed = nn.Linear(config.proprio_dim, d)
        self.readouts = nn.Parameter(torch.zeros(1, 2, d))
        self.token_type = nn.Embedding(5, d)
        self.trunk = Transformer(config.n_layers, d, config.n_heads, config.mlp_ratio, config.dropout)

        self.action_head = _mlp_head(d, config.chunk_len * config.action_dim)
        self.value_head = _mlp_head(d, 1)
        self.log_std = nn.Parameter(torch.full((config.chunk_len, config.action_dim), float(config.init_log_std)))

        # Statistics live in the config; buffers are non-persistent so weights files hold only learned state.
        self.register_buffer("proprio_mean", _stat(config.proprio_mean, config.proprio_dim, 0.0), persistent=False)
        self.register_buffer("proprio_std", _stat(config.proprio_std, config.proprio_dim, 1.0), persistent=False)
        self.register_buffer("action_mean", _stat(config.action_mean, config.action_dim, 0.0), persistent=False)
        self.register_buffer("action_std", _stat(config.action_std, config.action_dim, 1.0), persistent=False)

        self.register_buffer("_static_allowed", self._readout_mask(), persistent=False)
        self.register_buffer("_token_types", self._trunk_token_types(), persistent=False)
        self._init_weights()
        self._feature_cache: FeatureCache | None = None
        self._instruction_cache: FeatureCache | None = None
        self.configure_feature_cache(config.feature_cache_mb)

    # -- construction helpers ----------------------------------------------------------------------
    def _init_weights(self) -> None:
        for name, module in self.named_modules():
            if name.startswith(("vision", "language_tower.backbone")):
                continue  # backbones keep their own (possibly pretrained) weights
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=0.02)
        for param in (self.image_pos, getattr(self, "language_pos", None), self.readouts):
            if param is not None:
                nn.init.trunc_normal_(param, std=0.02)
        # Near-zero outputs at init: initial actions sit at the data mean and values near zero.
        nn.init.normal_(self.action_head[-1].weight, std=1e-3)
        nn.init.normal_(self.value_head[-1].weight, std=1e-2)

    def _readout_mask(self) -> torch.Tensor:
        """Which trunk token may attend to which, before language padding is applied."""
        n_obs = self.config.max_instruction_tokens + self.num_image_tokens + 1
        size = n_obs + 2
        allowed = torch.zeros(size, size, dtype=torch.bool)
        allowed[:, :n_obs] = True  # everyone sees observations
        allowed[n_obs, n_obs] = True  # each readout also sees itself, never the other readout
        allowed[n_obs + 1, n_obs + 1] = True
        return allowed

    def _trunk_token_types(self) -> torch.Tensor:
        return torch.cat([
            torch.full((self.config.max_instruction_tokens,), _LANGUAGE),
            torch.full((self.num_image_tokens,), _IMAGE),
            torch.tensor([_PROPRIO, _ACTION_READOUT, _VALUE_READOUT]),
        ])

    @property
    def chunk_len(self) -> int:
        return self.config.chunk_len

    @property
    def action_dim(self) -> int:
        return self.config.action_dim

    @property
    def min_log_std(self) -> float:
        return self.config.min_log_std

    @property
    def max_log_std(self) -> float:
        return self.config.max_log_std

    # -- the network -------------------------------------------------------------------------------
    def make_batch(self, observations: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return make_batch(observations, self.tokenizer, self.config, self.device)

    def forward(self, batch: dict[str, torch.Tensor]) -> GaussianChunk:
        image, proprio, ids, mask = self._check_batch(batch)
        batch_size, n_words = ids.shape

        words = self._instruction_tokens(ids, mask)

        patches = self._image_tokens(image) + self.image_pos
        proprio = (proprio.float() - self.proprio_mean) / self.proprio_std
        state = self.proprio_embed(proprio)[:, None]
        readouts = self.readouts.expand(batch_size, -1, -1)

        # The layout buffers are built for max_instruction_tokens words; shorter instructions drop leading rows.
        drop = self.config.max_instruction_tokens - n_words
        tokens = torch.cat([words, patches, state, readouts], dim=1) + self.token_type(self._token_types[drop:])
        key_valid = torch.cat([mask, mask.new_ones(batch_size, tokens.shape[1] - n_words)], dim=1)
        allowed = self._static_allowed[drop:, drop:][None, None] & key_valid[:, None, None, :]
        features = self.trunk(tokens, allowed)

        action_readout, value_readout = features[:, -2], features[:, -1]
        # the heads' outputs in float32 whatever the autocast precision, so likelihoods and ratios stay exact
        mean = self.action_head(action_readout).view(batch_size, self.config.chunk_len, self.config.action_dim).float()
        value = self.value_head(value_readout).squeeze(-1).float()
        log_std = self.clamped_log_std().expand_as(mean)
        return GaussianChunk(mean=mean, log_std=log_std, value=value, features=action_readout)

    def _instruction_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "language_tower"):
            words = self.token_embed(ids) + self.language_pos[:, : ids.shape[1]]
            word_allowed = mask[:, None, None, :] | torch.eye(ids.shape[1], dtype=torch.bool, device=ids.device)
            return self.language_encoder(words, word_allowed)
        tower = self.language_tower
        if self._instruction_cache is not None and tower.cacheable():  # a frozen tower: once per distinct instruction
            return tower.tokens(self._instruction_cache.lookup(tower.pack(ids, mask), tower.features))
        return tower(ids, mask)

    def _image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """The image encoder's tokens, view after view; a frozen encoder's features come from the feature cache
        when it has them."""
        views = self.config.views
        if views > 1:  # every view through the same encoder
            image = split_views(image, views)
        cacheable = getattr(self.vision, "cacheable", None)
        if self._feature_cache is not None and cacheable is not None and cacheable():
            tokens = self.vision.tokens(self._feature_cache.lookup(image, self.vision.features))
        else:
            tokens = self.vision(image)
        return tokens if views == 1 else tokens.reshape(-1, views * tokens.shape[1], tokens.shape[2])

    # -- freezing and the feature cache ------------------------------------------------------------
    FREEZABLE = ("vision", "language")

    def freeze(self, parts) -> None:
        """Stop training ``parts``: "vision", the whole image encoder (recorded as ``vision_trainable="none"``);
        "language", a pretrained language tower (``language_trainable="none"``)."""
        parts = [parts] if isinstance(parts, str) else list(parts)
        unknown = sorted(set(parts) - set(self.FREEZABLE))
        if unknown:
            raise ValueError(f"the VLA policy cannot freeze {unknown}; it can freeze {list(self.FREEZABLE)}")
        if "language" in parts:
            if not hasattr(self, "language_tower"):
                raise ValueError("freezing 'language' needs a pretrained language tower (language_backbone='hf')")
            self.language_tower.set_trainable("none")
            self.config.language_trainable = "none"
        if "vision" in parts:
            if not hasattr(self.vision, "set_trainable"):
                raise ValueError(f"vision backbone {self.config.vision_backbone!r} is not a VisionEncoder, so it "
                                 "cannot be frozen")
            self.vision.set_trainable("none")
            self.config.vision_trainable = "none"
            self.clear_feature_cache()

    def configure_feature_cache(self, megabytes: int) -> None:
        """Bound the frozen encoder's feature cache to ``megabytes`` (0: no cache); drops what it held."""
        if megabytes < 0:
            raise ValueError(f"feature cache size must be >= 0 MB, got {megabytes}")
        self._feature_cache = FeatureCache(int(megabytes) * 2**20) if megabytes else None
        self._instruction_cache = FeatureCache(INSTRUCTION_CACHE_BYTES) if megabytes else None

    def clear_feature_cache(self) -> None:
        for cache in (self._feature_cache, self._instruction_cache):
            if cache is not None:
                cache.clear()

    def feature_cache_stats(self) -> dict[str, float] | None:
        """Entries, megabytes, hits, misses and hit rate of the feature cache (None without one)."""
        return None if self._feature_cache is None else self._feature_cache.stats()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.clear_feature_cache()  # features of other weights
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _apply(self, fn, recurse: bool = True):
        if hasattr(self, "_instruction_cache"):
            self.clear_feature_cache()  # features on another device or in another dtype
        return super()._apply(fn, recurse)

    def _check_batch(self, batch: dict[str, torch.Tensor]):
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"policy batch is missing {missing}; build it with make_batch")
        image, proprio, ids, mask = (batch[k] for k in BATCH_KEYS)
        size, width = self.config.image_size, self.config.views * self.config.image_size
        if image.dtype != torch.uint8:
            raise ValueError(f"batch['image'] must be uint8 (0-255 RGB), got {image.dtype}")
        if image.dim() != 4 or image.shape[1:] != (size, width, 3):
            raise ValueError(f"batch['image'] must have shape (B, {size}, {width}, 3), got {tuple(image.shape)}")
        if proprio.dim() != 2 or proprio.shape[1] != self.config.proprio_dim:
            raise ValueError(f"batch['proprio'] must have shape (B, {self.config.proprio_dim}), got {tuple(proprio.shape)}")
        if ids.dim() != 2 or ids.shape != mask.shape or ids.shape[1] > self.config.max_instruction_tokens:
            raise ValueError("batch['instruction_ids'] and ['instruction_mask'] must share shape (B, L) with "
                             f"L <= {self.config.max_instruction_tokens}, got {tuple(ids.shape)} and {tuple(mask.shape)}")
        if not (image.shape[0] == proprio.shape[0] == ids.shape[0]):
            raise ValueError(f"batch sizes differ: image {image.shape[0]}, proprio {proprio.shape[0]}, instruction {ids.shape[0]}")
        return image, proprio, ids, mask.bool()

    # -- the ChunkPolicy interface (sampling, scoring and BC: GaussianChunkPolicy) ------------------
    def observation_config(self) -> EnvConfig:
        c = self.config
        return EnvConfig(camera=c.camera, camera_fovy=c.camera_fovy, image_size=c.image_size, render=True)

    def unknown_words(self, instructions: list[str]) -> list[str]:
        if hasattr(self, "language_tower"):
            return []  # a subword tokenizer reads any text
        known = set(self.tokenizer.vocab)
        return [w for text in instructions for w in Tokenizer.split(text) if w not in known]

    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        return write_checkpoint(path, POLICY_TYPE, dataclasses.asdict(self.config), self.state_dict(), metadata,
                                extra_files=self.files())

    def files(self) -> dict[str, str]:
        """The text files the checkpoint carries beside the weights (a pretrained language tower's tokenizer)."""
        if not hasattr(self, "language_tower"):
            return {}
        from vlapt.policies.vla.backbones import TOKENIZER_FILE

        return {TOKENIZER_FILE: self.language_tower.tokenizer.json}

    # -- action normalisation ----------------------------------------------------------------------
    def normalize_actions(self, actions):
        """Env actions ``(..., A)`` -> the space the Gaussian lives in; keeps numpy/torch type."""
        return self._affine(actions, inverse=False)

    def unnormalize_actions(self, actions):
        """Inverse of :meth:`normalize_actions`; does not clip (the env and `predict` do)."""
        return self._affine(actions, inverse=True)

    def _affine(self, actions, inverse: bool):
        mean, std = self.config.action_mean, self.config.action_std
        if actions.shape[-1] != self.config.action_dim:
            raise ValueError(f"actions must end in action_dim={self.config.action_dim}, got shape {tuple(actions.shape)}")
        if isinstance(actions, torch.Tensor):
            if not mean:
                return actions
            m, s = self.action_mean.to(actions.device), self.action_std.to(actions.device)
        else:
            actions = np.asarray(actions, dtype=np.float32)
            if not mean:
                return actions
            m, s = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
        return actions * s + m if inverse else (actions - m) / s

    def __repr__(self) -> str:
        c = self.config
        return (f"VLAPolicy(size={c.size!r}, params={self.num_parameters():,}, chunk_len={c.chunk_len}, "
                f"image_size={c.image_size}, camera={c.camera!r})")


def _stat(values: list[float], dim: int, fill: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32) if values else torch.full((dim,), fill)


# Fields of older checkpoints for options that no longer exist, with the value that meant "off".
_RETIRED_FIELDS = {"correlated_noise": False, "init_correlated_log_std": None, "image_film": False}


def config_from_document(document: dict, where: str) -> PolicyConfig:
    fields = dict(document["policy"])
    fields.setdefault("image_keypoints", 0)  # written before keypoint tokens existed (then the default): none
    for name, off in _RETIRED_FIELDS.items():
        if name in fields:
            value = fields.pop(name)
            if off is not None and value != off:
                raise CheckpointError(f"{where} was trained with {name}={value!r}, an option this vlapt version no longer "
                                      "has; load it with the version that wrote it")
    known = {f.name for f in dataclasses.fields(PolicyConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(f"{where} has unknown policy config field(s) {unknown}; it was written by a different "
                              f"vlapt version (known fields: {sorted(known)})")
    try:
        return PolicyConfig(**fields).validate()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where} holds an invalid policy config: {exc}") from exc


def load_vla(document: dict, tensors: dict[str, torch.Tensor], where: str) -> VLAPolicy:
    """The `load_policy` loader of ``policy_type: vla`` checkpoints."""
    config = config_from_document(document, where)
    files = {}
    if config.language_backbone == "hf":
        from vlapt.policies.vla.backbones import TOKENIZER_FILE

        tokenizer_path = Path(where) / TOKENIZER_FILE
        if not tokenizer_path.is_file():
            raise CheckpointError(f"{where} has no {TOKENIZER_FILE}, the tokenizer of its language tower; the checkpoint "
                                  "is incomplete (re-save it)")
        files[TOKENIZER_FILE] = tokenizer_path.read_text()
    try:
        policy = VLAPolicy(config, files)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot build the policy described by {where}: {exc}") from exc
    check_state_matches(policy, tensors, where)
    policy.load_state_dict(tensors, strict=True)
    return policy
