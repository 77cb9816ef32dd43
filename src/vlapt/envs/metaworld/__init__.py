"""MetaWorld (v3) as an env suite: MT10 and MT50 with an instruction per task.

Nothing outside this package imports MetaWorld, names its tasks or reads its 39-d state: the
rest of vlapt sees it through `MetaWorldSuite`, an `EnvSuite`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from vlapt.envs.metaworld.tasks import INSTRUCTIONS, MT10, MT50, check_task
from vlapt.interfaces import EnvConfig, ObservationSpec, UnknownTaskError


@dataclasses.dataclass(frozen=True)
class MetaWorldSuite:
    """The MetaWorld v3 tasks; ``tasks`` is the default task list (MT10 or MT50), any of the 50 may be asked for."""

    name: str = "mt10"
    tasks: tuple[str, ...] = MT10
    family: str = "metaworld"
    max_episode_steps: int = 500
    expert_names: tuple[str, ...] = ("scripted", "scripted-fast")
    fps: int = 80  # control steps per second (MuJoCo dt 0.0025 s x frame skip 5): the frame rate datasets record

    def check_task(self, task: str) -> str:
        return check_task(task)

    def resolve_tasks(self, tasks: Sequence[str] | str | None = None) -> tuple[str, ...]:
        if not tasks:
            return self.tasks
        names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
        names = [n for n in names if n]
        if not names:
            raise UnknownTaskError(f"task list {tasks!r} names no task; give task names, or none for the suite's own")
        for name in names:
            check_task(name)
        if len(set(names)) != len(names):
            raise UnknownTaskError(f"task list has duplicates: {names}")
        return tuple(names)

    def instruction(self, task: str) -> str:
        return INSTRUCTIONS[check_task(task)]

    def vocabulary(self) -> list[str]:
        return [INSTRUCTIONS[t] for t in MT50]

    def check_env_config(self, config: EnvConfig) -> EnvConfig:
        from vlapt.envs.metaworld.env import check_env_config

        return check_env_config(config)

    def observation_spec(self, config: EnvConfig) -> ObservationSpec:
        from vlapt.envs.metaworld.env import ACTION_DIM, AUX_TARGETS, PROPRIO_FIELDS, STATE_DIM

        config = self.check_env_config(config)
        return ObservationSpec(camera=config.camera, image_size=config.image_size, camera_fovy=config.camera_fovy,
                               proprio_fields=PROPRIO_FIELDS, action_dim=ACTION_DIM, state_dim=STATE_DIM,
                               aux_targets=AUX_TARGETS)

    def make_env(self, task: str, config: EnvConfig, chunk_len: int = 1, config_seed: int = 0):
        from vlapt.envs.metaworld.env import MetaWorldVLAEnv

        return MetaWorldVLAEnv(task, config, chunk_len=chunk_len, config_seed=config_seed)

    def configuration(self, task: str, split: str, index: int, seed: int = 0) -> dict:
        from vlapt.envs.metaworld.configurations import make_configuration

        return make_configuration(task, split, index, seed).as_dict()

    def make_expert(self, name: str):
        from vlapt.envs.metaworld.experts import make_expert

        return make_expert(name)


MT10_SUITE = MetaWorldSuite("mt10", MT10)
MT50_SUITE = MetaWorldSuite("mt50", MT50)

__all__ = ["MT10", "MT10_SUITE", "MT50", "MT50_SUITE", "MetaWorldSuite"]
