"""Collect scripted-expert demonstrations on training configurations.

Each task works through training configurations 0, 1, 2, ... and keeps the first
``demos_per_task`` successful episodes (experts fail on a few configurations). Images are
rendered at every step because every step is a training sample for chunked behaviour cloning.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque

from tqdm import tqdm

from vlapt.config import check_at_least
from vlapt.data import lerobot
from vlapt.data.format import DemoWriter, check_writable
from vlapt.envs import get_suite
from vlapt.envs.experts import check_expert_choice, make_experts
from vlapt.envs.pools import check_backend, make_pool
from vlapt.interfaces import EnvConfig, EnvSuite, Episode, SlotSpec
from vlapt.rollout.episodes import run_episodes


@dataclasses.dataclass
class CollectConfig:
    suite: str = "mt10"
    tasks: list[str] = dataclasses.field(default_factory=list)  # overrides the suite's task list when given
    demos_per_task: int = 150  # the default SFT set (docs/experiments/more-demonstrations-and-noise-injection.md)
    expert: str = "scripted"  # one of the suite's experts (MetaWorld: scripted, scripted-fast)
    expert_per_task: dict[str, str] = dataclasses.field(default_factory=dict)  # task -> another expert for that task only
    camera: str = ""  # "": the suite's default view
    camera_fovy: float = 30.0  # narrower than MetaWorld's corner camera (45): small goals and objects cover more pixels
    image_size: int = 96
    max_episode_steps: int = 500
    config_seed: int = 0
    max_attempts_factor: int = 3  # give up on a task after demos_per_task * this many episodes
    num_workers: int = 2
    env_backend: str = "local"  # where env slots run: local worker processes, or "ray" (vlapt.envs.pools)
    envs_per_task: int = 1
    output: str = "datasets/mt10_scripted_fovy30.hdf5"
    overwrite: bool = False  # replace an existing dataset at `output` (never a directory that is not a dataset)
    format: str = "hdf5"  # "hdf5" (docs/dataset_format.md) | "lerobot": a LeRobotDataset v3 directory (vlapt.data.lerobot)
    lerobot_images: str = "png"  # format=lerobot: "png" (lossless, in the parquet) | "video" (mp4, LeRobot's AV1 settings: lossy)

    def validate(self) -> "CollectConfig":
        suite = get_suite(self.suite)
        suite.resolve_tasks(self.tasks)
        check_expert_choice(suite, self.expert, self.expert_per_task)
        check_backend(self.env_backend)
        check_at_least(self, 1, "demos_per_task", "envs_per_task", "max_attempts_factor")
        check_at_least(self, 0, "num_workers")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.lerobot_images not in IMAGE_STORAGE:
            raise ValueError(f"lerobot_images must be one of {', '.join(IMAGE_STORAGE)}, got {self.lerobot_images!r}")
        self.env_config(suite)
        return self

    def env_config(self, suite: EnvSuite) -> EnvConfig:
        return suite.check_env_config(EnvConfig(
            camera=self.camera, image_size=self.image_size, camera_fovy=self.camera_fovy, render=True,
            privileged_state=True, max_episode_steps=self.max_episode_steps))


def dataset_env_args(suite: EnvSuite, tasks: list[str], env_config: EnvConfig, config_seed: int) -> dict:
    """What every vlapt dataset records about how its episodes were observed and labelled."""
    spec = suite.observation_spec(env_config)
    return {
        "env_name": suite.family,
        "suite": suite.name,
        "tasks": list(tasks),
        "camera": spec.camera,
        "camera_fovy": spec.camera_fovy,
        "image_size": spec.image_size,
        "image_orientation": "upright",
        "proprio_fields": list(spec.proprio_fields),
        "action_dim": spec.action_dim,
        "state_dim": spec.state_dim,
        "max_episode_steps": env_config.max_episode_steps,
        "config_split": "train",
        "config_seed": config_seed,
    }


class CollectionError(RuntimeError):
    pass


FORMATS = ("hdf5", "lerobot")
IMAGE_STORAGE = lerobot.IMAGE_STORAGE


def make_writer(config: CollectConfig, suite: EnvSuite, env_args: dict):
    """The dataset writer of ``config.format`` (both publish on ``close`` and remove everything on ``abort``)."""
    if config.format == "lerobot":
        return lerobot.LeRobotWriter(config.output, env_args, overwrite=config.overwrite, config=config,
                                     fps=getattr(suite, "fps", 0) or lerobot.DEFAULT_FPS, images=config.lerobot_images)
    return DemoWriter(config.output, env_args, overwrite=config.overwrite, config=config)


def collect(config: CollectConfig, progress: bool = True) -> dict:
    """Write the dataset and return a summary (episodes tried/kept per task, wall time)."""
    config.validate()
    # fail before minutes of work, not after
    (lerobot.check_writable if config.format == "lerobot" else check_writable)(config.output, config.overwrite)
    suite = get_suite(config.suite)
    tasks = suite.resolve_tasks(config.tasks)
    env_config = config.env_config(suite)
    expert = make_experts(suite, config.expert, config.expert_per_task)
    slots = [SlotSpec(suite, t, env_config, 1, config.config_seed) for t in tasks for _ in range(config.envs_per_task)]
    n = config.demos_per_task
    per = config.envs_per_task
    queues = [deque(range(k, n, per)) for _ in tasks for k in range(per)]
    next_index = {t: n for t in tasks}
    kept = {t: 0 for t in tasks}
    tried = {t: 0 for t in tasks}
    outstanding = {t: n for t in tasks}  # episodes queued or running
    env_args = {
        **dataset_env_args(suite, tasks, env_config, config.config_seed),
        "expert": config.expert,
        "expert_per_task": dict(config.expert_per_task),
        "policy": f"{suite.family} {expert.name} expert, actions clipped to the action bounds",
        "success": "episode ends at the first info['success']; only successful episodes are kept",
    }
    start = time.perf_counter()
    bar = tqdm(total=n * len(tasks), desc="collect", unit="demo", disable=not progress, dynamic_ncols=True)
    writer = make_writer(config, suite, env_args)

    def finished(episode: Episode, slot: int) -> None:
        task = episode.task
        tried[task] += 1
        outstanding[task] -= 1
        if episode.success and kept[task] < n:
            writer.add(episode)
            kept[task] += 1
            bar.update(1)
        elif not episode.success and kept[task] + outstanding[task] < n:
            if tried[task] >= n * config.max_attempts_factor:
                raise CollectionError(f"{task}: only {kept[task]} successes in {tried[task]} expert episodes; "
                                      f"raise max_attempts_factor or check the env settings")
            queues[slot].append(next_index[task])  # replace the failure with a new configuration
            next_index[task] += 1
            outstanding[task] += 1
        bar.set_postfix(tried=sum(tried.values()))

    with writer, bar:  # the writer publishes the file on success and removes it on any error
        with make_pool(slots, num_workers=config.num_workers, backend=config.env_backend) as pool:
            env_steps = run_episodes(expert, pool, [s.task for s in slots], queues, "train", finished, record=True,
                                     config_seed=config.config_seed, source="scripted")
        missing = {t: n - k for t, k in kept.items() if k < n}
        if missing:
            raise CollectionError(f"not enough successful demonstrations: missing {missing}")
    return {
        "output": str(writer.path),
        "tasks": {t: {"kept": kept[t], "tried": tried[t]} for t in tasks},
        "env_steps": env_steps,
        "wall_time_s": time.perf_counter() - start,
    }
