"""The VLA's building blocks: transformer layers and vision encoders (a registry of them).

The policy (`vlapt.policies.vla.policy`) mixes instruction words, image tokens and
proprioception in a transformer trunk; an image encoder here turns a uint8 image batch into
tokens. Pretrained encoders live in their own modules (`backbones` for Hugging Face towers,
`efficientnet` for EfficientNet-Lite0) and are imported only when selected.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlapt.policies.vla.config import PolicyConfig
from vlapt.policies.vla.encoder import VisionEncoder

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


class ConvVisionEncoder(VisionEncoder):
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
        self.num_tokens = config.image_grid**2 + self.keypoints
        self.set_trainable(config.vision_trainable)

    def set_trainable(self, mode: str) -> None:
        if mode not in ("all", "none"):
            raise ValueError(f"the 'conv' image encoder trains whole or not at all: vision_trainable must be 'all' or "
                             f"'none', got {mode!r}")
        self.trainable = mode
        for param in self.parameters():
            param.requires_grad_(mode == "all")
        self.train(self.training)

    def frozen_modules(self) -> list[nn.Module]:
        return [self] if self.trainable == "none" else []

    # frozen, the whole encoder is the cached part; training, all of it runs on every call
    def features(self, image: torch.Tensor) -> torch.Tensor:
        return self._encode(image) if self.trainable == "none" else image

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.trainable == "none" else self._encode(features)

    def train(self, mode: bool = True) -> "ConvVisionEncoder":
        nn.Module.train(self, mode)  # no dropout or batch statistics: the mode changes nothing here
        return self

    def _encode(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        keypoint_input = None
        for index, layer in enumerate(self.convs):
            x = layer(x)
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
    from vlapt.policies.vla.backbones import HFVisionEncoder

    return HFVisionEncoder(config)


def _efficientnet_lite0_encoder(config: PolicyConfig) -> nn.Module:
    from vlapt.policies.vla.efficientnet import EfficientNetLite0Encoder

    return EfficientNetLite0Encoder(config)


VISION_BACKBONES: dict[str, VisionBackboneBuilder] = {
    "conv": ConvVisionEncoder, "hf": _hf_vision_encoder, "efficientnet_lite0": _efficientnet_lite0_encoder,
}
"""Extension point for image encoders, selected by ``PolicyConfig.vision_backbone``.

A builder takes the config and returns a module that maps a uint8 image batch
``(B, H, W, 3)`` to tokens ``(B, N, d_model)`` and exposes ``num_tokens = N``.
It owns its own pixel normalisation, so a pretrained encoder (e.g. a timm or
transformers model loaded from local disk) can apply the statistics it was
trained with, and keeps whatever weights it was built with (the policy's
initialisation skips it). The policy adds learned positional embeddings on top.
A `VisionEncoder` subclass also gets partial freezing (``vision_trainable``) and
feature caching; a plain module trains whole and is never cached.
"""


def register_vision_backbone(name: str, builder: VisionBackboneBuilder) -> None:
    """Make ``name`` usable as ``PolicyConfig.vision_backbone``; register before building or loading."""
    if name in VISION_BACKBONES and VISION_BACKBONES[name] is not builder:
        raise ValueError(f"vision backbone {name!r} is already registered")
    VISION_BACKBONES[name] = builder


VISION_BACKBONE_GROUP = "vlapt.vision_backbones"  # entry-point group: installed packages declare builders by name


def vision_backbone_builder(name: str, option: str = "vision_backbone") -> VisionBackboneBuilder:
    """The builder registered as ``name``, or the one an installed package declares under that name in the
    ``vlapt.vision_backbones`` entry-point group (so a policy saved with it loads in every process). A checkpoint
    names only a backbone: it never makes loading import a module nobody declared. Errors name ``option``, the
    setting the name came from."""
    if name in VISION_BACKBONES:
        return VISION_BACKBONES[name]
    from vlapt.plugins import NOT_DECLARED, declared_names, load_declared

    builder = load_declared(VISION_BACKBONE_GROUP, name, what=option)
    if builder is not NOT_DECLARED:
        if not callable(builder):
            raise ValueError(f"{option} {name!r} is declared as a {type(builder).__name__}, not a builder "
                             "(config -> module)")
        return builder
    known = sorted(set(VISION_BACKBONES) | declared_names(VISION_BACKBONE_GROUP))
    raise ValueError(f"unknown {option} {name!r}; available: {known} (a builder of your own: declare it in the "
                     f"{VISION_BACKBONE_GROUP!r} entry-point group of its package, or register it in this process "
                     "with vlapt.policies.vla.register_vision_backbone)")


def build_vision_backbone(config: PolicyConfig) -> nn.Module:
    encoder = vision_backbone_builder(config.vision_backbone)(config)
    if not isinstance(getattr(encoder, "num_tokens", None), int):
        raise TypeError(f"vision backbone {config.vision_backbone!r} must expose an int attribute num_tokens")
    if config.vision_trainable != "all" and not isinstance(encoder, VisionEncoder):
        raise ValueError(f"vision backbone {config.vision_backbone!r} is not a VisionEncoder, so it cannot be frozen; "
                         "set vision_trainable='all' or subclass vlapt.policies.vla.encoder.VisionEncoder")
    return encoder
