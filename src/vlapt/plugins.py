"""Entry points: how an installed package extends vlapt in every process, without being imported first.

Each extension point whose name travels in files (a checkpoint's policy type, a dataset's env suite,
a policy config's vision backbone) looks the name up among those registered in this process, then
among those installed packages declare in its entry-point group.
"""

from __future__ import annotations

import importlib.metadata as metadata
from typing import Any


def declared_names(group: str) -> set[str]:
    """The names installed packages declare in entry-point group ``group``."""
    return {point.name for point in metadata.entry_points(group=group)}


def load_declared(group: str, name: str, *, what: str, error: type[Exception] = ValueError,
                  casefold: bool = False) -> Any | None:
    """The object an installed package declares as ``name`` in ``group`` (names compared case-insensitively
    when ``casefold``), or None when no package declares it. A declaration whose import fails raises ``error``
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
    return None


__all__ = ["declared_names", "load_declared"]
