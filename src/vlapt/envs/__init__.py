"""Env suites and the pools that run their envs.

A suite is found by name (``get_suite("mt10")``); MetaWorld's MT10 and MT50 are built in,
others register with `register_suite` (in one process), are declared by an installed package in
the ``vlapt.env_suites`` entry-point group (found by every process, e.g. when a dataset names its
suite), or are named by import path (``"my_pkg.suites:MySuite"``, a class built without arguments
or an instance).
"""

from __future__ import annotations

import importlib
from typing import Callable

from vlapt.interfaces import EnvSuite, UnknownTaskError

_SUITES: dict[str, Callable[[], EnvSuite]] = {}
ENTRY_POINT_GROUP = "vlapt.env_suites"


def register_suite(name: str, factory: Callable[[], EnvSuite]) -> None:
    """Make ``get_suite(name)`` return ``factory()`` (names are case-insensitive)."""
    key = name.lower()
    if key in _SUITES and _SUITES[key] is not factory:
        raise ValueError(f"env suite {name!r} is already registered")
    _SUITES[key] = factory


def _metaworld(name: str) -> EnvSuite:
    from vlapt.envs import metaworld

    return {"mt10": metaworld.MT10_SUITE, "mt50": metaworld.MT50_SUITE}[name]


register_suite("mt10", lambda: _metaworld("mt10"))
register_suite("mt50", lambda: _metaworld("mt50"))


def _declared():
    from importlib.metadata import entry_points

    return {point.name.lower(): point for point in entry_points(group=ENTRY_POINT_GROUP)}


def suite_names() -> list[str]:
    return sorted(set(_SUITES) | set(_declared()))


def get_suite(name: str) -> EnvSuite:
    """The suite registered as ``name`` (case-insensitive), or one named by ``module:attribute``."""
    key = str(name).lower()
    if key in _SUITES:
        return _SUITES[key]()
    declared = _declared().get(key)
    if declared is not None:
        try:
            target = declared.load()
        except (ImportError, AttributeError) as exc:
            raise UnknownTaskError(f"env suite {name!r} is declared by an installed package's {ENTRY_POINT_GROUP} "
                                   f"entry point, which cannot be loaded: {exc}") from exc
    elif ":" in name:
        module, _, attribute = name.partition(":")
        try:
            target = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as exc:
            raise UnknownTaskError(f"cannot import env suite {name!r}: {exc}") from exc
    else:
        raise UnknownTaskError(f"unknown suite {name!r}; valid suites: {', '.join(suite_names())} "
                               f"(or module:attribute of your own EnvSuite, or a name its package declares in the "
                               f"{ENTRY_POINT_GROUP!r} entry-point group)")
    suite = target() if isinstance(target, type) else target
    if not callable(getattr(suite, "make_env", None)) or not hasattr(suite, "tasks"):
        raise UnknownTaskError(f"{name!r} gives a {type(suite).__name__}, not an EnvSuite (one with tasks and make_env): "
                               "point at an EnvSuite class or instance")
    return suite


__all__ = ["get_suite", "register_suite", "suite_names"]
