"""MetaWorld's scripted experts as agents: the source of demonstrations and a reference row."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from vlapt.envs.metaworld_env import EnvConfig


class ScriptedExpert:
    """MetaWorld's hand-written expert for each task; reads the privileged 39-d state.

    Its raw actions are not bounded, so they are clipped to the action space, the same
    clipping the environment applies and the one stored in demonstrations.
    """

    name = "scripted"
    chunk_len = 1

    def __init__(self) -> None:
        self._experts: dict[str, Any] = {}

    def observation_config(self) -> EnvConfig:
        return EnvConfig(render=False, privileged_state=True)

    def expert(self, task: str):
        if task not in self._experts:
            from metaworld.policies import ENV_POLICY_MAP

            self._experts[task] = ENV_POLICY_MAP[task]()
        return self._experts[task]

    def raw_action(self, state: np.ndarray, task: str) -> np.ndarray:
        """The expert's action before clipping (its controllers' gains can exceed the bounds)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MetaWorld warns on every unclipped action
            return np.asarray(self.expert(task).get_action(state), dtype=np.float32)

    def act_one(self, state: np.ndarray, task: str) -> np.ndarray:
        return np.clip(self.raw_action(state, task), -1.0, 1.0)

    def state_policy(self, task: str):
        """``act(state) -> action`` for ``task``, as `MetaWorldVLAEnv.lookahead` takes it. States are cast to
        float32, as the expert reads them when it acts or labels (observation["state"])."""
        return lambda state: self.act_one(np.float32(state), task)

    def act(self, observations, tasks):
        return [self.act_one(obs["state"], task)[None] for obs, task in zip(observations, tasks)]
