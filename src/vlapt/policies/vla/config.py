"""Policy architecture config and named size presets.

The config is the single source of truth for rebuilding a policy: a checkpoint
stores it as JSON next to the weights, and training configs embed it as an
OmegaConf structured node, so it holds only plain scalar and list fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from vlapt.config import check_at_least
from vlapt.interfaces import camera_views
from vlapt.policies.vla.tokenizer import check_vocab

MODEL_SIZES: dict[str, dict[str, Any]] = {
    # Smallest thing that exercises every code path; meant for unit tests (image_size 32).
    "tiny": dict(
        d_model=32,
        n_layers=1,
        n_heads=2,
        mlp_ratio=2.0,
        language_layers=1,
        image_channels=[8, 16, 16],
        image_grid=4,
    ),
    # Small enough to train on a 2-core CPU (~1M parameters).
    "default": dict(
        d_model=128,
        n_layers=3,
        n_heads=4,
        mlp_ratio=4.0,
        language_layers=1,
        image_channels=[32, 64, 128, 128],
        image_grid=4,
    ),
    # Octo-small scale (~26M parameters); meant for GPUs.
    "large": dict(
        d_model=384,
        n_layers=12,
        n_heads=6,
        mlp_ratio=4.0,
        language_layers=2,
        image_channels=[32, 64, 128, 256],
        image_grid=4,
    ),
}


@dataclass
class PolicyConfig:
    """Everything needed to rebuild a :class:`~vlapt.policies.vla.VLAPolicy` bit for bit.

    Defaults equal the ``"default"`` preset with the settings `vlapt sft` trains by default;
    use :func:`policy_config_for_size` to start from another preset.
    """

    size: str = "default"
    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    language_layers: int = 1

    # "conv" (trained from scratch), "hf" (a Hugging Face vision model or a VLM's vision tower, from local disk)
    # or "efficientnet_lite0" (ImageNet-pretrained EfficientNet-Lite0); more with register_vision_backbone
    vision_backbone: str = "conv"
    # "hf": local directory of a pretrained model (safetensors weights; nothing is downloaded).
    # "efficientnet_lite0": its weights as a .safetensors file; "": the converted copy in the weights cache
    # (vlapt.policies.vla.efficientnet); "random": no pretrained weights
    vision_backbone_path: str = ""
    vision_backbone_spec: str = ""  # pretrained backbones: filled in when built; the checkpoint then carries the weights
    vision_input_size: int = 0  # pixels the backbone runs at ("efficientnet_lite0"); 0: image_size
    vision_trainable: str = "all"  # "all": fine-tuned | "none": frozen (features cached) | "last_<k>": only the last k blocks
    vision_lora_rank: int = 0  # "hf" with vision_trainable="none": LoRA adapters of this rank on attention projections
    feature_cache_mb: int = 1024  # memory for cached features of a frozen image encoder (LRU); 0: no cache
    image_size: int = 96
    image_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])
    image_grid: int = 4
    image_keypoints: int = 16  # "conv": extra spatial-softmax keypoint tokens (sub-patch positions); 0 disables

    # "words": vlapt's word tokenizer + a small transformer, trained from scratch; "hf": a pretrained Hugging Face text
    # model (or a CLIP / SigLIP / VLM's text tower) from language_backbone_path, with its own tokenizer
    language_backbone: str = "words"
    language_backbone_path: str = ""
    language_backbone_spec: str = ""  # "hf": filled in when built; the checkpoint then carries weights and tokenizer
    language_trainable: str = "all"  # "hf": "all" | "none" (frozen, features cached per instruction) | "last_<k>"

    chunk_len: int = 10
    action_dim: int = 4
    proprio_dim: int = 4
    max_instruction_tokens: int = 16
    vocab: list[str] = field(default_factory=list)

    init_log_std: float = -1.0
    min_log_std: float = -5.0
    max_log_std: float = 1.0

    # Per-dimension normalisation statistics; empty means identity.
    proprio_mean: list[float] = field(default_factory=list)
    proprio_std: list[float] = field(default_factory=list)
    action_mean: list[float] = field(default_factory=list)
    action_std: list[float] = field(default_factory=list)

    # Observation spec the policy was trained on, recorded so users feed it the same inputs.
    camera: str = ""  # the suite's camera name ("a+b": two views side by side); "": the suite's default view
    camera_fovy: float = 0.0  # 0: the camera's own field of view
    proprio_fields: list[str] = field(default_factory=list)  # names of the proprio entries, as the suite reports them

    @property
    def views(self) -> int:
        """Camera views side by side in each image, each ``image_size`` square, encoded one by one."""
        return len(camera_views(self.camera))

    @property
    def vocab_size(self) -> int:
        """Embedding rows; an empty vocab still reserves [PAD] and [UNK]."""
        return max(len(self.vocab), 2)

    def validate(self) -> "PolicyConfig":
        """Raise ValueError describing the first inconsistency; return self when valid."""
        _check_field_types(self)
        if self.size not in MODEL_SIZES:
            raise ValueError(f"unknown model size {self.size!r}; choose one of {sorted(MODEL_SIZES)}")
        check_at_least(self, 1, "d_model", "n_layers", "n_heads", "language_layers", "image_size", "image_grid",
                       "chunk_len", "action_dim", "proprio_dim", "max_instruction_tokens")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.image_channels or any(c < 1 for c in self.image_channels):
            raise ValueError(f"image_channels must be a non-empty list of positive widths, got {self.image_channels}")
        if not self.min_log_std < self.max_log_std:
            raise ValueError(f"min_log_std ({self.min_log_std}) must be < max_log_std ({self.max_log_std})")
        if not self.min_log_std <= self.init_log_std <= self.max_log_std:
            raise ValueError(
                f"init_log_std ({self.init_log_std}) must lie in [min_log_std, max_log_std] "
                f"= [{self.min_log_std}, {self.max_log_std}]"
            )
        trainable_blocks(self.vision_trainable)  # raises on a malformed value
        trainable_blocks(self.language_trainable)
        if self.language_backbone not in ("words", "hf"):
            raise ValueError(f"language_backbone must be 'words' or 'hf', got {self.language_backbone!r}")
        if self.language_backbone == "words" and self.language_trainable != "all":
            raise ValueError("language_trainable applies to a pretrained language tower (language_backbone='hf'); "
                             "vlapt's own word encoder trains whole")
        check_at_least(self, 0, "vision_input_size", "vision_lora_rank", "feature_cache_mb")
        if self.vision_lora_rank and (self.vision_backbone != "hf" or self.vision_trainable != "none"):
            raise ValueError(f"vision_lora_rank={self.vision_lora_rank} adapts a frozen Hugging Face backbone: it needs "
                             f"vision_backbone='hf' and vision_trainable='none', got {self.vision_backbone!r} and "
                             f"{self.vision_trainable!r}")
        if self.image_keypoints < 0:
            raise ValueError(f"image_keypoints must be >= 0, got {self.image_keypoints}")
        if self.image_keypoints and self.vision_backbone != "conv":
            raise ValueError(
                f"image_keypoints applies to the 'conv' vision backbone only, got vision_backbone="
                f"{self.vision_backbone!r}; set image_keypoints=0"
            )
        if self.vocab:
            check_vocab(self.vocab)
        if self.proprio_fields and len(self.proprio_fields) != self.proprio_dim:
            raise ValueError(
                f"proprio_fields names {len(self.proprio_fields)} entries but proprio_dim is {self.proprio_dim}"
            )
        _check_stats("proprio", self.proprio_mean, self.proprio_std, self.proprio_dim)
        _check_stats("action", self.action_mean, self.action_std, self.action_dim)
        return self


def trainable_blocks(mode: str) -> int | None:
    """``vision_trainable`` as a number of trailing blocks to train: None for "all", 0 for "none", k for "last_<k>"."""
    if mode == "all":
        return None
    if mode == "none":
        return 0
    prefix, _, count = mode.partition("_")
    if prefix == "last" and count.isdigit() and int(count) >= 1:
        return int(count)
    raise ValueError(f"vision_trainable must be 'all', 'none' or 'last_<k>' (e.g. 'last_2': train only the last 2 "
                     f"blocks of the image encoder), got {mode!r}")


def policy_config_for_size(size: str, **overrides: Any) -> PolicyConfig:
    """Config from the named preset, with any field replaced by ``overrides``."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    known = {f.name for f in dataclasses.fields(PolicyConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown PolicyConfig field(s) {unknown}; valid fields: {sorted(known)}")
    values = {**MODEL_SIZES[size], **overrides, "size": size}
    return PolicyConfig(**values).validate()


def _check_stats(name: str, mean: list[float], std: list[float], dim: int) -> None:
    if not mean and not std:
        return
    if len(mean) != dim or len(std) != dim:
        raise ValueError(
            f"{name}_mean and {name}_std must both be empty or both have {name}_dim={dim} entries, "
            f"got {len(mean)} and {len(std)}"
        )
    if not all(math.isfinite(m) for m in mean):
        raise ValueError(f"{name}_mean must be finite, got {mean}")
    if not all(math.isfinite(s) and s > 0 for s in std):
        raise ValueError(f"{name}_std must be finite and > 0, got {std}")


_SCALARS = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _check_field_types(config: PolicyConfig) -> None:
    """Catch wrongly typed values early (e.g. from a hand-edited config.json)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        annotation = str(f.type)
        is_list = annotation.startswith("list[")
        item_type = _SCALARS.get(annotation[len("list["):-1] if is_list else annotation)
        if item_type is None:
            continue
        items = value if is_list and isinstance(value, (list, tuple)) else [value]
        ok = (is_list == isinstance(value, (list, tuple))) and all(
            isinstance(v, item_type) and not _is_bool_posing_as_number(v, item_type) for v in items
        )
        if not ok:
            raise ValueError(f"PolicyConfig.{f.name} must be {annotation}, got {value!r}")


def _is_bool_posing_as_number(value: Any, expected: Any) -> bool:
    return isinstance(value, bool) and expected is not bool
