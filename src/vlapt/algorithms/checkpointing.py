"""Resumable training checkpoints without pickle.

A training checkpoint is a directory ``<run>/checkpoints/step_<N>/`` holding the policy
checkpoint (``model.safetensors`` + ``config.json``, loadable by `vlapt.load_policy`) and the
rest of the training state: every tensor (optimizer moments, RNG states, buffers) in
``state.safetensors`` and every scalar or structure in ``state.json``. The directory is
written under a temporary name and renamed, then ``checkpoints/latest`` (a one-line text
file) is replaced atomically, so a crash at any moment leaves the previous checkpoint
intact and resumable.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlapt.config import ConfigError, atomic_write_text
from vlapt.policies import CheckpointError, load_policy
from vlapt.rundir import Run, open_run


def start_run(config: Any, output_dir: str | os.PathLike, threads: int, exempt: Iterable[str] = ()) -> Run:
    """Open the run directory (checked, locked, cleaned, config checked and recorded; `vlapt.rundir`), set torch threads.

    Use it as a context manager: the lock is held until the run ends. ``exempt`` names the options
    that may differ when a run is resumed (its budget, bookkeeping, threads).
    """
    run = open_run(output_dir, config, exempt, resume=getattr(config, "resume", True))
    torch.set_num_threads(threads)
    warn_if_busy(threads)
    return run


def warn_if_busy(threads: int) -> None:
    """Say so when other processes already load the cores this run's torch threads need.

    Two torch threads beside a busy process train slower than one thread would
    (docs/experiments/thread-hygiene.md); the thread count is not chosen automatically because it
    changes the floating-point results, and the same seed and config must give the same numbers.
    """
    if threads < 2:  # one thread is what the warning recommends: nothing to measure
        return
    busy = busy_cores()
    if busy is None:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if busy > cores - threads + 0.5:
        message = (f"the machine is already busy ({busy:.1f} of {cores} cores in use by other work) and this run uses "
                   f"{threads} torch threads: with other work on the cores, threads=1 trains faster")
        logging.getLogger("vlapt").warning(message)
        print(f"vlapt: warning: {message}", file=sys.stderr)


def busy_cores(window_s: float = 0.25, stat: str = "/proc/stat") -> float | None:
    """How many cores other work keeps busy now: CPU time over a short window (Linux), else the load average.

    Measured now rather than read from the 1-minute load average, which still counts a job that
    has just finished (a pipeline's SFT stage would make its post-training stage warn). The
    caller sleeps through the window, so its own threads are not counted.
    """
    def sample() -> tuple[float, float, int]:
        with open(stat) as f:
            lines = f.read().splitlines()
        fields = [float(x) for x in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
        cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
        return sum(fields) - fields[3] - fields[4], sum(fields), cpus
    try:
        busy0, total0, cpus = sample()
        time.sleep(window_s)
        busy1, total1, _ = sample()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (OSError, AttributeError):  # platforms without a load average
            return None
    if total1 <= total0:
        return 0.0
    return cpus * (busy1 - busy0) / (total1 - total0)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            key = f"optim.{index}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    saved, current = [len(g["params"]) for g in meta["param_groups"]], [len(g["params"]) for g in optimizer.param_groups]
    if saved != current:
        raise CheckpointError(
            f"the checkpoint's optimiser has parameter groups of sizes {saved}, this version's has {current} "
            "; resume it with the vlapt version that wrote it, or start a new run in another output_dir"
        )
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state(np_rng: np.random.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on a GPU learner draws from these
        tensors.update({f"rng.cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    meta: dict[str, Any] = {"python": _python_state_to_json(random.getstate())}
    if np_rng is not None:
        meta["numpy"] = np_rng.bit_generator.state
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict, np_rng: np.random.Generator | None = None) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda: list[torch.Tensor] = []
    while f"rng.cuda.{len(cuda)}" in tensors:
        cuda.append(tensors[f"rng.cuda.{len(cuda)}"])
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_python_state_from_json(meta["python"]))
    if np_rng is not None and "numpy" in meta:
        np_rng.bit_generator.state = meta["numpy"]


def capture_state(
    optimizer: torch.optim.Optimizer, np_rng: np.random.Generator, generators: dict[str, torch.Generator]
) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimiser moments and every random state of a run: what resuming needs besides the weights."""
    tensors, optim_meta = optimizer_to_flat(optimizer)
    rng_tensors, rng_meta = rng_state(np_rng)
    tensors.update(rng_tensors)
    for name, generator in generators.items():
        tensors[f"rng.{name}"] = generator.get_state()
    return tensors, {"optimizer": optim_meta, "rng": rng_meta}


def restore_state(
    optimizer: torch.optim.Optimizer, np_rng: np.random.Generator, generators: dict[str, torch.Generator],
    tensors: dict[str, torch.Tensor], meta: dict,
) -> None:
    optimizer_from_flat(optimizer, tensors, meta["optimizer"])
    restore_rng(tensors, meta["rng"], np_rng)
    for name, generator in generators.items():
        generator.set_state(tensors[f"rng.{name}"])


def _python_state_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_json(state) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def save_training_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``checkpoints/step_<step>`` atomically, point ``latest`` at it, and prune all but the newest ``keep``
    (0: keep every one)."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0 (0 keeps every checkpoint), got {keep}")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:09d}"
    tmp = root / f".step_{step:09d}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # so a checkpoint's policy names the policy its run started from, as the final one does
        lineage = {"init_state_sha256": meta["init_state_sha256"]} if "init_state_sha256" in meta else {}
        model.save(tmp, metadata={"step": step, **lineage})
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **meta}))
        for name in ("state.safetensors", "state.json"):  # on disk before `latest` can name them
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
    except Exception as exc:  # a full disk surfaces as OSError or as safetensors' own error type
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"could not write checkpoint {final} ({exc}); {kept}. Free disk space and run the "
                                   "same command again to resume") from exc
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", final.name + "\n")
    if keep:
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(
            f"{pointer} points at {path}, which does not exist; delete {pointer} to start over or restore the directory"
        )
    return path


def check_same_start(meta: dict, init_sha256: str, init_policy: str, checkpoint: Path) -> None:
    """Refuse to resume a post-training run whose starting policy has changed since it began (say its SFT run
    trained further): the run would go on from one policy while its results name another."""
    recorded = meta.get("init_state_sha256")
    if recorded is not None and recorded != init_sha256:
        raise ConfigError(f"the starting policy {init_policy} has changed since this run began (its weights differ from "
                          f"those {checkpoint} records): the run cannot go on from it; start over with resume=false "
                          "(in a pipeline: the post-training section's resume=false), or use another output_dir")


def load_training_checkpoint(path: str | os.PathLike, device: str = "cpu"):
    """``(model, tensors, meta)`` of a training checkpoint directory."""
    path = Path(path)
    model = load_policy(path, device=device)
    try:
        tensors = load_file(str(path / "state.safetensors"))
        meta = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:  # safetensors raises its own errors as subclasses of these
        raise CheckpointError(f"training state in {path} is missing or corrupt ({exc}); delete the directory to resume from an earlier one") from exc
    except Exception as exc:  # noqa: BLE001 - safetensors' SafetensorError
        raise CheckpointError(f"training state in {path} is corrupt ({exc}); delete the directory to resume from an earlier one") from exc
    return model, tensors, meta
