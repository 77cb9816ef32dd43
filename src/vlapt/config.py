"""Typed configs: dataclasses, loadable from YAML, overridable with ``key.sub=value``.

Every command builds its config the same way (defaults < YAML file < command-line
overrides), validates types through OmegaConf's structured configs, and writes the
resolved result next to its outputs so a run can be repeated exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")
log = logging.getLogger("vlapt.config")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says how to fix it.

    ``key``: the option at fault (dotted, e.g. ``sft.lr``) where one is known.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def load_config(
    cls: type[T], path: str | os.PathLike | Sequence[str | os.PathLike] | None = None, overrides: Sequence[str] = ()
) -> T:
    """Defaults of ``cls``, then each YAML file in ``path`` (later files win), then ``key=value`` overrides."""
    base = OmegaConf.structured(cls)
    layers = [base]
    retired = retired_options(cls()) if dataclasses.is_dataclass(cls) else {}
    paths = [] if path is None else [path] if isinstance(path, (str, os.PathLike)) else list(path)
    for item in paths:
        item = Path(item)
        if not item.is_file():
            raise ConfigError(f"config file not found: {item} (pass an existing YAML file, e.g. one from configs/)")
        try:
            data = yaml.safe_load(item.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {item} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {item} must hold a mapping of option names to values")
        layers.append(_create(_drop_retired(data, retired, item), item))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. sft.lr=3e-4)")
    if overrides:
        try:
            given = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
        except (yaml.YAMLError, OmegaConfBaseException) as exc:
            raise ConfigError(f"cannot read the overrides {' '.join(overrides)!r}: {str(exc).splitlines()[0]}; a value "
                              "is read as YAML: put one with brackets, ' #', ': ' or a leading '*', '@' or '&' in "
                              "quotes (e.g. 'output_dir=\"runs/a #1\"')") from None
        layers.append(_create(_drop_retired(given, retired, "the command line"), "command line"))
    try:
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(_explain(exc, cls), key=getattr(exc, "full_key", None) or None) from exc


def peek_option(key: str, path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                overrides: Sequence[str] = ()) -> Any:
    """The value of top-level option ``key`` after layering, read before the config class is known (None if unset)."""
    value = None
    paths = [] if path is None else [path] if isinstance(path, (str, os.PathLike)) else list(path)
    for item in paths:
        try:
            data = yaml.safe_load(Path(item).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue  # load_config reports unreadable files with a clear message
        if isinstance(data, dict) and key in data:
            value = data[key]
    for item in overrides:
        name, _, text = item.partition("=")
        if name.strip() == key:
            try:  # as the config loader reads it: a YAML value
                parsed = yaml.safe_load(text)
            except yaml.YAMLError:  # load_config reports it with a clear message
                parsed = None
            value = parsed if isinstance(parsed, str) else text.strip()
    return value


def retired_options(config: Any) -> dict:
    """The options removed from ``config``'s class and its nested configs, each with the value whose behaviour
    remains: a class lists its own in ``RETIRED`` (a class attribute), e.g. ``{"ratio": "chunk"}``; a nested
    config's appear under its field's name."""
    out = dict(getattr(type(config), "RETIRED", {}))
    if dataclasses.is_dataclass(config):
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                nested = retired_options(value)
                if nested:
                    out[field.name] = nested
    return out


def _drop_retired(data: dict, retired: dict, source: Any, prefix: str = "") -> dict:
    """``data`` without the removed options ``retired`` names (`retired_options`): one set to the value whose
    behaviour remains is dropped with a warning (a run's recorded config.yaml still loads), one set to another
    value is refused."""
    out = {}
    for key, value in data.items():
        name, kept = f"{prefix}{key}", retired.get(key)
        if key in retired and not isinstance(kept, dict):
            if value != kept:
                raise ConfigError(f"option '{name}' was removed: only its {kept!r} behaviour remains, got "
                                  f"{value!r}; delete '{name}' from {source}", key=name)
            log.warning("%s sets '%s: %s', an option since removed whose behaviour is now the only one: ignored",
                        source, name, value)
            continue
        if isinstance(value, dict) and isinstance(kept, dict):
            value = _drop_retired(value, kept, source, f"{name}.")
        out[key] = value
    return out


def _create(data: Any, source: Any):
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot read config from {source}: {exc}") from exc


def _explain(exc: OmegaConfBaseException, cls: type) -> str:
    msg = str(exc).strip().splitlines()[0]
    key = getattr(exc, "full_key", None)
    names = ", ".join(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    where = f" (option '{key}')" if key else ""
    return f"bad config{where}: {msg}. Top-level options of {cls.__name__}: {names}"


def check_at_least(config: Any, minimum: float, *names: str) -> None:
    """Raise a ValueError naming the first option of ``names`` whose value on ``config`` is below ``minimum``."""
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_positive(config: Any, *names: str) -> None:
    """Raise a ValueError naming the first option of ``names`` whose value on ``config`` is not above 0."""
    for name in names:
        value = getattr(config, name)
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    atomic_write_text(Path(path), text)


def check_output_file(path: str | os.PathLike, example_name: str) -> Path:
    """Fail before any work starts if a result file cannot be written at ``path``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output path {path} is a directory; give a file path such as {path / example_name}")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the output directory {parent}: {exc.strerror}; choose a writable output path") from exc
    if not os.access(parent, os.W_OK):
        raise ValueError(f"output directory {parent} is not writable; choose a writable output path")
    return path


@contextlib.contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (``.name.tmp<pid>``) to write; when the block ends it is renamed over
    ``path``, so readers never see half a file; if the block fails it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield staging
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file, flush it to disk, then rename it over ``path``."""
    with staged_file(path) as tmp, open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(Path(path), json.dumps(data, indent=2, sort_keys=False) + "\n")
