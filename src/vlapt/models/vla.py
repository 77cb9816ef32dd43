"""Vision-language-action policy with an Octo-style readout transformer.

Observation tokens (instruction words, image patches, proprioception) are mixed
by a transformer trunk; two learned readout tokens gather what the action and
value heads need. Observation tokens never attend to readouts, so adding or
changing a head cannot change the observation features another head sees.

The action distribution is a Gaussian over the whole chunk of ``chunk_len``
actions, in normalised action space, with a state-independent learned standard
deviation: PPO needs exact log-likelihoods and entropies of chunks, which this
gives in closed form. By default it is diagonal. With ``correlated_noise`` each
action dimension also gets a noise term shared by all steps of the chunk
(covariance ``diag(sigma_t^2) + sigma_c^2 11^T`` per dimension): independent
per-step noise averages out over an open-loop chunk (its net displacement grows
like sqrt(h)), so it barely explores faster or slower, further or shorter
motions; the shared term moves the whole chunk (growing like h). Likelihoods stay
exact through the Sherman-Morrison identity.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlapt.models.config import PolicyConfig

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

# Token types, in trunk order.
_LANGUAGE, _IMAGE, _PROPRIO, _ACTION_READOUT, _VALUE_READOUT = range(5)

BATCH_KEYS = ("image", "proprio", "instruction_ids", "instruction_mask")


class PolicyOutput(NamedTuple):
    mean: torch.Tensor  # (B, h, A), normalised action space
    log_std: torch.Tensor  # (B, h, A), already clamped
    value: torch.Tensor  # (B,)
    features: torch.Tensor | None = None  # (B, d_model) the action readout's trunk features, what the action head reads
    correlated_log_std: torch.Tensor | None = None  # (A,) clamped, with correlated_noise; else None


# --------------------------------------------------------------------------- building blocks


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """``allowed`` is a bool mask broadcastable to (B, heads, S, S); True lets a query see a key."""
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_heads, width // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(batch, seq, width))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block; an explicit mask avoids the ambiguities of nn.Transformer's fast path."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(round(d_model * mlp_ratio))
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_model)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), allowed))
        return x + self.drop(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    def __init__(self, n_layers: int, d_model: int, n_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, mlp_ratio, dropout) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x)


def _mlp_head(d_model: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, out_features))


def _group_count(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


# --------------------------------------------------------------------------- vision backbones


class ConvVisionEncoder(nn.Module):
    """Stride-2 conv stack pooled to an ``image_grid x image_grid`` grid of tokens.

    Cheap on CPU: every stage halves the resolution, so almost all compute is
    in the first two small convolutions. Pooled grid cells are coarse (24 px at
    96 px input), too coarse to place a 1-2 px goal marker; ``image_keypoints > 0``
    adds that many spatial-softmax keypoint tokens (the expected image position of
    a learned feature, computed on the finer penultimate feature map), which carry
    sub-cell positions as numbers.
    """

    def __init__(self, config: PolicyConfig):
        super().__init__()
        feature_side = config.image_size // (2 ** len(config.image_channels))
        if feature_side < config.image_grid:
            raise ValueError(
                f"image_size {config.image_size} with {len(config.image_channels)} stride-2 convs gives a "
                f"{feature_side}x{feature_side} feature map, smaller than image_grid={config.image_grid}; "
                "use a larger image_size, fewer image_channels entries, or a smaller image_grid"
            )
        layers: list[nn.Module] = []
        in_channels = 3
        for channels in config.image_channels:
            layers += [
                nn.Conv2d(in_channels, channels, kernel_size=3, stride=2, padding=1),
                nn.GroupNorm(_group_count(channels), channels),
                nn.ReLU(inplace=True),
            ]
            in_channels = channels
        self.convs = nn.Sequential(*layers)
        self.project = nn.Conv2d(in_channels, config.d_model, kernel_size=1)
        self.grid = config.image_grid
        self.keypoints = config.image_keypoints
        if self.keypoints:
            # Penultimate stage (or the only one): stride 8 for the default 4-stage stack.
            stage = max(len(config.image_channels) - 2, 0)
            self._keypoint_layer = 3 * stage + 2  # that stage's ReLU (conv, norm, ReLU per stage)
            self.keypoint_features = nn.Conv2d(config.image_channels[stage], self.keypoints, kernel_size=1)
            self.keypoint_log_temperature = nn.Parameter(torch.zeros(()))
            self.keypoint_embed = nn.Linear(2, config.d_model)
        # FiLM: the instruction scales and shifts every stage's normalised features, so one
        # multi-task encoder can pick out what this task needs (the goal marker for reach, the
        # handle for a drawer). Zero-initialised: training starts from the unconditioned stack.
        self.conditioned = config.image_film
        if self.conditioned:
            self.film = nn.ModuleList(nn.Linear(config.d_model, 2 * channels) for channels in config.image_channels)
            for film in self.film:
                nn.init.zeros_(film.weight)
                nn.init.zeros_(film.bias)
        self.num_tokens = config.image_grid**2 + self.keypoints

    def forward(self, image: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``condition``: ``(B, d_model)`` instruction summary, required when ``image_film`` is on."""
        if self.conditioned and condition is None:
            raise ValueError("this encoder is FiLM-conditioned (image_film=True): pass the instruction summary")
        x = image.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        keypoint_input = None
        for index, layer in enumerate(self.convs):
            x = layer(x)
            if self.conditioned and index % 3 == 1:  # after the stage's GroupNorm, before its ReLU
                scale, shift = self.film[index // 3](condition)[:, :, None, None].chunk(2, dim=1)
                x = x * (1.0 + scale) + shift
            if self.keypoints and index == self._keypoint_layer:
                keypoint_input = x
        x = self.project(x)
        x = F.adaptive_avg_pool2d(x, self.grid)
        tokens = x.flatten(2).transpose(1, 2)
        if keypoint_input is None:
            return tokens
        return torch.cat([tokens, self.keypoint_embed(self.spatial_softmax(keypoint_input))], dim=1)

    def spatial_softmax(self, features: torch.Tensor) -> torch.Tensor:
        """Expected (x, y) in [-1, 1] of each keypoint channel's softmax over the map: ``(B, K, 2)``."""
        logits = self.keypoint_features(features)
        batch, keypoints, height, width = logits.shape
        weights = torch.softmax(logits.flatten(2) / self.keypoint_log_temperature.exp(), dim=-1)
        ys = torch.linspace(-1.0, 1.0, height, device=logits.device, dtype=logits.dtype)
        xs = torch.linspace(-1.0, 1.0, width, device=logits.device, dtype=logits.dtype)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(height * width, 2)
        return weights @ grid


VisionBackboneBuilder = Callable[[PolicyConfig], nn.Module]

def _hf_vision_encoder(config: PolicyConfig) -> nn.Module:
    from vlapt.models.backbones import HFVisionEncoder

    return HFVisionEncoder(config)


VISION_BACKBONES: dict[str, VisionBackboneBuilder] = {"conv": ConvVisionEncoder, "hf": _hf_vision_encoder}
"""Extension point for image encoders, selected by ``PolicyConfig.vision_backbone``.

A builder takes the config and returns a module that maps a uint8 image batch
``(B, H, W, 3)`` to tokens ``(B, N, d_model)`` and exposes ``num_tokens = N``.
It owns its own pixel normalisation, so a pretrained encoder (e.g. a timm or
transformers model loaded from local disk) can apply the statistics it was
trained with, and keeps whatever weights it was built with (the policy's
initialisation skips it). The policy adds learned positional embeddings on top.
"""


def register_vision_backbone(name: str, builder: VisionBackboneBuilder) -> None:
    """Make ``name`` usable as ``PolicyConfig.vision_backbone``; register before building or loading."""
    if name in VISION_BACKBONES and VISION_BACKBONES[name] is not builder:
        raise ValueError(f"vision backbone {name!r} is already registered")
    VISION_BACKBONES[name] = builder


def build_vision_backbone(config: PolicyConfig) -> nn.Module:
    try:
        builder = VISION_BACKBONES[config.vision_backbone]
    except KeyError:
        raise ValueError(
            f"unknown vision_backbone {config.vision_backbone!r}; available: {sorted(VISION_BACKBONES)} "
            "(add more with vlapt.models.vla.register_vision_backbone)"
        ) from None
    encoder = builder(config)
    if not isinstance(getattr(encoder, "num_tokens", None), int):
        raise TypeError(f"vision backbone {config.vision_backbone!r} must expose an int attribute num_tokens")
    return encoder


# --------------------------------------------------------------------------- policy


class VLAPolicy(nn.Module):
    """Actor-critic VLA policy over action chunks; see the module docstring for the design."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        config = copy.deepcopy(config).validate()
        self.config = config
        d = config.d_model

        self.vision = build_vision_backbone(config)
        self.image_pos = nn.Parameter(torch.zeros(1, self.vision.num_tokens, d))

        self.token_embed = nn.Embedding(config.vocab_size, d)
        self.language_pos = nn.Parameter(torch.zeros(1, config.max_instruction_tokens, d))
        self.language_encoder = Transformer(
            config.language_layers, d, config.n_heads, config.mlp_ratio, config.dropout
        )

        self.proprio_embed = nn.Linear(config.proprio_dim, d)
        self.readouts = nn.Parameter(torch.zeros(1, 2, d))
        self.token_type = nn.Embedding(5, d)
        self.trunk = Transformer(config.n_layers, d, config.n_heads, config.mlp_ratio, config.dropout)

        chunk_size = config.chunk_len * config.action_dim
        self.action_head = _mlp_head(d, chunk_size)
        self.value_head = _mlp_head(d, 1)
        self.log_std = nn.Parameter(torch.full((config.chunk_len, config.action_dim), float(config.init_log_std)))
        if config.correlated_noise:
            self.correlated_log_std = nn.Parameter(torch.full((config.action_dim,), float(config.init_correlated_log_std)))

        # Statistics live in the config; buffers are non-persistent so weights files hold only learned state.
        self.register_buffer("proprio_mean", _stat(config.proprio_mean, config.proprio_dim, 0.0), persistent=False)
        self.register_buffer("proprio_std", _stat(config.proprio_std, config.proprio_dim, 1.0), persistent=False)
        self.register_buffer("action_mean", _stat(config.action_mean, config.action_dim, 0.0), persistent=False)
        self.register_buffer("action_std", _stat(config.action_std, config.action_dim, 1.0), persistent=False)

        self.register_buffer("_static_allowed", self._readout_mask(), persistent=False)
        self.register_buffer("_token_types", self._trunk_token_types(), persistent=False)
        self._init_weights()

    # ------------------------------------------------------------------ construction helpers

    def _init_weights(self) -> None:
        for name, module in self.named_modules():
            if name.startswith("vision"):
                continue  # backbones keep their own (possibly pretrained) weights
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=0.02)
        for param in (self.image_pos, self.language_pos, self.readouts):
            nn.init.trunc_normal_(param, std=0.02)
        # Near-zero outputs at init: initial actions sit at the data mean and values near zero.
        nn.init.normal_(self.action_head[-1].weight, std=1e-3)
        nn.init.normal_(self.value_head[-1].weight, std=1e-2)

    def _readout_mask(self) -> torch.Tensor:
        """Which trunk token may attend to which, before language padding is applied."""
        n_obs = self.config.max_instruction_tokens + self.vision.num_tokens + 1
        size = n_obs + 2
        allowed = torch.zeros(size, size, dtype=torch.bool)
        allowed[:, :n_obs] = True  # everyone sees observations
        allowed[n_obs, n_obs] = True  # each readout also sees itself, never the other readout
        allowed[n_obs + 1, n_obs + 1] = True
        return allowed

    def _trunk_token_types(self) -> torch.Tensor:
        return torch.cat([
            torch.full((self.config.max_instruction_tokens,), _LANGUAGE),
            torch.full((self.vision.num_tokens,), _IMAGE),
            torch.tensor([_PROPRIO, _ACTION_READOUT, _VALUE_READOUT]),
        ])

    # ------------------------------------------------------------------ forward

    @property
    def chunk_len(self) -> int:
        return self.config.chunk_len

    @property
    def action_dim(self) -> int:
        return self.config.action_dim

    @property
    def device(self) -> torch.device:
        return self.log_std.device

    def forward(self, batch: dict[str, torch.Tensor]) -> PolicyOutput:
        image, proprio, ids, mask = self._check_batch(batch)
        batch_size, n_words = ids.shape

        words = self.token_embed(ids) + self.language_pos[:, :n_words]
        word_allowed = mask[:, None, None, :] | torch.eye(n_words, dtype=torch.bool, device=ids.device)
        words = self.language_encoder(words, word_allowed)

        if getattr(self.vision, "conditioned", False):
            valid = mask.unsqueeze(-1).to(words.dtype)
            summary = (words * valid).sum(1) / valid.sum(1).clamp(min=1.0)
            patches = self.vision(image, condition=summary)
        else:
            patches = self.vision(image)
        patches = patches + self.image_pos
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
        mean = self.action_head(action_readout).view(batch_size, self.config.chunk_len, self.config.action_dim)
        value = self.value_head(value_readout).squeeze(-1)
        log_std = self.clamped_log_std().expand_as(mean)
        return PolicyOutput(mean=mean, log_std=log_std, value=value, features=action_readout,
                            correlated_log_std=self.clamped_correlated_log_std())

    def _check_batch(self, batch: dict[str, torch.Tensor]):
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"policy batch is missing {missing}; build it with vlapt.models.make_batch")
        image, proprio, ids, mask = (batch[k] for k in BATCH_KEYS)
        size = self.config.image_size
        if image.dtype != torch.uint8:
            raise ValueError(f"batch['image'] must be uint8 (0-255 RGB), got {image.dtype}")
        if image.dim() != 4 or image.shape[1:] != (size, size, 3):
            raise ValueError(f"batch['image'] must have shape (B, {size}, {size}, 3), got {tuple(image.shape)}")
        if proprio.dim() != 2 or proprio.shape[1] != self.config.proprio_dim:
            raise ValueError(
                f"batch['proprio'] must have shape (B, {self.config.proprio_dim}), got {tuple(proprio.shape)}"
            )
        if ids.dim() != 2 or ids.shape != mask.shape or ids.shape[1] > self.config.max_instruction_tokens:
            raise ValueError(
                "batch['instruction_ids'] and ['instruction_mask'] must share shape (B, L) with "
                f"L <= {self.config.max_instruction_tokens}, got {tuple(ids.shape)} and {tuple(mask.shape)}"
            )
        if not (image.shape[0] == proprio.shape[0] == ids.shape[0]):
            raise ValueError(
                f"batch sizes differ: image {image.shape[0]}, proprio {proprio.shape[0]}, instruction {ids.shape[0]}"
            )
        return image, proprio, ids, mask.bool()

    # ------------------------------------------------------------------ distribution

    def clamped_log_std(self) -> torch.Tensor:
        return self.log_std.clamp(self.config.min_log_std, self.config.max_log_std)

    def clamped_correlated_log_std(self) -> torch.Tensor | None:
        if not self.config.correlated_noise:
            return None
        return self.correlated_log_std.clamp(self.config.min_log_std, self.config.max_log_std)

    def enable_correlated_noise(self, init_log_std: float) -> None:
        """Add the shared chunk-noise term to a policy trained without it (e.g. an SFT checkpoint)."""
        if self.config.correlated_noise:
            raise ValueError("this policy already has correlated chunk noise")
        self.config.correlated_noise = True
        self.config.init_correlated_log_std = float(init_log_std)
        self.config.validate()
        self.correlated_log_std = nn.Parameter(
            torch.full((self.config.action_dim,), float(init_log_std), device=self.log_std.device))

    @staticmethod
    def chunk_log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor,
                       correlated_log_std: torch.Tensor | None = None) -> torch.Tensor:
        """Exact Gaussian log-density of whole chunks ``(B, h, A)`` -> ``(B,)``.

        Diagonal: the sum over the ``h * A`` entries. With ``correlated_log_std`` (A,), per
        dimension the covariance is D + c^2 11^T with D = diag(sigma_t^2); Sherman-Morrison gives
        r^T S^-1 r = sum r^2/s^2 - c^2 (sum r/s^2)^2 / (1 + c^2 sum 1/s^2) and
        log det S = sum log s^2 + log(1 + c^2 sum 1/s^2).
        """
        if correlated_log_std is None:
            z = (actions - mean) * torch.exp(-log_std)
            return (-0.5 * z.square() - log_std - _LOG_SQRT_2PI).sum(dim=(-2, -1))
        residual = actions - mean
        precision = torch.exp(-2.0 * log_std).expand_as(residual)
        c2 = torch.exp(2.0 * correlated_log_std)
        total_precision = precision.sum(dim=-2)  # (B, A)
        weighted = (residual * precision).sum(dim=-2)
        denominator = 1.0 + c2 * total_precision
        quadratic = (residual.square() * precision).sum(dim=-2) - c2 * weighted.square() / denominator
        log_det = 2.0 * log_std.expand_as(residual).sum(dim=-2) + torch.log(denominator)
        h = residual.shape[-2]
        return (-0.5 * (quadratic + log_det) - h * _LOG_SQRT_2PI).sum(dim=-1)

    @staticmethod
    def chunk_entropy(log_std: torch.Tensor, correlated_log_std: torch.Tensor | None = None) -> torch.Tensor:
        entropy = (log_std + 0.5 + _LOG_SQRT_2PI).sum(dim=(-2, -1))
        if correlated_log_std is not None:  # + 0.5 log(1 + c^2 sum_t 1/s_t^2) per dimension
            total_precision = torch.exp(-2.0 * log_std).sum(dim=-2)
            entropy = entropy + 0.5 * torch.log1p(torch.exp(2.0 * correlated_log_std) * total_precision).sum(dim=-1)
        return entropy

    def log_prob(self, batch: dict[str, torch.Tensor], actions: torch.Tensor, steps: int = 0) -> torch.Tensor:
        """Log-likelihood ``(B,)`` of normalised action chunks ``(B, h, A)``; ``steps`` > 0: of their first ``steps``
        actions only (the ones a receding-horizon controller executes; the rest are never taken)."""
        out = self(batch)
        return self._scored_log_prob(out, self._check_actions(actions, out.mean), steps)

    def evaluate_actions(
        self, batch: dict[str, torch.Tensor], actions: torch.Tensor, steps: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log_prob, entropy, value)``, each ``(B,)``, from one forward pass (what a PPO update needs);
        ``steps`` as in `log_prob`, for the entropy too."""
        out = self(batch)
        log_prob = self._scored_log_prob(out, self._check_actions(actions, out.mean), steps)
        return log_prob, self.chunk_entropy(out.log_std[:, :self._scored_steps(steps)], out.correlated_log_std), out.value

    def _scored_log_prob(self, out: PolicyOutput, actions: torch.Tensor, steps: int) -> torch.Tensor:
        k = self._scored_steps(steps)
        return self.chunk_log_prob(out.mean[:, :k], out.log_std[:, :k], actions[:, :k], out.correlated_log_std)

    def _scored_steps(self, steps: int) -> int:
        if not 0 <= steps <= self.chunk_len:
            raise ValueError(f"steps must be in [0, {self.chunk_len}] (0: the whole chunk), got {steps}")
        return steps or self.chunk_len

    def entropy(self, batch: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Chunk entropy ``(B,)``; the std is state-independent, so only the batch size is read."""
        entropy = self.chunk_entropy(self.clamped_log_std(), self.clamped_correlated_log_std())
        if batch is None:
            return entropy.reshape(1)
        return entropy.expand(batch["proprio"].shape[0])

    def sample(
        self,
        batch: dict[str, torch.Tensor],
        deterministic: bool = False,
        generator: torch.Generator | None = None,
        steps: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(actions (B, h, A), log_prob (B,), value (B,))`` in normalised action space; the log-prob of the
        first ``steps`` actions only when ``steps`` > 0 (as in `log_prob`).

        Deterministic mode returns the mean; its log-prob is still reported so
        callers can log it uniformly.
        """
        out = self(batch)
        if deterministic:
            actions = out.mean
        else:
            noise = torch.randn(out.mean.shape, generator=generator, device=out.mean.device, dtype=out.mean.dtype)
            actions = out.mean + noise * out.log_std.exp()
            if out.correlated_log_std is not None:  # one draw per chunk and dimension, shared by its steps
                shared = torch.randn((out.mean.shape[0], 1, out.mean.shape[-1]), generator=generator,
                                     device=out.mean.device, dtype=out.mean.dtype)
                actions = actions + shared * out.correlated_log_std.exp()
        return actions, self._scored_log_prob(out, actions, steps), out.value

    def _check_actions(self, actions: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        if actions.shape != mean.shape:
            raise ValueError(
                f"actions must have shape (B, chunk_len, action_dim) = {tuple(mean.shape)}, got {tuple(actions.shape)}"
            )
        return actions.to(mean.dtype)

    # ------------------------------------------------------------------ action normalisation

    def normalize_actions(self, actions):
        """Environment actions ``(..., A)`` -> the space the Gaussian lives in; keeps numpy/torch type."""
        return self._affine(actions, self.config.action_mean, self.config.action_std, inverse=False)

    def unnormalize_actions(self, actions):
        """Inverse of :meth:`normalize_actions`; does not clip (the inference wrapper does)."""
        return self._affine(actions, self.config.action_mean, self.config.action_std, inverse=True)

    def _affine(self, actions, mean: list[float], std: list[float], inverse: bool):
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

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def _stat(values: list[float], dim: int, fill: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32) if values else torch.full((dim,), fill)
