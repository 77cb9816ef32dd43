"""Pretrained vision backbones from local disk (the path to GPU-scale VLAs).

``vision_backbone="hf"`` wraps any Hugging Face vision model that returns patch tokens
(ViT, DeiT, DINOv2, SigLIP's vision tower, ...) loaded with ``local_files_only=True`` from
``vision_backbone_path``: nothing is downloaded at run time. Its architecture and pixel
statistics are recorded in ``vision_backbone_spec``, so a saved policy rebuilds the
backbone from its own checkpoint (weights in model.safetensors) without the original
directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlapt.policies.vla.config import PolicyConfig


class HFVisionEncoder(nn.Module):
    """Resize, normalise, run the backbone, pool its patch grid to ``image_grid x image_grid`` tokens."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        try:
            from transformers import AutoConfig, AutoModel
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("vision_backbone='hf' needs transformers: pip install transformers") from exc
        if config.vision_backbone_spec:
            spec = json.loads(config.vision_backbone_spec)
            hf_config = dict(spec["hf_config"])
            self.backbone = AutoModel.from_config(AutoConfig.for_model(hf_config.pop("model_type"), **hf_config))
        else:
            path = Path(config.vision_backbone_path)
            if not path.is_dir():
                raise ValueError(
                    f"vision_backbone_path {str(path)!r} is not a directory; point it at a locally saved "
                    "Hugging Face vision model (e.g. from model.save_pretrained(dir))"
                )
            self.backbone = AutoModel.from_pretrained(str(path), local_files_only=True)
            spec = {"hf_config": self.backbone.config.to_dict(), **_pixel_statistics(path)}
            config.vision_backbone_spec = json.dumps(spec)  # recorded in the policy's saved config
        vision_config = getattr(self.backbone.config, "vision_config", self.backbone.config)
        self.input_size = int(vision_config.image_size)
        self.patch_grid = self.input_size // int(vision_config.patch_size)
        hidden = int(vision_config.hidden_size)
        self.register_buffer("pixel_mean", torch.tensor(spec["image_mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(spec["image_std"]).view(1, 3, 1, 1), persistent=False)
        self.project = nn.Linear(hidden, config.d_model)
        self.grid = config.image_grid
        self.num_tokens = config.image_grid**2

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = (x - self.pixel_mean) / self.pixel_std
        tokens = self.backbone(pixel_values=x).last_hidden_state
        patches = tokens[:, -self.patch_grid**2 :]  # drop CLS/register tokens in front of the patch grid
        b, n, c = patches.shape
        grid = patches.transpose(1, 2).reshape(b, c, self.patch_grid, self.patch_grid)
        pooled = F.adaptive_avg_pool2d(grid, self.grid).flatten(2).transpose(1, 2)
        return self.project(pooled)


def _pixel_statistics(path: Path) -> dict:
    processor = path / "preprocessor_config.json"
    if processor.is_file():
        data = json.loads(processor.read_text())
        if "image_mean" in data and "image_std" in data:
            return {"image_mean": list(data["image_mean"]), "image_std": list(data["image_std"])}
    return {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
