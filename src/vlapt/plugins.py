"""Entry points: how an installed package extends vlapt in every process, without being imported first.

Each extension point whose name travels in files (a checkpoint's policy type, a dataset's env suite,
a policy config's vision backbone, a config's env pool backend) looks the name up among those registered in this process, then
among those installed packages declare in its entry-point group.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
from typing import Any

NOT_DECLARED = object()  # what `load_declared` returns when no installed package declares the name


def declared_names(group: str) -> set[str]:
    """The names installed packages declare in entry-point group ``group``."""
    return {point.name for point in metadata.entry_points(group=group)}


def load_declared(group: str, name: str, *, what: str, error: type[Exception] = ValueError,
                  casefold: bool = False) -> Any:
    """The object an installed package declares as ``name`` in ``group`` (names compared case-insensitively
    when ``casefold``), or `NOT_DECLARED` when no package declares it. A declaration whose import fails raises ``error``
    naming ``what`` was asked for, the group and the import error."""
    key = name.lower() if casefold else name
    for point in metadata.entry_points(group=group):
        if (point.name.lower() if casefold else point.name) != key:
            continue
        try:
            return point.load()
        except (ImportError, AttributeError) as exc:
            raise error(f"{what} {name!r} is declared by an installed package's {group} entry point, "
                        f"which cannot be loaded: {exc}") from exc
    return NOT_DECLARED


def import_object(path: str) -> Any:
    """The object ``"module:attribute"`` names (the attribute may be dotted: a class nested in another, as entry
    points allow). Any failure, an empty or relative module name included, is an ImportError saying why."""
    module, _, attribute = path.partition(":")
    try:
        target = importlib.import_module(module)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        raise ImportError(str(exc)) from exc
    return target


__all__ = ["NOT_DECLARED", "declared_names", "import_object", "load_declared"]
