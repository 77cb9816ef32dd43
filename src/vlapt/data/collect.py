"""Collect scripted-expert demonstrations on training configurations.

Each task works through training configurations 0, 1, 2, ... and keeps the first
``demos_per_task`` successful episodes (the experts fail on a few configurations, e.g.
door-open and peg-insert-side). Images are rendered at every step because every step is a
training sample for chunked behaviour cloning.

With ``action_noise > 0`` the env executes the expert's action plus Gaussian noise while the
dataset keeps the expert's own action as the label (noise injection, as in DART, Laskey et
al. 2017): the demonstrations then visit states off the expert's path together with the
action that leads back, which is what a cloned policy needs once its own errors have put it
there. ``action_noise_hold`` keeps each draw for that many steps, so the drift resembles a
chunked policy's (a whole chunk aimed slightly wrong) rather than per-step jitter that the
expert cancels at once. Measured on MT10 with chunk-10 SFT it hurt (docs/results.md, "noise
injection"): a chunk's label then holds the expert's reactions to noise that comes after the
decision. Off by default.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque

import numpy as np
from tqdm import tqdm

from vlapt.data.format import DemoWriter, EpisodeData, check_writable
from vlapt.envs.experts import check_expert, make_expert
from vlapt.envs.metaworld_env import CAMERAS, MAX_EPISODE_STEPS, PROPRIO_FIELDS, EnvConfig
from vlapt.envs.tasks import instruction_for, resolve_tasks, task_index
from vlapt.envs.vector import EnvPool, SlotSpec
from vlapt.rollout.episodes import Episode, run_episodes


@dataclasses.dataclass
class CollectConfig:
    suite: str = "mt10"
    tasks: list[str] = dataclasses.field(default_factory=list)  # overrides suite when given
    demos_per_task: int = 150  # 150 rather than 50: SFT 0.818 -> 0.870 on MT10 held-out (docs/results.md)
    expert: str = "scripted"  # or "scripted-fast": the same phases and contacts with the corners cut (~25% fewer steps)
    camera: str = "corner"
    camera_fovy: float = 30.0  # narrower than the corner camera's 45: small goals and pucks cover more pixels; 0: the camera's own
    image_size: int = 96
    max_episode_steps: int = MAX_EPISODE_STEPS
    config_seed: int = 0
    action_noise: float = 0.0  # std of the noise added to executed actions; labels stay the expert's (0: none)
    action_noise_hold: int = 1  # env steps each noise draw is held
    noise_seed: int = 0  # noise of episode (task, configuration) comes from its own stream under this seed
    max_attempts_factor: int = 3  # give up on a task after demos_per_task * this many episodes
    num_workers: int = 2
    envs_per_task: int = 1
    output: str = "datasets/mt10_scripted_fovy30.hdf5"
    overwrite: bool = False

    def validate(self) -> "CollectConfig":
        resolve_tasks(self.suite, self.tasks)
        check_expert(self.expert)
        if self.demos_per_task < 1:
            raise ValueError(f"demos_per_task must be >= 1, got {self.demos_per_task}")
        if self.camera not in CAMERAS:
            raise ValueError(f"unknown camera {self.camera!r}; valid cameras: {', '.join(CAMERAS)}")
        if not (self.action_noise >= 0 and np.isfinite(self.action_noise)) or self.action_noise_hold < 1:
            raise ValueError(f"action_noise must be a finite number >= 0 and action_noise_hold >= 1, got "
                             f"{self.action_noise} and {self.action_noise_hold}")
        if self.envs_per_task < 1 or self.num_workers < 0 or self.max_attempts_factor < 1:
            raise ValueError("envs_per_task and max_attempts_factor must be >= 1, num_workers >= 0")
        self.env_config()
        return self

    def env_config(self) -> EnvConfig:
        return EnvConfig(
            camera=self.camera, image_size=self.image_size, camera_fovy=self.camera_fovy, render=True, privileged_state=True,
            max_episode_steps=self.max_episode_steps,
        ).validate()


def dataset_env_args(tasks: list[str], env_config: EnvConfig, config_seed: int) -> dict:
    """What every vlapt dataset records about how its episodes were observed and labelled."""
    return {
        "env_name": "metaworld",
        "tasks": list(tasks),
        "camera": env_config.camera,
        "camera_fovy": env_config.camera_fovy,
        "image_size": env_config.image_size,
        "image_orientation": "upright (corner cameras rotated 180 degrees)",
        "proprio_fields": list(PROPRIO_FIELDS),
        "max_episode_steps": env_config.max_episode_steps,
        "config_split": "train",
        "config_seed": config_seed,
        "policy": "metaworld scripted expert, actions clipped to [-1, 1]",
    }


class CollectionError(RuntimeError):
    pass


def collect(config: CollectConfig, progress: bool = True) -> dict:
    """Write the dataset and return a summary (episodes tried/kept per task, wall time)."""
    config.validate()
    check_writable(config.output, config.overwrite)  # fail before minutes of work, not after
    tasks = resolve_tasks(config.suite, config.tasks)
    env_config = config.env_config()
    expert = make_expert(config.expert)
    slots = [SlotSpec(t, env_config, 1, config.config_seed) for t in tasks for _ in range(config.envs_per_task)]
    n = config.demos_per_task
    per = config.envs_per_task
    queues = [deque(range(k, n, per)) for _ in tasks for k in range(per)]
    next_index = {t: n for t in tasks}
    kept = {t: 0 for t in tasks}
    tried = {t: 0 for t in tasks}
    outstanding = {t: n for t in tasks}  # episodes queued or running
    env_args = {
        **dataset_env_args(tasks, env_config, config.config_seed),
        "action_noise": {"std": config.action_noise, "hold_steps": config.action_noise_hold, "seed": config.noise_seed,
                         "note": "executed = clip(expert action + noise, -1, 1); actions stores the expert action"},
        "success": "episode ends at the first info['success']; only successful episodes are kept",
        "expert": config.expert,
    }
    if config.expert != "scripted":
        env_args["policy"] = f"vlapt {config.expert}: {type(expert).__doc__.splitlines()[0]} Actions clipped to [-1, 1]"
    start = time.perf_counter()
    bar = tqdm(total=n * len(tasks), desc="collect", unit="demo", disable=not progress, dynamic_ncols=True)
    writer = DemoWriter(config.output, env_args, overwrite=config.overwrite)

    perturb = NoiseInjection(config.action_noise, config.action_noise_hold, config.noise_seed) if config.action_noise else None

    def finished(episode: Episode) -> None:
        task = episode.task
        if perturb is not None:
            perturb.forget(episode)
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

    with writer, bar:  # the writer publishes the file on success and removes it on any error
        with EnvPool(slots, num_workers=config.num_workers) as pool:
            env_steps = run_episodes(expert, pool, [s.task for s in slots], queues, "train", finished, record=True,
                                     execute=perturb)
        missing = {t: n - k for t, k in kept.items() if k < n}
        if missing:
            raise CollectionError(f"not enough successful demonstrations: missing {missing}")
    return {
        "output": str(writer.path),
        "tasks": {t: {"kept": kept[t], "tried": tried[t]} for t in tasks},
        "env_steps": env_steps,
        "wall_time_s": time.perf_counter() - start,
    }


class NoiseInjection:
    """Held Gaussian action noise, reproducible per episode (its task and configuration index)."""

    def __init__(self, std: float, hold: int, seed: int):
        self.std, self.hold, self.seed = std, hold, seed
        self._state: dict[tuple[str, int], list] = {}  # (task, config index) -> [rng, steps done, current noise]

    def __call__(self, episodes: list[Episode], observations: list[dict], chunks: list[np.ndarray]) -> list[np.ndarray]:
        return [self.perturb(episode, chunk) for episode, chunk in zip(episodes, chunks)]

    def perturb(self, episode: Episode, chunk: np.ndarray) -> np.ndarray:
        key = (episode.task, episode.config_index)
        if key not in self._state:
            stream = np.random.SeedSequence([self.seed, task_index(episode.task), episode.config_index])
            self._state[key] = [np.random.default_rng(stream), 0, None]
        state = self._state[key]
        chunk = np.asarray(chunk, dtype=np.float32)
        noisy = np.empty_like(chunk)
        for k in range(len(chunk)):
            if state[1] % self.hold == 0:
                state[2] = state[0].normal(0.0, self.std, chunk.shape[-1]).astype(np.float32)
            noisy[k] = chunk[k] + state[2]
            state[1] += 1
        return np.clip(noisy, -1.0, 1.0)

    def forget(self, episode: Episode) -> None:
        self._state.pop((episode.task, episode.config_index), None)


def _to_episode_data(episode: Episode, config_seed: int, source: str = "scripted") -> EpisodeData:
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
        source=source,
    )
