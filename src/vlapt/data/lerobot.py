"""Demonstrations as a LeRobotDataset v3 (parquet + mp4 + ``meta/``), written and read without LeRobot.

The layout is LeRobot's v3.0 (``codebase_version: "v3.0"``), built with the libraries LeRobot
itself writes it with (pyarrow for parquet, PyAV for mp4):

```
meta/info.json                         fps, features (dtype, shape, names), paths, totals; vlapt's env_args
meta/stats.json                        per feature: min, max, mean, std, count, q01, q10, q50, q90, q99
meta/tasks.parquet                     task (the instruction string) -> task_index
meta/episodes/chunk-000/file-000.parquet
                                       one row per episode: length, tasks, where its frames and video
                                       segment are, per-episode stats, and vlapt's episode fields
data/chunk-000/file-000.parquet        one row per frame: observation.state, observation.environment_state,
                                       action, next.reward, next.done, next.success, timestamp,
                                       frame_index, episode_index, index, task_index
                                       (and observation.image as PNG bytes when images="png")
videos/observation.image/chunk-000/file-000.mp4
                                       the frames of consecutive episodes, one after another
```

How vlapt's `Episode` maps onto LeRobot's features is `FeatureKeys` (docs/dataset_format.md
has the table). Reading accepts any v3.0 dataset whose features match that mapping, and refuses
one that does not, naming the features it has.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fractions
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vlapt.config import save_config
from vlapt.data.errors import DatasetError
from vlapt.interfaces import Episode
from vlapt.rundir import clean_stale_temporaries

CODEBASE_VERSION = "v3.0"
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
CHUNKS_SIZE = 1000  # files per chunk directory (LeRobot's default)
DATA_FILE_MB = 100  # a data or video file is closed once it is this large (LeRobot's defaults)
VIDEO_FILE_MB = 200
DEFAULT_FPS = 30
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
# LeRobot's own encoder settings (lerobot.datasets.video_utils.encode_video_frames): AV1, 4:2:0, a key frame
# every 2 frames so any frame decodes fast, constant quality 30
VIDEO_CODEC = "libsvtav1"
VIDEO_OPTIONS = {"g": "2", "crf": "30", "preset": "12"}
VIDEO_PIX_FMT = "yuv420p"
IMAGE_STORAGE = ("video", "png")
# Episode fields that LeRobot has no feature for, kept as extra columns of meta/episodes
EPISODE_COLUMNS = ("task", "success", "split", "config_index", "config_seed", "source")
VLAPT_KEY = "vlapt"  # info.json: what vlapt recorded (its env_args and the feature mapping)


class LeRobotDatasetError(DatasetError):
    """A LeRobot dataset that cannot be written or read; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class FeatureKeys:
    """Which LeRobot feature holds which part of a vlapt `Episode` (the instruction is LeRobot's ``task``)."""

    image: str = "observation.image"  # (H, W, 3) camera frames, as "video" or "image"
    proprio: str = "observation.state"  # (P,) the proprioception a policy reads
    state: str = "observation.environment_state"  # (S,) privileged simulator state (SFT's auxiliary targets)
    action: str = "action"  # (A,) env-unit actions
    reward: str = "next.reward"  # the reward of the step

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


DEFAULT_KEYS = FeatureKeys()


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - the extra is part of the test install
        raise LeRobotDatasetError("LeRobot datasets need pyarrow and av: pip install 'vlapt[lerobot]'") from exc
    return pa, pq


def _av():
    try:
        import av
    except ImportError as exc:  # pragma: no cover
        raise LeRobotDatasetError("LeRobot datasets with videos need PyAV: pip install 'vlapt[lerobot]'") from exc
    return av


def is_lerobot_dataset(path: str | os.PathLike) -> bool:
    """A directory that holds ``meta/info.json``."""
    return (Path(path) / INFO_PATH).is_file()


# -- writing -------------------------------------------------------------------------------------------
def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail before any work starts if the dataset directory cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LeRobotDatasetError(f"{path} is a file; a LeRobot dataset is a directory: choose another output path")
    if path.exists() and any(path.iterdir()):
        if not is_lerobot_dataset(path):  # overwrite replaces a dataset, never a folder of other things
            raise LeRobotDatasetError(f"{path} is a non-empty directory but not a LeRobot dataset (no {INFO_PATH}); "
                                      "give a new or empty directory, such as datasets/mt10_lerobot")
        if not overwrite:
            raise LeRobotDatasetError(f"dataset {path} already exists; pass overwrite=true to replace it, or choose "
                                      "another output path")
    if path.suffix in (".hdf5", ".h5"):
        raise LeRobotDatasetError(f"{path} names an HDF5 file, but format=lerobot writes a directory; "
                                  "give a directory path such as datasets/mt10_lerobot")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LeRobotDatasetError(f"cannot create {path.parent}: {exc.strerror}; choose a writable output path") from exc
    if not os.access(path.parent, os.W_OK):
        raise LeRobotDatasetError(f"{path.parent} is not writable; choose a writable output path")
    return path


class _VideoFile:
    """One mp4 file of consecutive episodes, its frames' timestamps running on from episode to episode."""

    def __init__(self, path: Path, fps: int, size: tuple[int, int]):
        av = _av()
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its settings per file at its default level; errors only
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.fps, self.frames, self.bytes = path, fps, 0, 0
        self._container = av.open(str(path), "w", format="mp4")
        self._stream = self._container.add_stream(VIDEO_CODEC, rate=fps, options=dict(VIDEO_OPTIONS))
        self._stream.height, self._stream.width = size
        self._stream.pix_fmt = VIDEO_PIX_FMT
        self._time_base = fractions.Fraction(1, fps)  # the frames' (the muxer gives the stream its own once it starts)
        self._stream.time_base = self._time_base
        self._frame_type = av.VideoFrame

    def add(self, images: np.ndarray) -> tuple[float, float]:
        """Append an episode's frames; returns its (from, to) timestamps in this file, in seconds."""
        start = self.frames
        for image in images:
            frame = self._frame_type.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = self.frames
            frame.time_base = self._time_base
            self._mux(self._stream.encode(frame))
            self.frames += 1
        return start / self.fps, self.frames / self.fps

    def _mux(self, packets) -> None:
        for packet in packets:
            self.bytes += packet.size
            self._container.mux(packet)

    def close(self) -> None:
        self._mux(self._stream.encode())
        self._container.close()

    def info(self) -> dict:
        return {"video.height": self._stream.height, "video.width": self._stream.width, "video.codec": "av1",
                "video.pix_fmt": VIDEO_PIX_FMT, "video.is_depth_map": False, "video.fps": self.fps,
                "video.channels": 3, "has_audio": False}


class LeRobotWriter:
    """Append episodes to a new LeRobotDataset v3; ``close()`` publishes the directory, ``abort()`` removes it.

    The same interface as `vlapt.data.format.DemoWriter`. The dataset is built in a temporary
    directory beside ``path`` and renamed when complete, so a directory at ``path`` is always whole.
    ``images``: ``"png"`` (lossless PNG bytes in the parquet files, LeRobot's ``image`` dtype, as in
    LeRobot's own MetaWorld datasets) or ``"video"`` (mp4 with LeRobot's recorder settings: AV1,
    smaller, lossy).
    """

    def __init__(self, path: str | os.PathLike, env_args: dict[str, Any], overwrite: bool = False, config: Any = None,
                 fps: int = DEFAULT_FPS, images: str = "png", keys: FeatureKeys = DEFAULT_KEYS,
                 robot_type: str | None = None):
        if images not in IMAGE_STORAGE:
            raise LeRobotDatasetError(f"images must be one of {', '.join(IMAGE_STORAGE)}, got {images!r}")
        if fps < 1:
            raise LeRobotDatasetError(f"fps must be >= 1, got {fps}")
        _pyarrow()
        if images == "video":
            _av()
        self.path, self.overwrite = check_writable(path, overwrite), overwrite
        self.env_args, self.config, self.fps, self.images, self.keys = dict(env_args), config, int(fps), images, keys
        self.robot_type = robot_type or env_args.get("env_name")
        clean_stale_temporaries(self.path.parent, recursive=False)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir()
        self._features: dict[str, dict] | None = None
        self._arrow_schema = None
        self._tasks: dict[str, int] = {}
        self._episodes: list[dict] = []
        self._episode_stats: list[dict[str, dict[str, np.ndarray]]] = []
        self._frames = 0
        self._data_writer = None
        self._data_file = (0, 0)
        self._data_bytes = 0
        self._video: _VideoFile | None = None
        self._video_file = (0, 0)
        self._video_info: dict | None = None

    # -- features ----------------------------------------------------------------------------------
    def _define_features(self, episode: Episode) -> dict[str, dict]:
        k = self.keys
        height, width = episode.images.shape[1:3]
        if self.images == "video" and (height % 2 or width % 2):
            raise LeRobotDatasetError(f"{height}x{width} images cannot be stored as 4:2:0 video (odd size); "
                                      "use images=png or an even image size")
        proprio_names = list(self.env_args.get("proprio_fields") or []) or None
        features = {
            k.image: {"dtype": self.images if self.images == "video" else "image", "shape": [height, width, 3],
                      "names": ["height", "width", "channels"]},
            k.proprio: {"dtype": "float32", "shape": [episode.proprio.shape[1]], "names": proprio_names},
        }
        if episode.states is not None:
            features[k.state] = {"dtype": "float32", "shape": [episode.states.shape[1]], "names": None}
        features[k.action] = {"dtype": "float32", "shape": [episode.actions.shape[1]], "names": None}
        features[k.reward] = {"dtype": "float32", "shape": [1], "names": None}
        features["next.done"] = {"dtype": "bool", "shape": [1], "names": None}
        features["next.success"] = {"dtype": "bool", "shape": [1], "names": None}
        for name, dtype in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                            ("index", "int64"), ("task_index", "int64")):
            features[name] = {"dtype": dtype, "shape": [1], "names": None}
        return features

    def _schema(self):
        pa, _ = _pyarrow()
        fields = []
        for name, ft in self._features.items():
            if ft["dtype"] == "video":
                continue
            if ft["dtype"] == "image":
                fields.append(pa.field(name, pa.struct([("bytes", pa.binary()), ("path", pa.string())])))
            elif ft["shape"] == [1]:
                fields.append(pa.field(name, pa.from_numpy_dtype(np.dtype(ft["dtype"]))))
            else:
                fields.append(pa.field(name, pa.list_(pa.from_numpy_dtype(np.dtype(ft["dtype"])), ft["shape"][0])))
        return pa.schema(fields)

    def _check_matches(self, episode: Episode) -> None:
        f, k = self._features, self.keys
        if episode.images.dtype != np.uint8:  # checked before any of the episode is written
            raise LeRobotDatasetError(f"episode images must be uint8 RGB in 0-255, got dtype {episode.images.dtype}")
        expected = {"images": tuple(f[k.image]["shape"]), "proprio": tuple(f[k.proprio]["shape"]),
                    "actions": tuple(f[k.action]["shape"])}
        got = {"images": episode.images.shape[1:], "proprio": episode.proprio.shape[1:], "actions": episode.actions.shape[1:]}
        if (k.state in f) != (episode.states is not None):
            raise LeRobotDatasetError("every episode of a dataset must carry the privileged state, or none")
        if k.state in f:
            expected["states"], got["states"] = tuple(f[k.state]["shape"]), episode.states.shape[1:]
        differ = [f"{name} {got[name]} vs {expected[name]}" for name in expected if tuple(got[name]) != expected[name]]
        if differ:
            raise LeRobotDatasetError("episode shapes differ from the dataset's first episode: " + ", ".join(differ))

    # -- episodes ----------------------------------------------------------------------------------
    def add(self, episode: Episode) -> str:
        """Append a per-step episode (every step a decision, as collection records them)."""
        pa, pq = _pyarrow()
        if episode.decision_steps is not None and not np.array_equal(episode.decision_steps, np.arange(episode.steps)):
            raise ValueError("datasets store per-step episodes: record them with chunk length 1")
        n = len(episode)
        rows = [episode.images, episode.proprio, episode.actions]
        if n < 1 or any(r is None or len(r) != n for r in rows):
            raise ValueError("a dataset episode needs one image, proprio and action row per step")
        if self._features is None:
            self._features = self._define_features(episode)
            self._arrow_schema = self._schema()
        self._check_matches(episode)
        index = len(self._episodes)
        task_index = self._tasks.setdefault(episode.instruction, len(self._tasks))
        k = self.keys
        rewards = (np.zeros(n, np.float32) if episode.rewards is None else np.asarray(episode.rewards, np.float32))
        done = np.zeros(n, bool)
        done[-1] = True
        columns: dict[str, np.ndarray] = {
            k.proprio: np.asarray(episode.proprio, np.float32),
            k.action: np.asarray(episode.actions, np.float32),
            k.reward: rewards,
            "next.done": done,
            "next.success": done & bool(episode.success),
            "timestamp": (np.arange(n) / self.fps).astype(np.float32),
            "frame_index": np.arange(n, dtype=np.int64),
            "episode_index": np.full(n, index, np.int64),
            "index": np.arange(self._frames, self._frames + n, dtype=np.int64),
            "task_index": np.full(n, task_index, np.int64),
        }
        if episode.states is not None:
            columns[k.state] = np.asarray(episode.states, np.float32)
        row: dict[str, Any] = {"episode_index": index, "tasks": [episode.instruction], "length": n}

        # frames: a new data file once the current one is full
        if self._data_writer is not None and self._data_bytes >= DATA_FILE_MB * 2**20:
            self._data_writer.close()
            self._data_writer, self._data_file, self._data_bytes = None, _next_file(*self._data_file), 0
        if self._data_writer is None:
            target = self._tmp / DATA_PATH.format(chunk_index=self._data_file[0], file_index=self._data_file[1])
            target.parent.mkdir(parents=True, exist_ok=True)
            self._data_writer = pq.ParquetWriter(str(target), self._arrow_schema, compression="snappy")
        arrays = {}
        for name, values in columns.items():
            arrays[name] = (pa.array(values) if values.ndim == 1
                            else pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1]))
        if self.images == "png":
            png = [_encode_png(image) for image in episode.images]
            arrays[k.image] = pa.array([{"bytes": b, "path": None} for b in png], type=self._arrow_schema.field(k.image).type)
            self._data_bytes += sum(len(b) for b in png)
        table = pa.table({f.name: arrays[f.name] for f in self._arrow_schema}, schema=self._arrow_schema)
        self._data_writer.write_table(table)
        self._data_bytes += sum(v.nbytes for v in columns.values())
        row.update({"data/chunk_index": self._data_file[0], "data/file_index": self._data_file[1],
                    "dataset_from_index": self._frames, "dataset_to_index": self._frames + n})

        # images: appended to the current video file (a new one once it is full)
        if self.images == "video":
            if self._video is not None and self._video.bytes >= VIDEO_FILE_MB * 2**20:
                self._video.close()
                self._video, self._video_file = None, _next_file(*self._video_file)
            if self._video is None:
                target = self._tmp / VIDEO_PATH.format(video_key=k.image, chunk_index=self._video_file[0],
                                                       file_index=self._video_file[1])
                self._video = _VideoFile(target, self.fps, tuple(episode.images.shape[1:3]))
                self._video_info = self._video_info or self._video.info()
            start, end = self._video.add(episode.images)
            row.update({f"videos/{k.image}/chunk_index": self._video_file[0],
                        f"videos/{k.image}/file_index": self._video_file[1],
                        f"videos/{k.image}/from_timestamp": start, f"videos/{k.image}/to_timestamp": end})

        row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        for key in EPISODE_COLUMNS:
            value = getattr(episode, key)
            row[f"{VLAPT_KEY}/{key}"] = value if not isinstance(value, np.generic) else value.item()
        stats = {name: _feature_stats(values) for name, values in columns.items()}
        stats[k.image] = _image_stats(episode.images)
        for name, feature_stats in stats.items():
            for stat, value in feature_stats.items():
                row[f"stats/{name}/{stat}"] = value.tolist()
        self._episodes.append(row)
        self._episode_stats.append(stats)
        self._frames += n
        return f"episode_{index:06d}"

    # -- publishing --------------------------------------------------------------------------------
    def close(self) -> Path:
        if not self._episodes:
            self.abort()
            raise LeRobotDatasetError(f"no episodes were written; nothing published at {self.path}")
        try:
            self._finish()
        except BaseException:  # a full disk, a vanished directory, ...: nothing half-written stays behind
            self.abort()
            raise
        return self.path

    def _finish(self) -> None:
        pa, pq = _pyarrow()
        if self._data_writer is not None:
            self._data_writer.close()
            self._data_writer = None
        if self._video is not None:
            self._video.close()
            self._video = None
        if self._video_info is not None:
            self._features[self.keys.image]["info"] = self._video_info
        episodes_file = self._tmp / EPISODES_PATH.format(chunk_index=0, file_index=0)
        episodes_file.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self._episodes), str(episodes_file))
        _write_tasks(self._tmp / TASKS_PATH, self._tasks)
        stats = _aggregate_stats(self._episode_stats)
        _write_json(self._tmp / STATS_PATH, {name: {s: v.tolist() for s, v in st.items()} for name, st in stats.items()})
        info = {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": len(self._episodes),
            "total_frames": self._frames,
            "total_tasks": len(self._tasks),
            "chunks_size": CHUNKS_SIZE,
            "data_files_size_in_mb": DATA_FILE_MB,
            "video_files_size_in_mb": VIDEO_FILE_MB,
            "fps": self.fps,
            "splits": {"train": f"0:{len(self._episodes)}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.images == "video" else None,
            "features": self._features,
            VLAPT_KEY: {"env_args": self.env_args, "keys": self.keys.as_dict()},
        }
        _write_json(self._tmp / INFO_PATH, info)
        if self.config is not None:
            save_config(self.config, self._tmp / "config.yaml")
        if not self.overwrite and self.path.exists() and any(self.path.iterdir()):
            raise LeRobotDatasetError(f"dataset {self.path} appeared while this one was written (another collection to "
                                      "the same path?); pass overwrite=true to replace it, or choose another output path")
        _publish(self._tmp, self.path)

    def abort(self) -> None:
        for open_file in (self._data_writer, self._video):
            if open_file is not None:
                with contextlib.suppress(Exception):  # discarded anyway; the error that led here is the one to see
                    open_file.close()
        self._data_writer = self._video = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "LeRobotWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _next_file(chunk: int, file: int) -> tuple[int, int]:
    return (chunk + 1, 0) if file == CHUNKS_SIZE - 1 else (chunk, file + 1)


def _publish(tmp: Path, path: Path) -> None:
    """Rename the finished directory over ``path`` (an existing one is replaced only once the new one is whole)."""
    retired = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, retired)
    try:
        os.replace(tmp, path)
    except BaseException:
        if retired.exists() and not path.exists():
            os.replace(retired, path)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4, ensure_ascii=False) + "\n")


def _write_tasks(path: Path, tasks: dict[str, int]) -> None:
    """``tasks.parquet`` as pandas writes LeRobot's DataFrame (index: the task string), readable with or without pandas."""
    pa, pq = _pyarrow()
    names = sorted(tasks, key=tasks.get)
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64", "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.0",
    }
    schema = pa.schema([("task_index", pa.int64()), ("task", pa.string())],
                       metadata={b"pandas": json.dumps(pandas_meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"task_index": [tasks[t] for t in names], "task": names}, schema=schema), str(path))


def _encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def _decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _stored_image(struct: dict, root: Path) -> np.ndarray:
    """An ``image`` feature's frame: its bytes, or (a dataset saved without embedding them) the file its
    ``path`` names inside the dataset."""
    if struct.get("bytes") is not None:
        return _decode_png(struct["bytes"])
    name = struct.get("path")
    if not name:
        raise LeRobotDatasetError(f"dataset {root}: an image frame holds neither bytes nor a path; the dataset is damaged")
    file = (root / name).resolve()
    if not file.is_relative_to(root.resolve()) or not file.is_file():
        raise LeRobotDatasetError(f"dataset {root}: image file {name!r} is not a file inside the dataset; store the "
                                  "images in it (LeRobot embeds them in the parquet files when it pushes a dataset)")
    return _decode_png(file.read_bytes())


# -- statistics (LeRobot's: per episode, then aggregated weighted by frame counts) ------------------------
def _feature_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    stats = {"min": values.min(0), "max": values.max(0), "mean": values.mean(0), "std": values.std(0),
             "count": np.array([len(values)])}
    for q, value in zip(QUANTILES, np.quantile(values, QUANTILES, axis=0)):
        stats[f"q{round(q * 100):02d}"] = value
    return stats


def _image_stats(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel statistics of (N, H, W, 3) uint8 frames in [0, 1], shaped (3, 1, 1) as LeRobot stores them."""
    pixels = images.reshape(-1, 3)[:: max(1, images[0].size // 3 // 1024)]  # ~1024 pixels per frame
    stats = _feature_stats(pixels / 255.0)
    return {k: (v if k == "count" else v.reshape(3, 1, 1)) for k, v in {**stats, "count": np.array([len(images)])}.items()}


def _aggregate_stats(per_episode: list[dict[str, dict[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for name in per_episode[0]:
        parts = [s[name] for s in per_episode]
        counts = np.array([p["count"][0] for p in parts], dtype=np.float64)
        shape = (-1,) + (1,) * np.ndim(parts[0]["mean"])
        w = (counts / counts.sum()).reshape(shape)
        means = np.stack([p["mean"] for p in parts])
        mean = (w * means).sum(0)
        var = (w * (np.stack([p["std"] for p in parts]) ** 2 + (means - mean) ** 2)).sum(0)
        agg = {"min": np.stack([p["min"] for p in parts]).min(0), "max": np.stack([p["max"] for p in parts]).max(0),
               "mean": mean, "std": np.sqrt(var), "count": np.array([int(counts.sum())])}
        for key in parts[0]:
            if key.startswith("q"):
                agg[key] = (w * np.stack([p[key] for p in parts])).sum(0)
        out[name] = agg
    return out


# -- reading -------------------------------------------------------------------------------------------
def read_info(path: str | os.PathLike) -> dict:
    """``meta/info.json`` of a v3 dataset, checked."""
    path = Path(path)
    if not is_lerobot_dataset(path):
        raise LeRobotDatasetError(f"{path} is not a LeRobot dataset (no {INFO_PATH})")
    try:
        info = json.loads((path / INFO_PATH).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LeRobotDatasetError(f"{path / INFO_PATH} is not valid JSON ({exc}); the dataset is damaged") from exc
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3."):
        raise LeRobotDatasetError(
            f"{path} is a LeRobotDataset {version or 'of unknown version'}; vlapt reads v3.0. Convert it with LeRobot: "
            "python -m lerobot.datasets.v30.convert_dataset_v21_to_v30 --repo-id=<id> (v2.0 datasets: to v2.1 first)")
    for key in ("fps", "features", "data_path", "total_episodes"):
        if key not in info:
            raise LeRobotDatasetError(f"{path / INFO_PATH} has no {key!r}; the dataset is incomplete or damaged")
    return info


def dataset_keys(info: dict) -> FeatureKeys:
    """The feature mapping a vlapt-written dataset recorded, else the default one."""
    recorded = (info.get(VLAPT_KEY) or {}).get("keys")
    if not recorded:
        return DEFAULT_KEYS
    known = {f.name for f in dataclasses.fields(FeatureKeys)}
    if not isinstance(recorded, dict) or set(recorded) - known:
        raise LeRobotDatasetError(f"the dataset's {INFO_PATH} records feature keys this vlapt does not know "
                                  f"({recorded!r}; known: {sorted(known)}); a newer vlapt wrote it: upgrade vlapt")
    return FeatureKeys(**recorded)


def check_features(info: dict, keys: FeatureKeys, where: str | os.PathLike) -> dict[str, dict]:
    """The mapped features, each present with a usable dtype and shape; else an error naming what the dataset has."""
    features = info["features"]
    have = ", ".join(f"{name} ({ft.get('dtype')} {list(ft.get('shape', []))})" for name, ft in features.items())
    problems = []

    def need(role: str, name: str, dtypes: tuple[str, ...], ndim: int, required: bool = True):
        ft = features.get(name)
        if ft is None:
            if required:
                problems.append(f"{role} feature {name!r} is missing")
            return
        if ft.get("dtype") not in dtypes or len(ft.get("shape", [])) != ndim:
            problems.append(f"{role} feature {name!r} is {ft.get('dtype')} {list(ft.get('shape', []))}, "
                            f"expected {' or '.join(dtypes)} with {ndim} dimension(s)")

    floats = ("float32", "float64", "float16")
    need("image", keys.image, ("video", "image"), 3)
    need("proprio", keys.proprio, floats, 1)
    need("action", keys.action, floats, 1)
    need("state", keys.state, floats, 1, required=False)
    need("reward", keys.reward, floats, 1, required=False)
    if not problems and image_hw(features[keys.image]) is None:
        problems.append(f"image feature {keys.image!r} has shape {features[keys.image]['shape']}; expected RGB frames, "
                        "(H, W, 3) or (3, H, W)")
    if problems:
        raise LeRobotDatasetError(f"dataset {where} does not match vlapt's observation mapping ({keys.as_dict()}): "
                                  + "; ".join(problems) + f". Its features: {have}. Map other feature names with "
                                  "vlapt.data.lerobot.FeatureKeys (read_episodes(path, keys=...))")
    return features


def image_hw(feature: dict) -> tuple[int, int] | None:
    """(height, width) of an image feature declared (H, W, 3) or, as some LeRobot datasets do, (3, H, W)."""
    shape, names = list(feature.get("shape", [])), feature.get("names")
    if len(shape) != 3:
        return None
    channels_first = (isinstance(names, list) and names and str(names[0]).startswith("channel")) or (
        shape[0] == 3 and shape[2] != 3)
    if channels_first:
        return (int(shape[1]), int(shape[2])) if shape[0] == 3 else None
    return (int(shape[0]), int(shape[1])) if shape[2] == 3 else None


def env_args(path: str | os.PathLike) -> dict[str, Any]:
    """What vlapt knows of how the episodes were observed: the recorded env_args, or what info.json implies."""
    info = read_info(path)
    recorded = (info.get(VLAPT_KEY) or {}).get("env_args")
    if recorded:
        return dict(recorded)
    keys = dataset_keys(info)
    features = check_features(info, keys, path)
    image = features[keys.image]
    names = features[keys.proprio].get("names")
    state = features.get(keys.state)
    return {
        "env_name": info.get("robot_type") or "",
        "camera": "",  # not recorded by LeRobot: the suite's default view
        "camera_fovy": 0.0,
        "image_size": image_hw(image)[0],
        "image_orientation": "upright",
        "proprio_fields": list(names) if isinstance(names, list) and all(isinstance(n, str) for n in names)
        else [f"{keys.proprio}[{i}]" for i in range(features[keys.proprio]["shape"][0])],
        "action_dim": int(features[keys.action]["shape"][0]),
        "state_dim": int(state["shape"][0]) if state else 0,
        "tasks": [],
        "fps": info["fps"],
    }


def _read_table(path: Path, columns: Sequence[str] | None = None):
    _, pq = _pyarrow()
    try:
        return pq.read_table(str(path), columns=list(columns) if columns is not None else None)
    except (OSError, ValueError) as exc:
        raise LeRobotDatasetError(f"{path} is not a readable parquet file ({exc}); the dataset is damaged") from exc


def _read_tasks(root: Path) -> dict[int, str]:
    table = _read_table(root / TASKS_PATH)
    meta = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}"))
    index = [c for c in meta.get("index_columns", []) if isinstance(c, str)]
    candidates = index + [c for c in ("task", "__index_level_0__") if c not in index]
    column = next((c for c in candidates if c in table.column_names), None)
    if column is None or "task_index" not in table.column_names:
        raise LeRobotDatasetError(f"{root / TASKS_PATH} has no task strings and task_index column; the dataset is damaged")
    return dict(zip(table.column("task_index").to_pylist(), table.column(column).to_pylist()))


def _read_episode_rows(root: Path) -> list[dict]:
    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise LeRobotDatasetError(f"{root} has no meta/episodes/*/*.parquet; the dataset is incomplete")
    rows = []
    for file in files:
        table = _read_table(file)
        keep = [c for c in table.column_names if not c.startswith("stats/")]
        rows.extend(table.select(keep).to_pylist())
    return sorted(rows, key=lambda r: r["episode_index"])


def read_episodes(path: str | os.PathLike, tasks: Sequence[str] | None = None, demos_per_task: int | None = None,
                  keys: FeatureKeys | None = None, suite: Any = None) -> list[Episode]:
    """Episodes grouped by task, optionally only some tasks and the first ``demos_per_task`` of each.

    Tasks come in the order vlapt recorded (``env_args["tasks"]``, as in the HDF5 format), then any
    others in order of first appearance; within a task, episodes keep the dataset's order.

    Task names come from vlapt's own episode column when the dataset has it, else from the
    instruction (LeRobot's ``task`` string) matched against ``suite``'s instructions, else the
    instruction itself.
    """
    root = Path(path)
    info = read_info(root)
    keys = keys or dataset_keys(info)
    features = check_features(info, keys, root)
    instructions = _read_tasks(root)
    rows = _read_episode_rows(root)
    by_instruction = {suite.instruction(t): t for t in suite.tasks} if suite is not None else {}

    def task_of(row: dict) -> str:
        if row.get(f"{VLAPT_KEY}/task"):
            return str(row[f"{VLAPT_KEY}/task"])
        text = (row.get("tasks") or [""])[0]
        return by_instruction.get(text, text)

    order: dict[str, list[dict]] = {}
    for row in rows:
        order.setdefault(task_of(row), []).append(row)
    # Tasks in the order the dataset recorded (as the HDF5 reader does), not in the order parallel workers happened
    # to finish their episodes: the same demonstrations then give the same SFT minibatches in either format.
    recorded = [t for t in ((info.get(VLAPT_KEY) or {}).get("env_args") or {}).get("tasks", []) if t in order]
    available = recorded + [t for t in order if t not in recorded]
    wanted = list(tasks) if tasks else available
    missing = [t for t in wanted if t not in order]
    if missing:
        raise LeRobotDatasetError(f"dataset {root} has no episodes of {missing}; it holds {available}")
    chosen = []
    for task in wanted:
        episodes = order[task]
        if demos_per_task is not None:
            if demos_per_task > len(episodes):
                raise LeRobotDatasetError(f"dataset {root} has {len(episodes)} episodes of {task}, fewer than the "
                                          f"{demos_per_task} asked for")
            episodes = episodes[:demos_per_task]
        chosen.extend((task, row) for row in episodes)

    frames = _read_frames(root, info, features, keys, [row for _, row in chosen])
    images = (_read_video_frames(root, info, keys, [row for _, row in chosen], frames)
              if features[keys.image]["dtype"] == "video" else {i: frames[i].pop("image") for i in frames})
    out = []
    for task, row in chosen:
        i = int(row["episode_index"])
        data = frames[i]
        n = len(data["action"])
        v = {k: row.get(f"{VLAPT_KEY}/{k}") for k in EPISODE_COLUMNS}
        instruction = (row.get("tasks") or [instructions.get(int(data["task_index"][0]), "")])[0]
        out.append(Episode(
            task=task, instruction=str(instruction),
            success=bool(v["success"]) if v["success"] is not None else bool(data.get("success", np.zeros(1))[-1]),
            steps=n, split=str(v["split"] or "train"),
            config_index=int(v["config_index"]) if v["config_index"] is not None else -1,
            config_seed=int(v["config_seed"]) if v["config_seed"] is not None else 0,
            source=str(v["source"] or "lerobot"),
            images=images[i], proprio=data["proprio"], states=data.get("state"), actions=data["action"],
            rewards=data.get("reward", np.zeros(n, np.float32)),
        ))
    return out


def _column(table, name: str, dtype) -> np.ndarray:
    pa, _ = _pyarrow()
    values = table.column(name).combine_chunks()
    if pa.types.is_fixed_size_list(values.type) or pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        flat = values.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(values), -1).astype(dtype)
    return values.to_numpy(zero_copy_only=False).astype(dtype)


def _read_frames(root: Path, info: dict, features: dict, keys: FeatureKeys, rows: list[dict]) -> dict[int, dict]:
    """Per chosen episode: its frames' numeric columns (and PNG images), in frame order."""
    wanted = {int(r["episode_index"]) for r in rows}
    files = sorted({(int(r["data/chunk_index"]), int(r["data/file_index"])) for r in rows})
    roles = {"proprio": keys.proprio, "action": keys.action}
    for role, name in (("state", keys.state), ("reward", keys.reward)):
        if name in features:
            roles[role] = name
    if "next.success" in features:
        roles["success"] = "next.success"
    is_png = features[keys.image]["dtype"] == "image"
    out: dict[int, dict] = {}
    for chunk, file in files:
        target = root / info["data_path"].format(chunk_index=chunk, file_index=file)
        if not target.is_file():
            raise LeRobotDatasetError(f"{target} is missing; the dataset is incomplete")
        columns = ["episode_index", "frame_index", "task_index", *roles.values()] + ([keys.image] if is_png else [])
        table = _read_table(target, columns)
        episode = table.column("episode_index").to_numpy()
        frame = table.column("frame_index").to_numpy()
        task = table.column("task_index").to_numpy()
        arrays = {role: _column(table, name, np.float32 if role != "success" else bool) for role, name in roles.items()}
        for role in ("reward", "success"):
            if role in arrays:
                arrays[role] = arrays[role].reshape(len(episode))
        images = table.column(keys.image).to_pylist() if is_png else None
        order = np.lexsort((frame, episode))  # rows by episode, then frame
        found, starts = np.unique(episode[order], return_index=True)
        for i, first, last in zip(found, starts, [*starts[1:], len(order)]):
            if int(i) not in wanted:
                continue
            rows_i = order[first:last]
            data = {role: values[rows_i] for role, values in arrays.items()}
            data["task_index"] = task[rows_i]
            if images is not None:
                data["image"] = np.stack([_stored_image(images[r], root) for r in rows_i])
            out[int(i)] = data
    lost = wanted - set(out)
    if lost:
        raise LeRobotDatasetError(f"dataset {root}: the data files hold no frames of episodes {sorted(lost)[:5]}; "
                                  "the dataset is damaged")
    for row in rows:
        i = int(row["episode_index"])
        if len(out[i]["action"]) != int(row["length"]):
            raise LeRobotDatasetError(f"dataset {root}: episode {i} has {len(out[i]['action'])} frames, its metadata says "
                                      f"{row['length']}; the dataset is damaged")
    return out


def _read_video_frames(root: Path, info: dict, keys: FeatureKeys, rows: list[dict], frames: dict[int, dict]) -> dict[int, np.ndarray]:
    """Decode each video file once, front to back, keeping the frames of the chosen episodes.

    A frame belongs to an episode when its presentation time is within half a frame of the
    episode's ``from_timestamp`` plus the frame's index over fps (LeRobot's own lookup, by time).
    """
    av = _av()
    fps = float(info["fps"])
    key = keys.image
    height, width = image_hw(info["features"][key])
    by_file: dict[tuple[int, int], list[dict]] = {}
    for row in rows:
        by_file.setdefault((int(row[f"videos/{key}/chunk_index"]), int(row[f"videos/{key}/file_index"])), []).append(row)
    out: dict[int, np.ndarray] = {}
    for (chunk, file), file_rows in sorted(by_file.items()):
        target = root / info["video_path"].format(video_key=key, chunk_index=chunk, file_index=file)
        if not target.is_file():
            raise LeRobotDatasetError(f"{target} is missing; the dataset is incomplete")
        # every wanted frame's time in this file, sorted, with where it goes
        times, where = [], []
        for row in file_rows:
            i = int(row["episode_index"])
            n = len(frames[i]["action"])
            out[i] = np.empty((n, height, width, 3), np.uint8)
            start = float(row[f"videos/{key}/from_timestamp"])
            times.extend(start + np.arange(n) / fps)
            where.extend((i, j) for j in range(n))
        order = np.argsort(times, kind="stable")
        times = np.asarray(times)[order]
        where = [where[k] for k in order]
        filled = 0
        try:
            with av.open(str(target)) as container:
                stream = container.streams.video[0]
                for frame in container.decode(stream):
                    if filled == len(times):
                        break
                    t = float(frame.pts * frame.time_base) if frame.pts is not None else float(frame.time)
                    if filled < len(times) and times[filled] < t - 0.5 / fps:
                        raise LeRobotDatasetError(f"{target} has no frame at {times[filled]:.4f}s, which episode "
                                                  f"{where[filled][0]} needs; the video is damaged or was cut")
                    if filled < len(times) and abs(t - times[filled]) <= 0.5 / fps:
                        image = frame.to_ndarray(format="rgb24")
                        if image.shape != (height, width, 3):
                            raise LeRobotDatasetError(f"{target} holds {image.shape[1]}x{image.shape[0]} frames, "
                                                      f"info.json says {width}x{height}")
                        i, j = where[filled]
                        out[i][j] = image
                        filled += 1
        except av.error.FFmpegError as exc:
            raise LeRobotDatasetError(f"{target} cannot be decoded ({exc}); the video is damaged") from exc
        if filled < len(times):
            raise LeRobotDatasetError(f"{target} ends before frame {where[filled][1]} of episode {where[filled][0]}; "
                                      "the video is damaged or was cut")
    return out
