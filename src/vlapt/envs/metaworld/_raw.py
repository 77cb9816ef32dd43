"""Raw MetaWorld envs, the one place this package builds them from MetaWorld's class map."""

from __future__ import annotations


def make_raw_env(task: str):
    """MetaWorld's env for ``task``, goal observable (the 39-d state carries the goal; scripted experts read it).

    The observation space is a cached property whose bounds clip the state, so it has to be
    recomputed after the switch, as MetaWorld's own `set_task` does.
    """
    from metaworld.env_dict import ENV_CLS_MAP

    env = ENV_CLS_MAP[task]()
    env._set_task_called = True
    if env._partially_observable:
        env._partially_observable = False
        env.__dict__.pop("sawyer_observation_space", None)
    return env
