"""Policy checkpoints: a directory with ``config.json`` and ``model.safetensors``.

Weights are stored with safetensors (no pickle, so loading a checkpoint from someone else
cannot run code) and the config is plain JSON, so a checkpoint can be inspected without vlapt.
``config.json`` records the format, the policy family (``policy_type``), the family's own
config, caller metadata, and SHA-256 digests of the config and of the weights file, which
loading verifies: a truncated or bit-flipped weights file, or a config edited after the
weights were written (an image size the weights were not trained at), is refused with a
message, never half-loaded. Saving is atomic:
readers never see a half-written checkpoint, even if the process dies mid-save.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

FORMAT = "vlapt-policy"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the problem and how to fix it."""


@contextlib.contextmanager
def publish_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory; when the block ends, fsync it and rename it over ``path`` atomically.

    Readers never see a half-written directory: ``path`` holds the previous version until the
    rename, and an error (or a crash) inside the block leaves it untouched and the staging removed.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"cannot save checkpoint to {path}: a file with that name exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    retired = path.with_name(f".{path.name}.old-{os.getpid()}")
    for leftover in (staging, retired):
        if leftover.exists():
            shutil.rmtree(leftover)
    try:
        staging.mkdir()
        yield staging
        for child in staging.iterdir():
            _fsync_file(child)
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


def write_checkpoint(path: str | os.PathLike, policy_type: str, config: dict, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, Any] | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write a policy directory atomically (`publish_directory`); ``extra_files`` are further text files of the
    family (e.g. a tokenizer), by name."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    document: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "policy_type": policy_type,
                                "policy": config, "policy_sha256": _config_hash(config)}
    if metadata is not None:
        document["metadata"] = metadata
    try:
        json.dumps(document)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint metadata must be JSON-serialisable: {exc}") from exc
    with publish_directory(path) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        document["files"] = {WEIGHTS_FILE: file_sha256(staging / WEIGHTS_FILE)}
        (staging / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")
        for name, content in (extra_files or {}).items():
            (staging / name).write_text(content)
    return Path(path)


def read_config(path: str | os.PathLike) -> dict:
    """The parsed, format-checked ``config.json`` of a checkpoint directory (the weights are not read)."""
    path = _checkpoint_dir(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{path} has no {CONFIG_FILE}; it is not a complete vlapt checkpoint "
                              "(re-save it, or point at the right directory)")
    try:
        document = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON ({exc}); the file is corrupt, re-save the checkpoint") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise CheckpointError(f"{config_path} has format {found!r}, expected {FORMAT!r}; this is not a vlapt policy checkpoint")
    if document.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path} has format_version {document.get('format_version')!r}, but this vlapt reads "
                              f"version {FORMAT_VERSION}; use the vlapt version that wrote it")
    if not isinstance(document.get("policy"), dict):
        raise CheckpointError(f"{config_path} has no 'policy' mapping with the model config")
    for key, kind in (("policy_type", str), ("policy_sha256", str), ("files", dict)):
        if key in document and not isinstance(document[key], kind):
            raise CheckpointError(f"{config_path}: {key!r} must be a {kind.__name__}, got {type(document[key]).__name__}; "
                                  "the file was edited or is not from vlapt, re-save the checkpoint")
    recorded = document.get("policy_sha256")
    if recorded is not None and recorded != _config_hash(document["policy"]):
        raise CheckpointError(f"the policy config in {config_path} was edited after the checkpoint was written, so it no "
                              "longer describes the weights; restore the original file, or load the weights into the "
                              "intended config and save a new checkpoint")
    if not isinstance(document.get("metadata") or {}, dict):
        raise CheckpointError(f"{config_path}: 'metadata' must be a mapping, got {type(document['metadata']).__name__}")
    return document


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.json document, weights)`` of a checkpoint directory, the weights checked against their recorded hash."""
    path = _checkpoint_dir(path)
    document = read_config(path)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}; the checkpoint is incomplete (re-save it)")
    expected = (document.get("files") or {}).get(WEIGHTS_FILE)
    if expected is not None and file_sha256(weights_path) != expected:
        raise CheckpointError(f"{weights_path} does not match the SHA-256 recorded in its {CONFIG_FILE}: the file was "
                              "modified or corrupted after it was written; re-save or re-download the checkpoint")
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for every kind of corruption
        raise CheckpointError(f"{weights_path} is not a readable safetensors file ({exc}); it is corrupt or truncated, "
                              "re-save or re-download the checkpoint") from exc
    return document, tensors


def check_state_matches(module: torch.nn.Module, state: dict[str, torch.Tensor], where: Path | str) -> None:
    """Every tensor the module needs is in ``state`` with the shape its config implies; else a CheckpointError."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{name}: file {tuple(state[name].shape)} vs config {tuple(expected[name].shape)}"
                  for name in sorted(set(expected) & set(state)) if state[name].shape != expected[name].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s), e.g. {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {_few(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_few(mismatched)}")
    if problems:
        raise CheckpointError(f"weights in {where} do not match its {CONFIG_FILE}: " + "; ".join(problems)
                              + ". The two files come from different models; re-save the checkpoint")


def _few(items: list[str], limit: int = 4) -> str:
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


def _checkpoint_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_file() and path.name in (CONFIG_FILE, WEIGHTS_FILE):
        raise CheckpointError(f"{path} is a file inside a checkpoint; pass its directory {path.parent}")
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist; pass a directory written by a policy's "
                              f"save() (it holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; a checkpoint is a directory with {CONFIG_FILE} and {WEIGHTS_FILE}")
    return path


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def state_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (every tensor's name, dtype, shape and bytes, in name order): one digest per set
    of weights, whatever the family or the file it came from. Post-training records its starting policy's, so
    runs fine-tuned from one policy can be told from runs of another."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
