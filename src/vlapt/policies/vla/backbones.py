"""Pretrained Hugging Face vision towers from local disk (``vision_backbone="hf"``).

``vision_backbone_path`` names a directory written by ``save_pretrained``: a vision model that
returns patch tokens (ViT, DeiT, DINOv2, ``CLIPVisionModel``, ``SiglipVisionModel``, ...) or a
model with a vision tower (CLIP, SigLIP, a VLM such as SmolVLM / Idefics3), whose tower alone
is kept. It loads with ``local_files_only=True`` and ``use_safetensors=True``: nothing is
downloaded, and a directory that holds only pickled weights (``pytorch_model.bin``, ``*.pt``)
is refused, never unpickled. The tower's architecture and pixel statistics are recorded in
``vision_backbone_spec``, so a saved policy rebuilds it from its own checkpoint (weights in
model.safetensors) without the original directory.

``vision_trainable`` freezes the tower ("none"), or all but its last k transformer layers
("last_<k>"); ``vision_lora_rank`` adds LoRA adapters to the attention query and value
projections of a frozen tower, the only part of it that then trains.

``language_backbone="hf"`` likewise reads instructions with a pretrained text model, or the
text tower of a CLIP / SigLIP / VLM directory (`HFLanguageEncoder`), and its own tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlapt.policies.vla.config import PolicyConfig, trainable_blocks
from vlapt.policies.vla.encoder import VisionEncoder

PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
BEFORE_OR_UNUSED = ("embed", "pre_layrnorm", "pooler", "head")  # parameters "last_<k>" leaves frozen besides early layers
LORA_TARGETS = ("q_proj", "v_proj", "query", "value")  # CLIP / SigLIP / Idefics3 and ViT / DINOv2 names


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``B A x`` (B starts at zero: no change at first)."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        for param in base.parameters():
            param.requires_grad_(False)

    # attention code may read the projection's attributes (dtype, device, sizes)
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b)


class HFVisionEncoder(VisionEncoder):
    """Resize, normalise, run the tower, pool its patch grid to ``image_grid x image_grid`` tokens, project."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        try:
            from transformers import AutoConfig, AutoModel
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("vision_backbone='hf' needs transformers: pip install 'vlapt[hf]'") from exc
        if config.vision_backbone_spec:
            spec = json.loads(config.vision_backbone_spec)
            hf_config = dict(spec["hf_config"])
            self.backbone = AutoModel.from_config(AutoConfig.for_model(hf_config.pop("model_type"), **hf_config))
        else:
            path = Path(config.vision_backbone_path).expanduser()
            check_model_directory(path)
            loaded = AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
            self.backbone = _vision_tower(loaded, AutoModel)
            spec = {"hf_config": self.backbone.config.to_dict(), **_pixel_statistics(path)}
            config.vision_backbone_spec = json.dumps(spec)  # recorded in the policy's saved config
        vision_config = self.backbone.config
        self.input_size = int(vision_config.image_size)
        self.patch_grid = self.input_size // int(vision_config.patch_size)
        hidden = int(vision_config.hidden_size)
        self.register_buffer("pixel_mean", torch.tensor(spec["image_mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(spec["image_std"]).view(1, 3, 1, 1), persistent=False)
        self.grid = config.image_grid
        self.num_tokens = config.image_grid**2
        self.layers = _transformer_layers(self.backbone)
        self.lora_rank = config.vision_lora_rank
        if self.lora_rank:
            _add_lora(self.backbone, self.lora_rank)
        self.project = nn.Linear(hidden, config.d_model)
        self.set_trainable(config.vision_trainable)

    # -- freezing -----------------------------------------------------------------------------------
    def set_trainable(self, mode: str) -> None:
        trained = trainable_blocks(mode)
        if self.lora_rank and mode != "none":
            raise ValueError("LoRA adapters train a frozen tower: vision_trainable must stay 'none' with vision_lora_rank")
        self.trainable = mode
        for name, param in self.backbone.named_parameters():
            param.requires_grad_(trained is None or ".lora_" in name)
        if trained:
            if not self.layers:
                raise ValueError(f"vision_trainable={mode!r}: vlapt finds no transformer layers in "
                                 f"{type(self.backbone).__name__}; use 'all' or 'none'")
            for layer in self.layers[-trained:]:
                for param in layer.parameters():
                    param.requires_grad_(True)
            layer_params = {id(p) for layer in self.layers for p in layer.parameters()}
            for name, param in self.backbone.named_parameters():  # what follows the layers (final norm, pooler)
                if id(param) not in layer_params and not any(part in name for part in BEFORE_OR_UNUSED):
                    param.requires_grad_(True)
        self.train(self.training)

    def frozen_modules(self) -> list[nn.Module]:
        return [] if self.trainable == "all" else [self.backbone]

    def cacheable(self) -> bool:
        # only a wholly frozen tower gives fixed features; partly trained or adapted, it runs every time
        return self.trainable == "none" and not self.lora_rank and super().cacheable()

    def train(self, mode: bool = True) -> "HFVisionEncoder":
        nn.Module.train(self, mode)
        if self.trainable == "none" and not self.lora_rank:
            self.backbone.eval()
        return self

    # -- the two halves -----------------------------------------------------------------------------
    def features(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = (x - self.pixel_mean) / self.pixel_std
        return self._pooled(x) if self.cacheable() else x

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features if self.cacheable() else self._pooled(features)
        return self.project(pooled)

    def _pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(pixel_values=pixels).last_hidden_state
        patches = tokens[:, -self.patch_grid**2 :]  # drop CLS/register tokens in front of the patch grid
        b, n, c = patches.shape
        grid = patches.transpose(1, 2).reshape(b, c, self.patch_grid, self.patch_grid)
        return F.adaptive_avg_pool2d(grid, self.grid).flatten(2).transpose(1, 2)


def check_model_directory(path: Path) -> None:
    """A directory with safetensors weights; pickled-only weights are refused with how to convert them."""
    if not path.is_dir():
        raise ValueError(f"vision_backbone_path {str(path)!r} is not a directory; point it at a locally saved "
                         "Hugging Face model (e.g. from model.save_pretrained(dir), or a downloaded model snapshot)")
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern))
    if pickled:
        raise ValueError(f"{path} holds only pickled weights ({', '.join(pickled)}), which vlapt never loads (unpickling "
                         "can run code). Convert them once to safetensors on a machine you trust, e.g. "
                         "`model = AutoModel.from_pretrained(dir); model.save_pretrained(dir)` (transformers writes "
                         "model.safetensors), then point vision_backbone_path at that directory")
    raise ValueError(f"{path} has no *.safetensors weights; save the model there with model.save_pretrained(dir)")


def _vision_tower(model: nn.Module, auto_model) -> nn.Module:
    """The model itself if it is a vision model, else its vision tower as a standalone model of its own config."""
    tower = getattr(model, "vision_model", None)
    if tower is None and hasattr(getattr(model, "model", None), "vision_model"):
        tower = model.model.vision_model  # a VLM with a language-model head
    vision_config = getattr(model.config, "vision_config", None)
    if tower is None or vision_config is None:
        if vision_config is not None:
            raise ValueError(f"{type(model).__name__} has a vision_config but no vision_model tower vlapt can find")
        return model
    standalone = auto_model.from_config(vision_config)
    state = tower.state_dict()
    for target in (standalone, getattr(standalone, "vision_model", None)):
        if target is not None and set(target.state_dict()) == set(state):
            target.load_state_dict(state)
            return standalone
    raise ValueError(f"cannot match the vision tower of {type(model).__name__} to {type(standalone).__name__}")


def _transformer_layers(backbone: nn.Module) -> list[nn.Module]:
    """The tower's transformer layers in order: its longest module list named ``layers`` or ``layer``."""
    lists = [module for name, module in backbone.named_modules()
             if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "layer")]
    return list(max(lists, key=len)) if lists else []


def _add_lora(backbone: nn.Module, rank: int) -> None:
    targets = [(name, module) for name, module in backbone.named_modules()
               if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS]
    if not targets:
        raise ValueError(f"vision_lora_rank: {type(backbone).__name__} has no attention projections named "
                         f"{', '.join(LORA_TARGETS)} to adapt")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(backbone.get_submodule(parent_name) if parent_name else backbone, child, LoRALinear(module, rank))


def _pixel_statistics(path: Path) -> dict:
    processor = path / "preprocessor_config.json"
    if processor.is_file():
        data = json.loads(processor.read_text())
        if "image_mean" in data and "image_std" in data:
            return {"image_mean": list(data["image_mean"]), "image_std": list(data["image_std"])}
    return {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


# --------------------------------------------------------------------------- language towers
TOKENIZER_FILE = "language_tokenizer.json"


class HFTokenizer:
    """A Hugging Face fast tokenizer (its ``tokenizer.json``) with `Tokenizer.encode`'s fixed-length interface."""

    def __init__(self, tokenizer_json: str, pad_id: int):
        from tokenizers import Tokenizer as BackendTokenizer

        self.json = tokenizer_json
        self.backend = BackendTokenizer.from_str(tokenizer_json)
        self.backend.no_padding()
        self.backend.no_truncation()
        self.pad_id = int(pad_id)
        self.vocab: list[str] = []  # subword tokenizers read any text: no unknown words to warn about

    def encode(self, texts, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), max_len), dtype=torch.bool)
        for row, encoding in enumerate(self.backend.encode_batch(list(texts))):
            tokens = encoding.ids[:max_len] or [self.pad_id]  # never empty, so attention always has a real key
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = True
        return ids, mask


class HFLanguageEncoder(nn.Module):
    """A pretrained text model (or a CLIP / SigLIP / VLM's text tower) from local disk, projected to ``d_model``.

    Instructions are tokenized with the model's own fast tokenizer, whose ``tokenizer.json`` the
    saved policy carries (``language_tokenizer.json``, its SHA-256 in ``language_backbone_spec``).
    Frozen (``language_trainable="none"``), its features are cached per distinct instruction.
    """

    def __init__(self, config: PolicyConfig, tokenizer_json: str | None = None):
        super().__init__()
        try:
            import transformers
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("language_backbone='hf' needs transformers: pip install 'vlapt[hf]'") from exc
        if config.language_backbone_spec:
            spec = json.loads(config.language_backbone_spec)
            if tokenizer_json is None:
                raise ValueError(f"a policy with a Hugging Face language tower needs its {TOKENIZER_FILE}; load it with "
                                 "vlapt.load_policy(directory), which reads the file beside the weights")
            if hashlib.sha256(tokenizer_json.encode()).hexdigest() != spec["tokenizer_sha256"]:
                raise ValueError(f"{TOKENIZER_FILE} does not match the SHA-256 in the policy's config: it was modified "
                                 "after the checkpoint was written; re-save the checkpoint")
            model_class, config_class = _transformers_class(spec["model_class"]), _transformers_class(spec["config_class"])
            self.backbone = model_class(config_class(**spec["hf_config"]))
        else:
            path = Path(config.language_backbone_path).expanduser()
            check_model_directory(path)
            loaded = transformers.AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
            self.backbone = getattr(loaded, "text_model", None) or loaded
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise ValueError(f"{path} has no fast tokenizer (tokenizer.json); save one there with "
                                 "AutoTokenizer.from_pretrained(dir).save_pretrained(dir) on a machine with transformers")
            tokenizer_json = backend.to_str()
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
            for cls in (type(self.backbone), type(self.backbone.config)):
                _transformers_class(cls.__name__)  # rebuildable from the spec
            spec = {"model_class": type(self.backbone).__name__, "config_class": type(self.backbone.config).__name__,
                    "hf_config": self.backbone.config.to_dict(), "pad_id": int(pad_id),
                    "tokenizer_sha256": hashlib.sha256(tokenizer_json.encode()).hexdigest()}
            config.language_backbone_spec = json.dumps(spec)
        self.tokenizer = HFTokenizer(tokenizer_json, spec["pad_id"])
        self.layers = _transformer_layers(self.backbone)
        self.project = nn.Linear(int(self.backbone.config.hidden_size), config.d_model)
        self.set_trainable(config.language_trainable)

    def set_trainable(self, mode: str) -> None:
        trained = trainable_blocks(mode)
        self.trainable = mode
        for param in self.backbone.parameters():
            param.requires_grad_(trained is None)
        if trained:
            if not self.layers:
                raise ValueError(f"language_trainable={mode!r}: vlapt finds no transformer layers in "
                                 f"{type(self.backbone).__name__}; use 'all' or 'none'")
            layer_params = {id(p) for layer in self.layers for p in layer.parameters()}
            for layer in self.layers[-trained:]:
                for param in layer.parameters():
                    param.requires_grad_(True)
            for name, param in self.backbone.named_parameters():
                if id(param) not in layer_params and not any(part in name for part in BEFORE_OR_UNUSED):
                    param.requires_grad_(True)
        self.train(self.training)

    def cacheable(self) -> bool:
        return self.trainable == "none" and not any(p.requires_grad for p in self.backbone.parameters())

    def train(self, mode: bool = True) -> "HFLanguageEncoder":
        super().train(mode)
        if self.trainable == "none":
            self.backbone.eval()
        return self

    @staticmethod
    def pack(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Ids and mask side by side: the key a cache stores an instruction's features under."""
        return torch.cat([ids, mask.long()], dim=1)

    def features(self, packed: torch.Tensor) -> torch.Tensor:
        ids, mask = packed.chunk(2, dim=1)
        return self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        return self.project(features)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.tokens(self.features(self.pack(ids, mask)))


def _transformers_class(name: str):
    """A model or config class that transformers exports by ``name`` (nothing else is ever instantiated)."""
    import transformers

    cls = getattr(transformers, name, None)
    if not isinstance(cls, type) or not issubclass(cls, (transformers.PreTrainedModel, transformers.PretrainedConfig)):
        raise ValueError(f"{name!r} is not a model or config class of transformers {transformers.__version__}")
    return cls
