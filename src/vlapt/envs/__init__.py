"""Env suites and the pools that run their envs.

A suite is found by name (``get_suite("mt10")``); MetaWorld's MT10 and MT50 are built in,
others register with `register_suite` (in one process), are declared by an installed package in
the ``vlapt.env_suites`` entry-point group (found by every process, e.g. when a dataset names its
suite), or are named by import path (``"my_pkg.suites:MySuite"``, a class built without arguments
or an instance).
"""

from __future__ import annotations

from typing import Callable

from vlapt.interfaces import EnvSuite, UnknownTaskError
from vlapt.plugins import NOT_DECLARED, declared_names, import_object, load_declared

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


def suite_names() -> list[str]:
    return sorted(set(_SUITES) | {name.lower() for name in declared_names(ENTRY_POINT_GROUP)})


def get_suite(name: str) -> EnvSuite:
    """The suite registered as ``name`` (case-insensitive), or one named by ``module:attribute``."""
    key = str(name).lower()
    if key in _SUITES:
        return _SUITES[key]()
    target = load_declared(ENTRY_POINT_GROUP, str(name), what="env suite", error=UnknownTaskError, casefold=True)
    if target is NOT_DECLARED and ":" in name:
        try:
            target = import_object(name)
        except ImportError as exc:
            raise UnknownTaskError(f"cannot import env suite {name!r}: {exc}") from exc
    elif target is NOT_DECLARED:
        raise UnknownTaskError(f"unknown suite {name!r}; valid suites: {', '.join(suite_names())} "
                               f"(or module:attribute of your own EnvSuite, or a name its package declares in the "
                               f"{ENTRY_POINT_GROUP!r} entry-point group)")
    suite = target() if isinstance(target, type) else target
    if not callable(getattr(suite, "make_env", None)) or not hasattr(suite, "tasks"):
        raise UnknownTaskError(f"{name!r} gives a {type(suite).__name__}, not an EnvSuite (one with tasks and make_env): "
                               "point at an EnvSuite class or instance")
    return suite


__all__ = ["get_suite", "register_suite", "suite_names"]
