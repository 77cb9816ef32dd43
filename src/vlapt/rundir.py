"""Run directories: one run at a time, the config they were made with, no leftovers of dead runs.

Every training command writes into an ``output_dir``. `open_run` makes that safe to repeat:

- **Checked before created.** A path that is a file, or lies under one, is refused with a
  message before anything is written, so a bad command leaves no stub directory behind.
- **One run at a time.** The run holds an exclusive lock on ``output_dir/.lock`` (released by
  the kernel when the process dies, so a crash never leaves it stale); a second run on the same
  directory is refused with the holder's pid, host and start time.
- **The config is the run's identity.** A directory that already holds a run made with other
  options is refused, naming the differing options, before ``config.yaml`` is touched; only
  options that may change between invocations of one run (its budget, bookkeeping, threads)
  are exempt, and ``config.yaml`` then records the latest.
- **Leftovers are cleaned.** Temporary files and directories of writers that died mid-write
  (``.name.tmp<pid>``, ``.name.tmp-<pid>``, ``.name.old-<pid>``) are removed on start.
- **Provenance.** `RunRecord` writes ``output_dir/run.json``: the command, the source commit,
  the machine, start and end time and wall time of the invocation (what `vlapt report` shows).
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from vlapt.config import ConfigError, atomic_write_json, retired_options, save_config, to_dict

CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
# what a run writes as it goes, removed when a run starts over in the directory (resume=false)
STARTED_OVER = ("checkpoints", "evals", "tb", "history.json", "policy", "policy_ema", "policy_swa", "run.json")
_TEMPORARY = re.compile(r"^\..+\.(tmp|tmp-|old-)(\d+)$")


# -- stopping a run -------------------------------------------------------------------------------------------
_stop_requested = False


def request_stop(signum=None, frame=None) -> None:
    """The command line's SIGTERM and SIGINT handler: stop the run as Ctrl-C does, its last checkpoint intact.

    The KeyboardInterrupt raised here lands wherever the interpreter is; in a garbage-collector callback
    Python prints it and carries on, so the training loops also call `stop_if_requested` at every step.
    """
    global _stop_requested
    _stop_requested = True
    raise KeyboardInterrupt


def stop_if_requested() -> None:
    """Raise the KeyboardInterrupt of a stop that was asked for but swallowed on its way."""
    if _stop_requested:
        raise KeyboardInterrupt


def clear_stop_request() -> None:
    global _stop_requested
    _stop_requested = False


class RunInUseError(ConfigError):
    """Another live process holds the run directory."""


def check_output_dir(path: str | os.PathLike) -> Path:
    """``path`` as a directory that can be created or reused, or a ConfigError saying why not."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            where = "is" if parent == path else f"lies under {parent}, which is"
            raise ConfigError(f"output_dir {path} {where} a file; choose a directory path")
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK):
        raise ConfigError(f"output_dir {path} cannot be created or written ({existing} is not writable); "
                          "choose a writable path")
    return path


class RunLock:
    """An exclusive lock on ``directory/.lock`` that names its holder."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK_FILE
        self._handle = None

    def acquire(self) -> "RunLock":
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunInUseError(f"{self.path.parent} is in use by {holder}; wait for that run to finish, stop it, "
                                "or choose another output_dir") from None
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()} (since {started})\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def clean_stale_temporaries(directory: Path, recursive: bool = True) -> list[Path]:
    """Remove temporaries of writers whose process is gone; returns what was removed.

    A writer that died between its two renames (the old version moved aside as ``.name.old-<pid>``,
    the new one still staged as ``.name.tmp-<pid>`` or ``.name.tmp<pid>``) leaves ``name`` missing: the
    old, complete version is put back. Without its staged sibling an old version is the leftover of a
    removal that did not finish, and goes.
    """
    removed = []
    if not directory.is_dir():
        return removed
    candidates: Iterable[Path] = directory.rglob(".*") if recursive else directory.glob(".*")
    for path in sorted(candidates):
        match = _TEMPORARY.match(path.name)
        if not match or not path.exists() or _alive(int(match.group(2))):
            continue
        target = path.with_name(path.name[1:path.name.rindex(".")])
        staged = [path.with_name(f".{target.name}.{kind}{match.group(2)}") for kind in ("tmp-", "tmp")]
        if match.group(1) == "old-" and not target.exists() and any(p.exists() for p in staged):
            os.replace(path, target)
            logging.getLogger("vlapt").warning("restored %s from %s, left by a writer that died while replacing it",
                                               target, path)
            continue
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def config_differences(recorded: dict, current: dict, exempt: Iterable[str] = (), prefix: str = "",
                       defaults: dict | None = None, retired: dict | None = None) -> list[str]:
    """``key: old -> new`` for every option that differs (nested configs compared key by key).

    An option the recorded config lacks (it was added in a later version) counts as unchanged
    when its current value is its default (``defaults``), the behaviour the run was made with.
    An option the current config lacks (it was removed, `vlapt.config.retired_options`) counts as unchanged when
    the run recorded the value whose behaviour remains.
    """
    exempt = {"output_dir", *exempt}  # a run directory may be moved or copied
    defaults, retired = defaults or {}, retired or {}
    out = []
    for key in sorted(set(recorded) | set(current)):
        name = f"{prefix}{key}"
        if name in exempt:
            continue
        if key not in recorded and key in defaults and current.get(key) == defaults[key]:
            continue
        old, new = recorded.get(key, "<unset>"), current.get(key, "<unset>")
        if key not in current and key in retired and not isinstance(retired[key], dict):
            if old != retired[key]:
                out.append(f"{name}: {old!r} -> removed (only {retired[key]!r} remains)")
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            nested = defaults.get(key) if isinstance(defaults.get(key), dict) else None
            nested_retired = retired.get(key) if isinstance(retired.get(key), dict) else None
            out += config_differences(old, new, exempt, prefix=f"{name}.", defaults=nested, retired=nested_retired)
        elif old != new:
            out.append(f"{name}: {old!r} -> {new!r}")
    return out


def check_recorded_config(path: Path, config: Any, exempt: Iterable[str] = (), what: str = "run",
                          required: bool = False) -> None:
    """Refuse, naming the differences, when ``path`` records a config other than ``config``.

    A missing or unreadable record passes unless ``required`` (a run that has made progress: going on
    without knowing its options could mix two runs in one directory)."""
    try:
        recorded = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        recorded = None
    if not isinstance(recorded, dict):  # missing, empty or not a mapping of options
        if required:
            raise ConfigError(f"{path.parent} holds a started {what} but no readable record of its options ({path.name}): "
                              f"it cannot be checked against this one. Restore {path.name}, start over with resume=false "
                              "(in a pipeline: that section's resume=false), or choose another output directory")
        return
    current = yaml.safe_load(yaml.safe_dump(to_dict(config)))
    defaults = yaml.safe_load(yaml.safe_dump(to_dict(type(config)()))) if dataclasses.is_dataclass(config) else {}
    differences = config_differences(recorded, current, exempt, defaults=defaults, retired=retired_options(config))
    if differences:
        raise ConfigError(f"{path.parent} holds a {what} made with other options (" + "; ".join(differences[:8])
                          + ("; ..." if len(differences) > 8 else "") + "). Use the same options to resume it, choose "
                          "another output directory, or delete this one to start over")


@dataclasses.dataclass
class Run:
    directory: Path
    lock: RunLock
    resumed: bool

    def close(self) -> None:
        self.lock.release()
        root = logging.getLogger("vlapt")
        for handler in list(root.handlers):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == self.directory.resolve():
                root.removeHandler(handler)
                handler.close()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_run(output_dir: str | os.PathLike, config: Any, exempt: Iterable[str] = (), has_progress: str = "checkpoints",
             log_file: str | None = "train.log", resume: bool = True, check: Callable[[], None] | None = None) -> Run:
    """Create or reopen a run directory: checked, locked, cleaned, its config checked then recorded, logging to a file.

    ``check`` runs once the directory is locked and before anything in it changes (the pipeline's
    stage checks, which may remove stale stages: never under another process's live run).

    A run counts as started (and its recorded config binding) once ``has_progress`` exists in it;
    ``resume=False`` starts over in the directory whatever it recorded: the earlier run's checkpoints,
    evaluations, curves and policies are removed, so the two runs never mix.
    """
    directory = check_output_dir(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    lock = RunLock(directory).acquire()
    try:
        if check is not None:
            check()
        for path in clean_stale_temporaries(directory):
            logging.getLogger("vlapt").info("removed %s, left by a run that died while writing it", path)
        started = bool(has_progress) and (directory / has_progress).exists()
        resumed = resume and started
        if resumed:
            check_recorded_config(directory / CONFIG_FILE, config, exempt, required=True)
        elif started:  # resume=false: the earlier run's outputs go
            for name in STARTED_OVER:
                stale = directory / name
                if stale.exists():
                    logging.getLogger("vlapt").warning("resume=false: removing %s of the earlier run", stale)
                    shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        save_config(config, directory / CONFIG_FILE)
        if log_file is None:
            return Run(directory, lock, resumed)
        root = logging.getLogger("vlapt")
        root.setLevel(logging.INFO)
        for handler in list(root.handlers):  # one log file per run, also when runs follow each other in a process
            if isinstance(handler, logging.FileHandler):
                root.removeHandler(handler)
                handler.close()
        handler = logging.FileHandler((directory / log_file).resolve())
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        root.addHandler(handler)
    except BaseException:
        lock.release()
        raise
    return Run(directory, lock, resumed)


def source_commit() -> str:
    """The git commit of the vlapt source that is running (``-dirty`` with uncommitted changes), or "unknown"."""
    package = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() / "src" / "vlapt" != package:  # installed, not a checkout of vlapt
        return "unknown"
    commit = git("rev-parse", "HEAD")
    if not commit:
        return "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine_description() -> str:
    """CPU model, architecture, core count, OS and Python version: what a timing was measured on."""
    cpu = _cpu_model()
    return (f"{cpu + ', ' if cpu else ''}{platform.machine()}, {os.cpu_count()} cores, {platform.system()}, "
            f"Python {platform.python_version()}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor()


class RunRecord:
    """``output_dir/run.json`` of one invocation: written when it starts, rewritten with its end when it finishes."""

    def __init__(self, output_dir: str | os.PathLike, command: str, **extra: Any):
        self.path = Path(output_dir) / "run.json"
        self.clock = time.perf_counter()
        self.fields = {"command": command, "commit": source_commit(), "machine": machine_description(),
                       "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), **extra}

    def start(self) -> "RunRecord":
        atomic_write_json(self.path, self.fields)
        return self

    def finish(self) -> None:
        atomic_write_json(self.path, {**self.fields,
                                      "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                                      "wall_time_s": time.perf_counter() - self.clock})
