"""The on-disk demonstration format: HDF5 in robomimic's layout (see docs/dataset_format.md).

robomimic's layout (``data/demo_<i>/{obs/<key>, actions, rewards, dones}``, ``mask/<filter>``)
is read by robomimic, LeRobot's converters and plain h5py, needs no pickle, and stores
images compressed. Files are written to a temporary name and renamed when complete, so a
crash never leaves a dataset that looks finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from vlapt.config import check_output_file, save_config
from vlapt.data.errors import DatasetError
from vlapt.interfaces import EnvConfig, Episode, camera_views
from vlapt.rundir import clean_stale_temporaries

FORMAT = "vlapt-demos"
FORMAT_VERSION = 1
# `vlapt relabel`: the episodes' ``source`` and the env_args key that names the executed policy
RELABELLED = "relabelled"


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail before any work starts if the output cannot be written."""
    path = Path(path)
    if path.is_file() and not overwrite:
        raise DatasetError(f"dataset {path} already exists; pass overwrite=true to replace it, or choose another output path")
    try:
        return check_output_file(path, "demos.hdf5")
    except ValueError as exc:
        raise DatasetError(str(exc)) from exc


class DemoWriter:
    """Append episodes to a new HDF5 file; ``close()`` publishes it (with ``config`` beside it, as
    ``<name>.config.yaml``, when given), ``abort()`` removes it."""

    def __init__(self, path: str | os.PathLike, env_args: dict[str, Any], overwrite: bool = False, config: Any = None):
        self.path = check_writable(path, overwrite)
        self.config = config
        clean_stale_temporaries(self.path.parent, recursive=False)  # files of writers that died mid-write
        self._tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self._file = h5py.File(self._tmp, "w")
        self._data = self._file.create_group("data")
        self._data.attrs["env_args"] = json.dumps(env_args)
        self._data.attrs["format"] = FORMAT
        self._data.attrs["format_version"] = FORMAT_VERSION
        self._count = 0
        self._total = 0
        self._by_task: dict[str, list[str]] = {}

    def add(self, episode: Episode) -> str:
        """Append a per-step episode (every step a decision, as collection records them)."""
        if episode.decision_steps is not None and not np.array_equal(episode.decision_steps, np.arange(episode.steps)):
            raise ValueError("datasets store per-step episodes: record them with chunk length 1")
        name = f"demo_{self._count}"
        group = self._data.create_group(name)
        obs = group.create_group("obs")
        obs.create_dataset("image", data=episode.images, compression="gzip", compression_opts=4, chunks=(1, *episode.images.shape[1:]))
        obs.create_dataset("proprio", data=episode.proprio.astype(np.float32))
        if episode.states is not None:
            obs.create_dataset("state", data=episode.states.astype(np.float32))
        group.create_dataset("actions", data=episode.actions.astype(np.float32))
        group.create_dataset("rewards", data=episode.rewards.astype(np.float32))
        dones = np.zeros(len(episode), dtype=np.uint8)
        dones[-1] = 1
        group.create_dataset("dones", data=dones)
        attrs = group.attrs
        attrs["num_samples"] = len(episode)
        for key in ("task", "instruction", "success", "config_index", "config_seed", "source"):
            attrs[key] = getattr(episode, key)
        attrs["config_split"] = episode.split
        self._by_task.setdefault(episode.task, []).append(name)
        self._count += 1
        self._total += len(episode)
        return name

    def close(self) -> Path:
        mask = self._file.create_group("mask")
        for task, names in self._by_task.items():
            mask.create_dataset(task, data=np.array(names, dtype="S"))
        self._data.attrs["total"] = self._total
        self._file.close()
        os.replace(self._tmp, self.path)
        if self.config is not None:
            save_config(self.config, self.path.with_suffix(".config.yaml"))
        return self.path

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "DemoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def open_dataset(path: str | os.PathLike) -> h5py.File:
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"{path} is a directory but not a LeRobot dataset (no meta/info.json); give an HDF5 file "
                           "or a LeRobotDataset v3 directory")
    if not path.is_file():
        raise DatasetError(f"dataset not found: {path} (create one with `vlapt collect output={path}`)")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DatasetError(f"{path} is not a readable HDF5 dataset ({exc}); collect it again with `vlapt collect`") from exc
    if f.get("data") is None or f["data"].attrs.get("format") != FORMAT:
        f.close()
        raise DatasetError(f"{path} is not a vlapt demonstration file (no data group with format={FORMAT!r})")
    if not isinstance(f.get("mask"), h5py.Group) or "env_args" not in f["data"].attrs:
        f.close()
        raise DatasetError(f"{path} lacks its per-task index (mask/) or its env_args: the file is incomplete or damaged "
                           "(a collection that did not finish?); collect it again")
    return f


def is_lerobot(path: str | os.PathLike) -> bool:
    """A LeRobotDataset directory (``meta/info.json``): read by `vlapt.data.lerobot`, wherever a dataset is read."""
    from vlapt.data.lerobot import is_lerobot_dataset

    return is_lerobot_dataset(path)


def env_args(path: str | os.PathLike) -> dict[str, Any]:
    if is_lerobot(path):
        import vlapt.data.lerobot as lerobot

        return lerobot.env_args(path)
    with open_dataset(path) as f:
        return json.loads(f["data"].attrs["env_args"])


def dataset_suite(args: dict[str, Any]):
    """The env suite a dataset was collected in (datasets without a ``suite`` entry are MetaWorld's)."""
    from vlapt.envs import get_suite

    return get_suite(args.get("suite") or {"metaworld": "mt50"}.get(args.get("env_name", ""), "mt50"))


def check_observed_as(path: str | os.PathLike, config: EnvConfig, suite, what: str = "the policy") -> None:
    """Refuse a dataset whose images were rendered otherwise than ``config`` renders them in ``suite`` (another
    camera or view order, field of view or image size): a policy that learns from it would read images unlike its
    own. A dataset that does not record its camera (LeRobot's own) is held to its image size and one view."""
    args = env_args(path)
    wanted = suite.check_env_config(config)
    keys = ("camera", "camera_fovy", "image_size") if args.get("camera") else ("image_size",)
    recorded = suite.check_env_config(EnvConfig(camera=args.get("camera") or "", image_size=int(args["image_size"]),
                                                camera_fovy=float(args.get("camera_fovy") or 0.0)))
    differ = [k for k in keys if getattr(recorded, k) != getattr(wanted, k)]
    settings = " ".join(f"{k}={getattr(wanted, k)}" for k in ("camera", "camera_fovy", "image_size"))
    if not args.get("camera") and len(camera_views(wanted.camera)) > 1:
        raise ValueError(f"{path} does not record its camera, so its images are one view, and {what} reads "
                         f"{len(camera_views(wanted.camera))} (camera={wanted.camera!r}); collect demonstrations as "
                         f"{what} sees (vlapt collect {settings})")
    if differ:
        raise ValueError(f"{path} was rendered with " + ", ".join(f"{k}={getattr(recorded, k)!r}" for k in differ)
                         + f", {what} with " + ", ".join(f"{k}={getattr(wanted, k)!r}" for k in differ)
                         + f"; collect demonstrations as {what} sees (vlapt collect {settings}), or, where {what} "
                         "records the wrong camera settings, save it with the ones it was trained with")


def read_episodes(
    path: str | os.PathLike, tasks: Sequence[str] | None = None, demos_per_task: int | None = None
) -> list[Episode]:
    """Episodes in file order, optionally only some tasks and the first ``demos_per_task`` of each."""
    if is_lerobot(path):
        import vlapt.data.lerobot as lerobot

        return lerobot.read_episodes(path, tasks, demos_per_task, suite=dataset_suite(lerobot.env_args(path)))
    out: list[Episode] = []
    with open_dataset(path) as f:
        written = json.loads(f["data"].attrs["env_args"]).get("tasks", [])
        available = [t for t in written if t in f["mask"]] + sorted(t for t in f["mask"] if t not in written)
        wanted = list(tasks) if tasks else available
        missing = [t for t in wanted if t not in available]
        if missing:
            raise DatasetError(f"dataset {path} has no demonstrations for {missing}; it holds {available}")
        for task in wanted:
            names = [n.decode() for n in f["mask"][task][()]]
            if demos_per_task is not None:
                if demos_per_task > len(names):
                    raise DatasetError(f"dataset {path} has {len(names)} demos of {task}, fewer than the {demos_per_task} asked for")
                names = names[:demos_per_task]
            for name in names:
                g = f["data"][name]
                a = g.attrs
                missing = [k for k in ("obs/image", "obs/proprio", "actions", "rewards") if k not in g]
                if missing:
                    raise DatasetError(f"dataset {path}: {name} has no {', '.join(missing)}; the file is damaged or "
                                       "was not written by `vlapt collect`; collect it again")
                actions = g["actions"][()]
                lengths = {k: g[k].shape[0] for k in ("obs/image", "obs/proprio", "obs/state", "actions", "rewards") if k in g}
                if len(set(lengths.values())) > 1:  # one row per step, or every later chunk would pair the wrong image
                    raise DatasetError(f"dataset {path}: {name} has rows of different lengths ({lengths}); the file is "
                                       "damaged or was not written by `vlapt collect`; collect it again")
                out.append(Episode(
                    task=str(a["task"]), instruction=str(a["instruction"]), success=bool(a["success"]),
                    steps=len(actions), split=str(a["config_split"]), config_index=int(a["config_index"]),
                    config_seed=int(a["config_seed"]), source=str(a["source"]),
                    images=g["obs/image"][()], proprio=g["obs/proprio"][()],
                    states=g["obs/state"][()] if "state" in g["obs"] else None,
                    actions=actions, rewards=g["rewards"][()],
                ))
    return out
