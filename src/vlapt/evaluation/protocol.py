"""The evaluation protocol: held-out configurations, fixed by seed, run in parallel.

Every task runs ``episodes_per_task`` episodes on configurations ``0..N-1`` of the ``eval``
split (never used for demonstrations or training), at most ``max_episode_steps`` env steps,
ending at the first success. Episodes of all tasks share env workers and the agent sees
one batch per decision. The same agent, seed and config give the same numbers.

With ``video_episodes`` = N, the first N episodes of each task (successes and failures alike)
are also filmed: the env renders a ``video_size`` frame of the policy's camera after every env
step (the policy still sees only its own image, so the episodes are the same as without video)
and `vlapt.evaluation.video` writes them, annotated, to ``video_dir``.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from vlapt.config import check_at_least
from vlapt.envs import get_suite
from vlapt.envs.pools import check_backend, make_pool
from vlapt.evaluation.metrics import SUCCESS_WITHIN, summarize
from vlapt.evaluation.video import VIDEO_FORMATS, write_episode_video
from vlapt.interfaces import Agent, Episode, SlotSpec
from vlapt.rollout.episodes import run_episodes
from vlapt.rundir import machine_description


@dataclasses.dataclass
class EvalConfig:
    suite: str = "mt10"
    tasks: list[str] = dataclasses.field(default_factory=list)  # overrides suite when given
    episodes_per_task: int = 50
    max_episode_steps: int = 0  # 0: the suite's own limit (MetaWorld: 500)
    split: str = "eval"  # held-out configurations; "train" only to measure overfitting
    config_seed: int = 0  # which configurations: shared by every run so results compare
    seed: int = 0  # the agent's sampling seed (stochastic policies)
    deterministic: bool = True  # act with the policy's mean chunk
    num_workers: int = 2
    env_backend: str = "local"  # where env slots run (vlapt.envs.pools)
    envs_per_task: int = 1  # parallel episodes per task (batch size = tasks x envs_per_task)
    # execute only the first k actions of each chunk, then decide again (receding horizon, as LeRobot's
    # n_action_steps or openpi's replan_steps); 0: the whole chunk, open-loop, as in post-training
    execute_steps: int = 0
    video_episodes: int = 0  # film the first N episodes of each task (0: none); needs a video_dir
    video_size: int = 256  # side of the video frames in pixels (the policy's own image is left as it is)
    video_fps: int = 30
    video_formats: list[str] = dataclasses.field(default_factory=lambda: ["mp4"])  # "mp4" and/or "gif"

    def validate(self) -> "EvalConfig":
        suite = get_suite(self.suite)
        suite.resolve_tasks(self.tasks)
        check_backend(self.env_backend)
        check_at_least(self, 1, "episodes_per_task", "envs_per_task")
        check_at_least(self, 0, "num_workers")
        if not 0 <= self.max_episode_steps <= suite.max_episode_steps:
            raise ValueError(f"max_episode_steps must be in [1, {suite.max_episode_steps}] (0: the suite's limit), "
                             f"got {self.max_episode_steps}")
        if self.split not in ("train", "eval"):
            raise ValueError(f"split must be 'eval' or 'train', got {self.split!r}")
        if self.execute_steps < 0:
            raise ValueError(f"execute_steps must be >= 0 (0: the whole chunk), got {self.execute_steps}")
        if self.video_episodes < 0:
            raise ValueError(f"video_episodes must be >= 0 (0: no videos), got {self.video_episodes}")
        if self.video_episodes:
            if not 32 <= self.video_size <= 2048:
                raise ValueError(f"video_size must be in [32, 2048] pixels, got {self.video_size}")
            if not 1 <= self.video_fps <= 120:
                raise ValueError(f"video_fps must be in [1, 120], got {self.video_fps}")
            unknown = sorted(set(self.video_formats) - set(VIDEO_FORMATS))
            if unknown or not self.video_formats:
                raise ValueError(f"video_formats must name one or more of {list(VIDEO_FORMATS)}, got {self.video_formats}")
        return self

    @property
    def task_names(self) -> tuple[str, ...]:
        return get_suite(self.suite).resolve_tasks(self.tasks)


def evaluate(
    agent: Agent,
    config: EvalConfig,
    progress: bool = True,
    on_episode: Callable[[Episode], None] | None = None,
    video_dir: str | Path | None = None,
) -> dict:
    """Run the protocol and return a JSON-ready result (protocol, per-task and average metrics, every episode).

    With ``config.video_episodes``, the videos go to ``video_dir`` and the result lists them
    (``videos``: each episode's summary and its file names; ``video_dir``).
    """
    config.validate()
    filmed = min(config.video_episodes, config.episodes_per_task)
    if filmed and video_dir is None:
        raise ValueError("video_episodes > 0 needs a directory for the videos (video_dir)")
    suite = get_suite(config.suite)
    actor = RecedingHorizon(agent, config.execute_steps) if config.execute_steps else agent
    tasks = config.task_names
    limit = config.max_episode_steps or suite.max_episode_steps
    env_config = suite.check_env_config(dataclasses.replace(actor.observation_config(), max_episode_steps=limit,
                                                            video_size=config.video_size if filmed else 0))
    envs_per_task = min(config.envs_per_task, config.episodes_per_task)
    slots = [SlotSpec(suite, task, env_config, actor.chunk_len, config.config_seed) for task in tasks for _ in range(envs_per_task)]
    # slot k of a task runs that task's episodes k, k + E, k + 2E, ...
    queues = [deque(range(k, config.episodes_per_task, envs_per_task)) for _ in tasks for k in range(envs_per_task)]

    start = time.perf_counter()
    episodes: list[Episode] = []
    videos: list[dict] = []
    bar = tqdm(total=len(tasks) * config.episodes_per_task, desc="eval", unit="ep", disable=not progress, dynamic_ncols=True)

    def finished(episode: Episode, slot: int) -> None:
        episodes.append(episode)
        if episode.frames is not None:
            files = write_episode_video(episode, video_dir, config.video_formats, config.video_fps, limit)
            videos.append({**episode.summary(), "files": files})
        if on_episode is not None:
            on_episode(episode)
        episode.frames = None  # written: not kept in memory
        bar.update(1)
        bar.set_postfix(success=f"{sum(e.success for e in episodes) / len(episodes):.3f}")

    with make_pool(slots, num_workers=config.num_workers, backend=config.env_backend) as pool:
        env_steps = run_episodes(actor, pool, [s.task for s in slots], queues, config.split, finished,
                                 config_seed=config.config_seed,
                                 video=(lambda task, index: index < filmed) if filmed else None)
    bar.close()
    wall = time.perf_counter() - start
    episodes.sort(key=lambda e: (tasks.index(e.task), e.config_index))
    summary = summarize(episodes, tasks, limit, SUCCESS_WITHIN)
    videos.sort(key=lambda v: (tasks.index(v["task"]), v["config_index"]))
    filming = {"videos": videos, "video_dir": str(video_dir)} if filmed else {}
    return {
        "agent": actor.name,
        "protocol": {
            "suite": suite.name,
            "tasks": list(tasks),
            "episodes_per_task": config.episodes_per_task,
            "max_episode_steps": limit,
            "split": config.split,
            "config_seed": config.config_seed,
            "seed": config.seed,
            "deterministic": getattr(agent, "deterministic", config.deterministic),
            "chunk_len": agent.chunk_len,
            "execute_steps": config.execute_steps or agent.chunk_len,
            "envs_per_task": envs_per_task,  # a sampling policy's draws depend on how episodes are batched
            "camera": env_config.camera if env_config.render else None,
            "image_size": env_config.image_size if env_config.render else None,
            "success": "info['success'] at any step; the first success ends the episode",
        },
        **summary,
        "episodes": [e.summary() for e in episodes],
        "env_steps": env_steps,
        "wall_time_s": wall,
        "machine": machine_description(),
        **filming,
    }


def checkpoint_evaluator(tasks, episodes_per_task: int, num_workers: int, suite: str, seed: int = 0,
                         env_backend: str = "local") -> Callable[[Path], dict]:
    """What a training loop calls to score a checkpoint it just wrote: deterministic, held-out, no progress bar."""
    from vlapt.evaluation.agents import CheckpointAgent

    def evaluate_checkpoint(path: Path) -> dict:
        agent = CheckpointAgent(str(path), deterministic=True, seed=seed)
        return evaluate(agent, EvalConfig(suite=suite, tasks=list(tasks), episodes_per_task=episodes_per_task,
                                          num_workers=num_workers, env_backend=env_backend), progress=False)

    return evaluate_checkpoint


class RecedingHorizon:
    """An agent that executes only the first ``steps`` actions of each of its chunks, then decides again.

    Open-loop chunks are cheap (one image and one forward pass per chunk) but cannot react to a
    slipping grasp or a drifting object until the chunk is over; deciding more often trades
    rendering and inference time for closed-loop control.
    """

    def __init__(self, agent: Agent, steps: int):
        if not 1 <= steps <= agent.chunk_len:
            raise ValueError(f"execute_steps must be in [1, {agent.chunk_len}] (the agent's chunk length), got {steps}")
        self.agent, self.chunk_len = agent, steps
        self.name = f"{agent.name} (first {steps} of each {agent.chunk_len}-step chunk)"

    def observation_config(self):
        return self.agent.observation_config()

    def act(self, observations, tasks):
        return [np.asarray(chunk)[: self.chunk_len] for chunk in self.agent.act(observations, tasks)]
