"""Collect scripted-expert demonstrations on training configurations.

Each task works through training configurations 0, 1, 2, ... and keeps the first
``demos_per_task`` successful episodes (the experts fail on a few configurations, e.g.
door-open and peg-insert-side). Images are rendered at every step because every step is a
training sample for chunked behaviour cloning.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque

import numpy as np
from tqdm import tqdm

from vlapt.data.format import DemoWriter, EpisodeData, check_writable
from vlapt.envs.experts import ScriptedExpert
from vlapt.envs.metaworld_env import CAMERAS, MAX_EPISODE_STEPS, PROPRIO_FIELDS, EnvConfig
from vlapt.envs.tasks import instruction_for, resolve_tasks
from vlapt.envs.vector import EnvPool, SlotSpec
from vlapt.rollout.episodes import Episode, run_episodes


@dataclasses.dataclass
class CollectConfig:
    suite: str = "mt10"
    tasks: list[str] = dataclasses.field(default_factory=list)  # overrides suite when given
    demos_per_task: int = 50
    camera: str = "corner"
    camera_fovy: float = 30.0  # narrower than the corner camera's 45: small goals and pucks cover more pixels; 0: the camera's own
    image_size: int = 96
    max_episode_steps: int = MAX_EPISODE_STEPS
    config_seed: int = 0
    max_attempts_factor: int = 3  # give up on a task after demos_per_task * this many episodes
    num_workers: int = 2
    envs_per_task: int = 1
    output: str = "datasets/mt10_scripted_fovy30.hdf5"
    overwrite: bool = False

    def validate(self) -> "CollectConfig":
        resolve_tasks(self.suite, self.tasks)
        if self.demos_per_task < 1:
            raise ValueError(f"demos_per_task must be >= 1, got {self.demos_per_task}")
        if self.camera not in CAMERAS:
            raise ValueError(f"unknown camera {self.camera!r}; valid cameras: {', '.join(CAMERAS)}")
        if self.envs_per_task < 1 or self.num_workers < 0 or self.max_attempts_factor < 1:
            raise ValueError("envs_per_task and max_attempts_factor must be >= 1, num_workers >= 0")
        self.env_config()
        return self

    def env_config(self) -> EnvConfig:
        return EnvConfig(
            camera=self.camera, image_size=self.image_size, camera_fovy=self.camera_fovy, render=True, privileged_state=True,
            max_episode_steps=self.max_episode_steps,
        ).validate()


class CollectionError(RuntimeError):
    pass


def collect(config: CollectConfig, progress: bool = True) -> dict:
    """Write the dataset and return a summary (episodes tried/kept per task, wall time)."""
    config.validate()
    check_writable(config.output, config.overwrite)  # fail before minutes of work, not after
    tasks = resolve_tasks(config.suite, config.tasks)
    env_config = config.env_config()
    expert = ScriptedExpert()
    slots = [SlotSpec(t, env_config, 1, config.config_seed) for t in tasks for _ in range(config.envs_per_task)]
    n = config.demos_per_task
    per = config.envs_per_task
    queues = [deque(range(k, n, per)) for _ in tasks for k in range(per)]
    next_index = {t: n for t in tasks}
    kept = {t: 0 for t in tasks}
    tried = {t: 0 for t in tasks}
    outstanding = {t: n for t in tasks}  # episodes queued or running
    env_args = {
        "env_name": "metaworld",
        "tasks": list(tasks),
        "camera": config.camera,
        "camera_fovy": config.camera_fovy,
        "image_size": config.image_size,
        "image_orientation": "upright (corner cameras rotated 180 degrees)",
        "proprio_fields": list(PROPRIO_FIELDS),
        "max_episode_steps": config.max_episode_steps,
        "config_split": "train",
        "config_seed": config.config_seed,
        "policy": "metaworld scripted expert, actions clipped to [-1, 1]",
        "success": "episode ends at the first info['success']; only successful episodes are kept",
    }
    start = time.perf_counter()
    bar = tqdm(total=n * len(tasks), desc="collect", unit="demo", disable=not progress, dynamic_ncols=True)
    writer = DemoWriter(config.output, env_args, overwrite=config.overwrite)

    def finished(episode: Episode) -> None:
        task = episode.task
        tried[task] += 1
        outstanding[task] -= 1
        if episode.success and kept[task] < n:
            writer.add(_to_episode_data(episode, config.config_seed))
            kept[task] += 1
            bar.update(1)
        elif not episode.success and kept[task] + outstanding[task] < n:
            if tried[task] >= n * config.max_attempts_factor:
                raise CollectionError(
                    f"{task}: only {kept[task]} successes in {tried[task]} expert episodes; "
                    f"raise max_attempts_factor or check the env settings"
                )
            queues[episode.slot].append(next_index[task])  # replace the failure with a new configuration
            next_index[task] += 1
            outstanding[task] += 1
        bar.set_postfix(tried=sum(tried.values()))

    try:
        with EnvPool(slots, num_workers=config.num_workers) as pool:
            env_steps = run_episodes(expert, pool, [s.task for s in slots], queues, "train", finished, record=True)
        missing = {t: n - k for t, k in kept.items() if k < n}
        if missing:
            raise CollectionError(f"not enough successful demonstrations: missing {missing}")
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    path = writer.close()
    return {
        "output": str(path),
        "tasks": {t: {"kept": kept[t], "tried": tried[t]} for t in tasks},
        "env_steps": env_steps,
        "wall_time_s": time.perf_counter() - start,
    }


def _to_episode_data(episode: Episode, config_seed: int) -> EpisodeData:
    obs = episode.observations
    return EpisodeData(
        task=episode.task,
        instruction=instruction_for(episode.task),
        images=np.stack([o["image"] for o in obs]),
        proprio=np.stack([o["proprio"] for o in obs]).astype(np.float32),
        states=np.stack([o["state"] for o in obs]).astype(np.float32),
        actions=np.concatenate(episode.actions).astype(np.float32),
        rewards=np.concatenate(episode.rewards).astype(np.float32),
        success=episode.success,
        config_split=episode.split,
        config_index=episode.config_index,
        config_seed=config_seed,
        source="scripted",
    )
