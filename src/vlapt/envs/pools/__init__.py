"""Env pools: env slots run in place, in worker processes, or (with ``vlapt[ray]``) on a Ray cluster.

``make_pool(slots, backend=...)`` builds one; a backend is a class implementing
`vlapt.interfaces.EnvPool` whose constructor takes ``(slots, num_workers, **options)``. The
built-in names resolve lazily, so an optional backend's dependency is imported only when used;
a backend of your own is declared by its package in the ``vlapt.env_pools`` entry-point group (then
named like a built-in one, in every process) or named by ``module:Class``.
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

import numpy as np

from vlapt.interfaces import EnvPool, SlotSpec, StepResult
from vlapt.plugins import NOT_DECLARED, declared_names, import_object, load_declared

BACKENDS: dict[str, str] = {
    "local": "",  # worker processes when num_workers > 0, else in this process
    "subprocess": "vlapt.envs.pools.subprocess:SubprocessPool",
    "inprocess": "vlapt.envs.pools.inprocess:InProcessPool",
    "ray": "vlapt.envs.pools.ray:RayPool",
}
ENTRY_POINT_GROUP = "vlapt.env_pools"


class WorkerError(RuntimeError):
    """An env worker (a process or a Ray actor) failed for good; the message names it, its tasks and the cause."""


# what a backend's class must have: EnvPool's methods, and a context manager's (every caller says `with make_pool(...)`)
_POOL_METHODS = ("__len__", "reset", "submit", "wait", "groups", "close", "__enter__", "__exit__")

# built-in backends that need an optional extra: backend -> (the module it imports, the extra)
OPTIONAL: dict[str, tuple[str, str]] = {"ray": ("ray", "ray")}


def backend_names() -> list[str]:
    """The built-in backends, then those installed packages declare."""
    return list(BACKENDS) + sorted(declared_names(ENTRY_POINT_GROUP) - set(BACKENDS))


def check_backend(name: str) -> str:
    """``name`` if it names a backend that can be built here; else a ValueError saying why and what to do.
    A declared or ``module:Class`` backend is imported now, so a config naming a missing one is refused
    before its run writes anything."""
    if name in OPTIONAL and importlib.util.find_spec(OPTIONAL[name][0]) is None:
        raise ValueError(f"env pool backend {name!r} cannot be imported: {OPTIONAL[name][0]} is not installed "
                         f"(pip install 'vlapt[{OPTIONAL[name][1]}]')")
    if name not in BACKENDS:
        _backend_class(name)
    return name


def _backend_class(name: str) -> type:
    """The class the backend ``name`` builds its pools with ("local" already resolved to the backend it picks);
    a built-in name wins over a declaration of the same name."""
    if name in BACKENDS:
        target = _import(name, BACKENDS[name])
    else:
        target = load_declared(ENTRY_POINT_GROUP, name, what="env pool backend")
        if target is NOT_DECLARED and ":" in name:
            target = _import(name, name)
        elif target is NOT_DECLARED:
            raise ValueError(f"unknown env pool backend {name!r}; valid backends: {', '.join(backend_names())} "
                             f"(or module:Class of your own EnvPool, or a name its package declares in the "
                             f"{ENTRY_POINT_GROUP!r} entry-point group)")
    if not callable(target) or not all(callable(getattr(target, method, None)) for method in _POOL_METHODS):
        raise ValueError(f"env pool backend {name!r} gives {target!r}, not an EnvPool class (one with "
                         f"{', '.join(_POOL_METHODS)}, built from (slots, num_workers, **options))")
    return target


def _import(name: str, path: str):
    try:
        return import_object(path)
    except ImportError as exc:
        hint = f" (pip install 'vlapt[{OPTIONAL[name][1]}]')" if name in OPTIONAL else ""
        raise ValueError(f"env pool backend {name!r} cannot be imported: {exc}{hint}") from exc


def make_pool(slots: Sequence[SlotSpec], num_workers: int = 2, backend: str = "local", **options) -> EnvPool:
    """An `EnvPool` over ``slots`` from the named backend."""
    if not slots:
        raise ValueError("an env pool needs at least one slot")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if backend == "local":
        backend = "subprocess" if num_workers > 0 else "inprocess"
    return _backend_class(backend)(list(slots), num_workers, **options)


def spread_groups(owner: Sequence[int], count: int) -> list[list[int]]:
    """Slots (``owner[i]`` is slot i's worker) split into ``count`` groups, each spread over every worker."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    groups: list[list[int]] = [[] for _ in range(count)]
    placed: dict[int, int] = {}  # worker -> its slots placed so far
    for slot, worker in enumerate(owner):
        groups[placed.get(worker, 0) % count].append(slot)
        placed[worker] = placed.get(worker, 0) + 1
    return [g for g in groups if g]


class WorkerPool:
    """What pools whose slots live in workers (processes, actors) share.

    Slot i lives in worker i mod ``num_workers``. A call is split into one message per worker
    under a ticket number, and each worker answers its messages in order. Subclasses deliver a
    worker's part (`_send`) and fetch its answer to a ticket (`_receive`); `reset`, `submit`,
    `wait` and `groups` (the `EnvPool` protocol) are built on those two.
    """

    def __init__(self, slots: Sequence[SlotSpec], num_workers: int):
        self.specs = list(slots)
        self.num_workers = min(num_workers, len(self.specs))
        self._owner = [i % self.num_workers for i in range(len(self.specs))]
        self._next_ticket = 0
        self.lost_episodes = 0  # step answers whose episode was lost with its worker
        self._failed = ""  # why the pool gave up on a worker (no restarts left): then every call says so

    def __len__(self) -> int:
        return len(self.specs)

    def reset(self, requests: dict[int, dict]) -> dict[int, tuple[dict, dict]]:
        return self.wait(self._submit("reset", requests))

    def submit(self, actions: dict, reset_options: dict[int, dict] | None = None) -> tuple:
        return self._submit("step", {i: (a, None if reset_options is None else reset_options.get(i))
                                     for i, a in actions.items()})

    def wait(self, ticket: tuple) -> dict:
        self._check_usable()
        number, workers, slots = ticket
        merged: dict = {}
        error: WorkerError | None = None
        for w in workers:
            try:
                merged.update(self._receive(w, number))
            except WorkerError as exc:  # the other workers' answers are still collected: none is left behind
                if self._failed:
                    raise
                error = error or exc
        if error is not None:
            raise error
        self.lost_episodes += sum(isinstance(r, StepResult) and bool(r.info.get("lost")) for r in merged.values())
        return {i: merged[i] for i in slots}

    def _tasks_of(self, worker: int) -> str:
        return ", ".join(sorted({self.specs[i].task for i in range(len(self.specs)) if self._owner[i] == worker}))

    def groups(self, count: int) -> list[list[int]]:
        return spread_groups(self._owner, count)

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_usable(self) -> None:
        if self._failed:
            raise WorkerError(f"{self._failed}; this env pool can run no more episodes: start a new one")

    def _give_up(self, message: str) -> WorkerError:
        """The error that ends the pool: raised now, and named by every later call."""
        self._failed = message
        return WorkerError(message)

    def _submit(self, command: str, payload: dict) -> tuple:
        self._check_usable()
        unknown = [i for i in payload if not 0 <= i < len(self.specs)]
        if unknown:
            raise IndexError(f"no env slots {unknown}; the pool has {len(self.specs)}")
        number = self._next_ticket
        self._next_ticket += 1
        per_worker: dict[int, dict] = {}
        for i, value in payload.items():
            per_worker.setdefault(self._owner[i], {})[i] = value
        for w, part in per_worker.items():
            self._send(w, number, command, part)
        return number, list(per_worker), list(payload)

    def _send(self, worker: int, number: int, command: str, part: dict) -> None:
        raise NotImplementedError

    def _receive(self, worker: int, number: int) -> dict:
        raise NotImplementedError


class Slots:
    """The env slots one worker owns and the commands they answer: the same code in every backend.

    ``reset`` ({slot: options}) and ``step`` ({slot: (chunk, reset options or None)}: a slot whose
    episode ends is reset at once with its options). A replacement worker starts with every slot's
    episode lost: its next ``step`` answers lost (``truncated``, ``info["lost"]``, no steps) until the
    slot is reset, as does ``lose`` ({slot: reset options}) for the steps a dead worker left unanswered.
    """

    def __init__(self, specs: dict[int, SlotSpec], replacement: bool = False):
        self.envs = {i: spec.build() for i, spec in specs.items()}
        self.lost = set(specs) if replacement else set()

    def run(self, command: str, payload: dict) -> dict:
        if command == "reset":
            self.lost.difference_update(payload)
            return {i: self.envs[i].reset(options=options) for i, options in payload.items()}
        if command == "lose":
            return {i: self._lost(i, options) for i, options in payload.items()}
        if command == "step":
            out = {}
            for i, (action, reset_options) in payload.items():
                if i in self.lost:
                    out[i] = self._lost(i, reset_options)
                    continue
                result = StepResult(*self.envs[i].step(action))
                if (result.terminated or result.truncated) and reset_options is not None:
                    result = result._replace(reset_observation=self.envs[i].reset(options=reset_options)[0])
                out[i] = result
            return out
        raise ValueError(f"unknown slot command {command!r}")

    def _lost(self, slot: int, reset_options: dict | None) -> StepResult:
        """The answer of a step whose episode was lost with its worker; the next episode starts when asked for."""
        info = {"rewards": np.zeros(0, np.float32), "steps": 0, "success": False, "episode_steps": 0, "lost": True}
        first = None
        if reset_options is not None:
            first = self.envs[slot].reset(options=reset_options)[0]
            self.lost.discard(slot)
        else:
            self.lost.add(slot)
        return StepResult(first if first is not None else {}, 0.0, False, True, info, first)

    def close(self) -> None:
        for env in self.envs.values():
            env.close()
        self.envs = {}


__all__ = ["BACKENDS", "ENTRY_POINT_GROUP", "Slots", "WorkerError", "WorkerPool", "backend_names", "check_backend",
           "make_pool", "spread_groups"]
