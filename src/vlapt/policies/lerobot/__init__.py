"""LeRobot policy directories as vlapt policies: detection, loading by LeRobot policy type, LeRobot's files.

A LeRobot policy directory (what ``policy.save_pretrained`` and the processors' ``save_pretrained``
write) holds LeRobot's ``config.json`` (``"type": "act"``, ...), ``model.safetensors`` and the
processor files (``policy_preprocessor.json``, ``policy_postprocessor.json`` and their state
files, which carry the normalisation statistics). `vlapt.policies.load_policy` recognises such a
directory by its ``config.json`` and hands it to the family registered for its type here.

A vlapt family that wraps a LeRobot policy saves in the same layout, so the post-trained policy
loads in LeRobot again, and adds two files LeRobot ignores: ``vlapt_policy.json`` (what vlapt
needs besides LeRobot's config: the observation settings, the exploration and value heads'
shapes, metadata, and SHA-256 digests of the weights) and ``vlapt_heads.safetensors`` (the
learned log-std and the value head).

Which LeRobot types chunked PPO can post-train, and why the others cannot (yet), is
`POST_TRAINABLE` / `NOT_POST_TRAINABLE` and docs/policies.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlapt.policies.checkpoint import CheckpointError, file_sha256, publish_directory

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SIDECAR_FILE = "vlapt_policy.json"
HEADS_FILE = "vlapt_heads.safetensors"
SIDECAR_FORMAT = "vlapt-lerobot-policy"
SIDECAR_VERSION = 1
PREPROCESSOR = "policy_preprocessor.json"
POSTPROCESSOR = "policy_postprocessor.json"
# LeRobot's files that travel with a policy when vlapt saves it (the weights are written anew)
KEPT_FILES = ("config.json", "train_config.json", "README.md")
KEPT_PREFIXES = ("policy_preprocessor", "policy_postprocessor")

# LeRobot policy type -> the vlapt loader (path -> policy)
POST_TRAINABLE: dict[str, str] = {
    "act": "vlapt.policies.lerobot.act:load_act",
}
NOT_POST_TRAINABLE: dict[str, str] = {
    "diffusion": "a denoising-diffusion policy has no tractable likelihood of a chunk, which chunked PPO's ratio needs",
    "smolvla": "a flow-matching policy has no tractable likelihood of a chunk (docs/policies.md describes a learned "
               "noise head that would give one)",
    "pi0": "a flow-matching policy has no tractable likelihood of a chunk (see docs/policies.md)",
    "pi05": "a flow-matching policy has no tractable likelihood of a chunk (see docs/policies.md)",
    "pi0_fast": "its actions are autoregressive FAST tokens: a likelihood exists, but no vlapt family wraps it yet",
    "vqbet": "its actions are VQ-BeT codes plus offsets: no vlapt family wraps it yet",
    "tdmpc": "TD-MPC plans with a world model; it is not a chunk policy",
    "sac": "LeRobot's SAC is trained by LeRobot's own RL (HIL-SERL), not by chunked PPO",
}


def lerobot_policy_type(path: str | os.PathLike) -> str | None:
    """The LeRobot policy type of directory ``path`` (``config.json`` with a ``"type"``), else None."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return None
    try:
        document = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    if not isinstance(document, dict) or "format" in document or not isinstance(document.get("type"), str):
        return None
    return document["type"]


def load_lerobot_policy(path: str | os.PathLike, policy_type: str):
    """The vlapt policy wrapping the LeRobot policy of type ``policy_type`` saved in ``path``."""
    import importlib

    target = POST_TRAINABLE.get(policy_type)
    if target is None:
        why = NOT_POST_TRAINABLE.get(policy_type, "no vlapt family wraps this LeRobot policy type")
        raise CheckpointError(f"{path} is a LeRobot {policy_type!r} policy, which vlapt cannot post-train: {why}. "
                              f"Post-trainable LeRobot types: {', '.join(sorted(POST_TRAINABLE))}")
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)(Path(path))


def require_lerobot(what: str):
    """Import LeRobot, or say how to get it."""
    try:
        import lerobot  # noqa: F401
    except ImportError as exc:
        raise CheckpointError(
            f"{what} needs the lerobot package, which is not importable here ({exc}). Install it with "
            "pip install 'vlapt[lerobot]' (LeRobot 0.4.x requires torch < 2.11 and a torchvision built for that "
            "torch: install it where its own requirements are met)") from exc


# -- the processors' normalisation -----------------------------------------------------------------------
MODES = ("MEAN_STD", "MIN_MAX", "QUANTILES", "QUANTILE10", "IDENTITY")
_BOUNDS = {"MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}


class Normalization(nn.Module):
    """LeRobot's normaliser (``NormalizerProcessorStep``) for some features, rebuilt from its saved step.

    Per feature type a mode: MEAN_STD ``(x - mean) / (std + eps)``; MIN_MAX, QUANTILES (q01/q99)
    and QUANTILE10 (q10/q90) map the two bounds to -1 and 1; IDENTITY (or no statistics) leaves
    values as they are. The inverse is LeRobot's unnormaliser.
    """

    def __init__(self, features: dict[str, str], norm_map: dict[str, str], stats: dict[str, dict[str, torch.Tensor]],
                 eps: float):
        super().__init__()
        self.eps = float(eps)
        self.modes: dict[str, str] = {}
        for key, feature_type in features.items():
            mode = norm_map.get(feature_type, "IDENTITY")
            if mode not in MODES:
                raise CheckpointError(f"normalisation mode {mode!r} of {key} is not one vlapt knows ({', '.join(MODES)})")
            have = stats.get(key, {})
            if mode == "IDENTITY" or not have:
                self.modes[key] = "IDENTITY"
                continue
            needed = ("mean", "std") if mode == "MEAN_STD" else _BOUNDS[mode]
            missing = [s for s in needed if s not in have]
            if missing:
                raise CheckpointError(f"the {mode} normalisation of {key} needs statistics {missing}, which the processor lacks")
            self.modes[key] = mode
            for stat in needed:
                self.register_buffer(_buffer_name(key, stat), have[stat].float().clone(), persistent=False)

    def forward(self, key: str, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        mode = self.modes.get(key, "IDENTITY")
        if mode == "IDENTITY":
            return x
        if mode == "MEAN_STD":
            mean, std = self._stat(key, "mean"), self._stat(key, "std")
            return x * std + mean if inverse else (x - mean) / (std + self.eps)
        low, high = (self._stat(key, s) for s in _BOUNDS[mode])
        span = torch.where(high - low == 0, torch.full_like(high, self.eps), high - low)
        return (x + 1) / 2 * span + low if inverse else 2 * (x - low) / span - 1

    def _stat(self, key: str, stat: str) -> torch.Tensor:
        return getattr(self, _buffer_name(key, stat))


def _buffer_name(key: str, stat: str) -> str:
    return "stat_" + key.replace(".", "_") + "_" + stat


def read_normalization(path: Path, processor: str, registry_name: str) -> Normalization | None:
    """The (un)normaliser step of a saved processor pipeline, or None when the pipeline has none."""
    from safetensors.torch import load_file

    config_path = path / processor
    if not config_path.is_file():
        return None
    try:
        pipeline = json.loads(config_path.read_text())
        step = next((s for s in pipeline.get("steps", []) if s.get("registry_name") == registry_name), None)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{config_path} is not a LeRobot processor config ({exc}); re-save the policy") from exc
    if step is None:
        return None
    config = step.get("config", {})
    stats: dict[str, dict[str, torch.Tensor]] = {}
    if step.get("state_file"):
        state_path = path / step["state_file"]
        if not state_path.is_file():
            raise CheckpointError(f"{config_path} names {step['state_file']}, which is missing from {path}")
        try:
            flat = load_file(str(state_path))
        except Exception as exc:  # noqa: BLE001 - safetensors' own error types
            raise CheckpointError(f"{state_path} is not a readable safetensors file ({exc})") from exc
        for name, tensor in flat.items():
            key, _, stat = name.rpartition(".")
            stats.setdefault(key, {})[stat] = tensor
    features = {key: ft["type"] for key, ft in (config.get("features") or {}).items()}
    return Normalization(features, config.get("norm_map") or {}, stats, config.get("eps", 1e-8))


# -- files -----------------------------------------------------------------------------------------------
def kept_files(path: Path) -> dict[str, bytes]:
    """LeRobot's own files of a policy directory, to write back unchanged beside new weights."""
    out = {}
    for child in sorted(path.iterdir()):
        if child.is_file() and (child.name in KEPT_FILES or child.name.startswith(KEPT_PREFIXES)):
            out[child.name] = child.read_bytes()
    return out


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """``vlapt_policy.json`` (checked, with the weights' digests verified), or None for a LeRobot-only directory."""
    sidecar = path / SIDECAR_FILE
    if not sidecar.is_file():
        return None
    try:
        document = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{sidecar} is not valid JSON ({exc}); restore it or delete it to load the LeRobot "
                              "policy without vlapt's heads") from exc
    if not isinstance(document, dict) or document.get("format") != SIDECAR_FORMAT:
        raise CheckpointError(f"{sidecar} is not a {SIDECAR_FORMAT!r} file")
    if document.get("format_version") != SIDECAR_VERSION:
        raise CheckpointError(f"{sidecar} has format_version {document.get('format_version')!r}; this vlapt reads "
                              f"{SIDECAR_VERSION}")
    for name, digest in (document.get("files") or {}).items():
        target = path / name
        if not target.is_file():
            raise CheckpointError(f"{path} lacks {name}, which {SIDECAR_FILE} lists; the policy directory is incomplete")
        if file_sha256(target) != digest:
            raise CheckpointError(f"{target} does not match the SHA-256 recorded in {SIDECAR_FILE}: it was modified after "
                                  "vlapt wrote it (e.g. retrained in LeRobot). Delete vlapt_policy.json and "
                                  "vlapt_heads.safetensors to post-train it as a new LeRobot policy")
    return document


def write_policy_dir(path: str | os.PathLike, files: dict[str, bytes], tensors: dict[str, dict[str, torch.Tensor]],
                     sidecar: dict[str, Any]) -> Path:
    """Write a policy directory atomically: LeRobot's files, the weights files, and the sidecar with their digests."""
    from safetensors.torch import save_file

    document = {"format": SIDECAR_FORMAT, "format_version": SIDECAR_VERSION, **sidecar}
    try:
        json.dumps(document)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"policy metadata must be JSON-serialisable: {exc}") from exc
    with publish_directory(path) as staging:
        for name, content in files.items():
            (staging / name).write_bytes(content)
        digests = {}
        for name, weights in tensors.items():
            save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(staging / name),
                      metadata={"format": "pt"})
            digests[name] = file_sha256(staging / name)
        (staging / SIDECAR_FILE).write_text(json.dumps({**document, "files": digests}, indent=2) + "\n")
    return Path(path)


def training_observation(path: Path) -> dict[str, Any] | None:
    """Camera settings of the dataset a LeRobot run trained on, when it is one vlapt wrote (its info.json says).

    LeRobot's training runs save ``train_config.json`` beside the policy, naming the dataset's
    local root; a LeRobotDataset written by vlapt records how its images were rendered.
    """
    train_config = path / "train_config.json"
    try:
        root = json.loads(train_config.read_text())["dataset"]["root"]
        info = json.loads((Path(root) / "meta" / "info.json").read_text())
        recorded = info["vlapt"]["env_args"]
        return {"camera": recorded.get("camera", ""), "camera_fovy": float(recorded.get("camera_fovy", 0.0)),
                "image_size": int(recorded["image_size"])}
    except (OSError, KeyError, TypeError, ValueError):
        return None
