"""MetaWorld as a VLA sees it: tasks with instructions, held-out configurations, chunked envs."""

from vlapt.envs.configurations import SPLITS, Configuration, make_configuration, make_configurations
from vlapt.envs.metaworld_env import CAMERAS, MAX_EPISODE_STEPS, PROPRIO_FIELDS, EnvConfig, MetaWorldVLAEnv
from vlapt.envs.tasks import MT10, MT50, SUITES, UnknownTaskError, instruction_for, resolve_tasks
from vlapt.envs.experts import ScriptedExpert
from vlapt.envs.vector import EnvPool, SlotSpec, StepResult, WorkerError

__all__ = [
    "CAMERAS", "MAX_EPISODE_STEPS", "MT10", "MT50", "PROPRIO_FIELDS", "SPLITS", "SUITES",
    "Configuration", "EnvConfig", "EnvPool", "MetaWorldVLAEnv", "ScriptedExpert", "SlotSpec", "StepResult",
    "UnknownTaskError", "WorkerError", "instruction_for", "make_configuration",
    "make_configurations", "resolve_tasks",
]
