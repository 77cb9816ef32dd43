"""Training algorithms: supervised fine-tuning and post-training methods, one module each.

`vlapt train algorithm=NAME` runs ``vlapt.algorithms.NAME`` (``ppo`` is ``ppo_sbc``), or else the
importable module NAME of your own; an algorithm module defines
``ALGORITHM = Algorithm(name, ConfigClass, train, title, resumable)`` with
``train(config, progress=True, evaluator=None) -> Path`` (the final policy's directory).
`vlapt pipeline post_training=NAME` runs the same algorithm as its post-training stage; for that, the
config class also needs the fields the pipeline wires (``PIPELINE_FIELDS``).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, NamedTuple


class Algorithm(NamedTuple):
    name: str
    config: type  # a dataclass with validate(), an ``algorithm`` field and ``output_dir``
    train: Callable[..., Any]
    title: str | Callable[[Any], str] = ""  # how results tables name it (or its config), e.g. "chunked PPO + self-BC"
    resumable: tuple[str, ...] = ()  # options a rerun into the same output_dir may change (a longer budget, ...)


# what `vlapt pipeline` sets or reads on a post-training config: the suite, tasks and paths it wires to the
# earlier stages, and what its periodic held-out evaluation needs
PIPELINE_FIELDS = ("suite", "tasks", "init_policy", "demos", "output_dir", "eval_episodes", "num_workers", "seed",
                   "env_backend", "validate")


ALIASES = {"ppo": "vlapt.algorithms.ppo_sbc"}


def get_algorithm(name: str) -> Algorithm:
    candidates = [ALIASES[name]] if name in ALIASES else [f"vlapt.algorithms.{name}", name]
    for module in candidates:
        try:
            found = getattr(importlib.import_module(module), "ALGORITHM", None)
        except ModuleNotFoundError as exc:
            if not exc.name or not module.startswith(exc.name):
                raise  # the module exists but one of its own imports is missing
            continue
        if isinstance(found, Algorithm):
            return found
    raise ValueError(f"unknown algorithm {name!r}; built in: {', '.join(built_in())} (or an importable module of your "
                     "own that defines ALGORITHM = vlapt.algorithms.Algorithm(...))")


def built_in() -> list[str]:
    """The names of the algorithms that ship with vlapt."""
    import pkgutil

    names = []
    for info in pkgutil.iter_modules(__path__):
        algorithm = getattr(importlib.import_module(f"{__name__}.{info.name}"), "ALGORITHM", None)
        if isinstance(algorithm, Algorithm):
            names.append(algorithm.name)
    return sorted(names)


def options_of_another(algorithm: str, key: str | None) -> str:
    """A hint for an option ``key`` that ``algorithm``'s config lacks but another built-in one has ("" if none)."""
    name = (key or "").split(".")[0]
    if not name or name in {field.name for field in dataclasses.fields(get_algorithm(algorithm).config)}:
        return ""  # no option, or one of its own (given a value it cannot take)
    owners = [other for other in built_in() if other != algorithm
              and name in {field.name for field in dataclasses.fields(get_algorithm(other).config)}]
    if not owners:
        return ""
    return f"; {name!r} is an option of {' and '.join(owners)}: choose it with --algorithm {owners[0]}"


__all__ = ["ALIASES", "PIPELINE_FIELDS", "Algorithm", "built_in", "get_algorithm", "options_of_another"]
