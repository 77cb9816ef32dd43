"""Training algorithms: supervised fine-tuning and post-training methods, one module each.

`vlapt train algorithm=NAME` runs ``vlapt.algorithms.NAME`` (``ppo`` is ``ppo_sbc``), or else the
importable module NAME of your own; an algorithm module defines
``ALGORITHM = Algorithm(name, ConfigClass, train)`` with
``train(config, progress=True, evaluator=None) -> Path`` (the final policy's directory).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple


class Algorithm(NamedTuple):
    name: str
    config: type  # a dataclass with validate(), an ``algorithm`` field and ``output_dir``
    train: Callable[..., Any]


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


__all__ = ["ALIASES", "Algorithm", "built_in", "get_algorithm"]
