"""Policy checkpoints: a directory with ``config.json`` and ``model.safetensors``.

Weights are stored with safetensors (no pickle, so loading a checkpoint from
someone else cannot run code), and the config is plain JSON so a checkpoint can
be inspected without vlapt. Saving is atomic: readers never see a
half-written checkpoint, even if the process dies mid-save.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlapt.models.config import PolicyConfig
from vlapt.models.vla import VLAPolicy

FORMAT = "vlapt-policy"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the problem and how to fix it."""


def save_pretrained(policy: Any, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``policy`` (a VLAPolicy, or anything with a ``.model`` VLAPolicy) to the directory ``path``.

    ``metadata`` is any JSON-serialisable dict (training step, task, git hash...)
    stored in ``config.json``. An existing checkpoint at ``path`` is replaced:
    the new one is fully written and fsynced in ``.<name>.tmp-<pid>`` first, so
    ``path`` only ever holds a complete checkpoint (during the two renames the
    previous one briefly sits at ``.<name>.old-<pid>``).
    """
    model = _unwrap(policy)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"cannot save checkpoint to {path}: a file with that name exists")
    document: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "policy": dataclasses.asdict(model.config),
    }
    if metadata is not None:
        document["metadata"] = metadata
    try:
        config_text = json.dumps(document, indent=2) + "\n"
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint metadata must be JSON-serialisable: {exc}") from exc
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    retired = path.with_name(f".{path.name}.old-{os.getpid()}")
    for leftover in (staging, retired):
        if leftover.exists():
            shutil.rmtree(leftover)
    try:
        staging.mkdir()
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(config_text)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            _fsync_file(staging / name)
        _fsync_dir(staging)
        if path.exists():
            os.replace(path, retired)
        os.replace(staging, path)
        _fsync_dir(path.parent)
    except BaseException:
        if retired.exists() and not path.exists():
            os.replace(retired, path)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)
    return path


def load_pretrained_config(path: str | os.PathLike) -> tuple[PolicyConfig, dict[str, Any]]:
    """The validated config and the caller metadata of a checkpoint, without reading the weights."""
    path = _checkpoint_dir(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(
            f"{path} has no {CONFIG_FILE}; it is not a complete vlapt checkpoint "
            "(re-save it with vlapt.models.save_pretrained, or point at the right directory)"
        )
    try:
        document = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{config_path} is not valid JSON ({exc}); the file is corrupt, re-save the checkpoint"
        ) from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise CheckpointError(
            f"{config_path} has format {found!r}, expected {FORMAT!r}; this is not a vlapt policy checkpoint"
        )
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path} has format_version {version!r}, but this vlapt reads version {FORMAT_VERSION}; "
            "use the vlapt version that wrote it"
        )
    fields = document.get("policy")
    if not isinstance(fields, dict):
        raise CheckpointError(f"{config_path} has no 'policy' mapping with the model config")
    known = {f.name for f in dataclasses.fields(PolicyConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(
            f"{config_path} has unknown policy config field(s) {unknown}; it was written by a different "
            f"vlapt version (known fields: {sorted(known)})"
        )
    try:
        config = PolicyConfig(**fields).validate()
    except ValueError as exc:
        raise CheckpointError(f"{config_path} holds an invalid policy config: {exc}") from exc
    metadata = document.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{config_path}: 'metadata' must be a mapping, got {type(metadata).__name__}")
    return config, metadata


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> VLAPolicy:
    """Rebuild the policy saved at ``path`` (in eval mode) on ``device``."""
    path = _checkpoint_dir(path)
    config, _ = load_pretrained_config(path)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(
            f"{path} has no {WEIGHTS_FILE}; the checkpoint is incomplete (re-save it with "
            "vlapt.models.save_pretrained)"
        )
    try:
        state = load_file(str(weights_path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for every kind of corruption
        raise CheckpointError(
            f"{weights_path} is not a readable safetensors file ({exc}); it is corrupt or truncated, "
            "re-save or re-download the checkpoint"
        ) from exc

    try:
        model = VLAPolicy(config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot build the policy described by {path / CONFIG_FILE}: {exc}") from exc
    _check_state_matches(model, state, weights_path)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def _check_state_matches(model: VLAPolicy, state: dict[str, torch.Tensor], weights_path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{name}: file {tuple(state[name].shape)} vs config {tuple(expected[name].shape)}"
        for name in sorted(set(expected) & set(state))
        if state[name].shape != expected[name].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s), e.g. {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {_few(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_few(mismatched)}")
    if problems:
        raise CheckpointError(
            f"weights in {weights_path} do not match its {CONFIG_FILE}: " + "; ".join(problems)
            + ". The two files come from different models; re-save the checkpoint with save_pretrained"
        )


def _few(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (", ..." if len(items) > limit else "")


def _checkpoint_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_file() and path.name in (CONFIG_FILE, WEIGHTS_FILE):
        raise CheckpointError(f"{path} is a file inside a checkpoint; pass its directory {path.parent}")
    if not path.exists():
        raise CheckpointError(
            f"checkpoint directory {path} does not exist; pass a directory written by "
            "vlapt.models.save_pretrained (it holds config.json and model.safetensors)"
        )
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; a checkpoint is a directory with {CONFIG_FILE} and {WEIGHTS_FILE}")
    return path


def _unwrap(policy: Any) -> VLAPolicy:
    model = policy
    # Policy wrapper (.model), torch.compile (._orig_mod), DistributedDataParallel (.module).
    for attribute in ("model", "_orig_mod", "module"):
        if isinstance(model, VLAPolicy):
            break
        model = getattr(model, attribute, model)
    if not isinstance(model, VLAPolicy):
        raise TypeError(f"save_pretrained expects a VLAPolicy or a Policy wrapper, got {type(policy).__name__}")
    return model


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
