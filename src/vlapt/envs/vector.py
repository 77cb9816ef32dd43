"""Many env slots (any mix of tasks) spread over worker processes.

Each call sends one batched message per worker and the workers run their slots in
parallel, so the policy sees one batch per decision across all tasks. Slots are addressed
by index, and only the slots named in a call are touched: episodes of different lengths
(chunks stop early at success) need no padding and no auto-reset surprises.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import traceback
from typing import Any

import numpy as np

from vlapt.envs.metaworld_env import EnvConfig, MetaWorldVLAEnv


@dataclasses.dataclass(frozen=True)
class SlotSpec:
    task: str
    env: EnvConfig
    chunk_len: int = 1
    config_seed: int = 0

    def build(self) -> MetaWorldVLAEnv:
        return MetaWorldVLAEnv(self.task, self.env, chunk_len=self.chunk_len, config_seed=self.config_seed)


@dataclasses.dataclass
class StepResult:
    observation: dict[str, Any]
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any]


class _Slots:
    """The env slots owned by one process, and the commands they answer."""

    def __init__(self, specs: dict[int, SlotSpec]):
        self.envs = {i: spec.build() for i, spec in specs.items()}

    def reset(self, requests: dict[int, dict]) -> dict[int, tuple[dict, dict]]:
        return {i: self.envs[i].reset(options=options) for i, options in requests.items()}

    def step(self, actions: dict[int, np.ndarray]) -> dict[int, StepResult]:
        return {i: StepResult(*self.envs[i].step(a)) for i, a in actions.items()}

    def privileged_state(self, slots: list[int]) -> dict[int, np.ndarray]:
        return {i: self.envs[i].privileged_state() for i in slots}

    def close(self) -> None:
        for env in self.envs.values():
            env.close()


def _worker(conn, specs: dict[int, SlotSpec]) -> None:
    try:
        slots = _Slots(specs)
    except BaseException:  # report construction errors instead of dying silently
        conn.send(("error", traceback.format_exc()))
        conn.close()
        return
    conn.send(("ready", None))
    while True:
        try:
            command, payload = conn.recv()
        except EOFError:
            break
        if command == "close":
            slots.close()
            conn.send(("ok", None))
            break
        try:
            conn.send(("ok", getattr(slots, command)(payload)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    conn.close()


class WorkerError(RuntimeError):
    """An env worker process failed; the message carries its traceback."""


class EnvPool:
    """Env slots in ``num_workers`` processes (0: all in this process, for tests and debugging)."""

    def __init__(self, slots: list[SlotSpec], num_workers: int = 2):
        if not slots:
            raise ValueError("EnvPool needs at least one slot")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.specs = list(slots)
        self.num_workers = min(num_workers, len(slots))
        self._local: _Slots | None = None
        self._conns: list = []
        self._procs: list = []
        self._owner: dict[int, int] = {}
        if self.num_workers == 0:
            self._local = _Slots(dict(enumerate(self.specs)))
            return
        ctx = mp.get_context("spawn")
        for w in range(self.num_workers):
            mine = {i: s for i, s in enumerate(self.specs) if i % self.num_workers == w}
            for i in mine:
                self._owner[i] = w
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, mine), daemon=True, name=f"vlapt-env-{w}")
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        for conn in self._conns:
            self._receive(conn)

    def __len__(self) -> int:
        return len(self.specs)

    def reset(self, requests: dict[int, dict]) -> dict[int, tuple[dict, dict]]:
        """Reset slots with gymnasium reset options, e.g. ``{"split": "eval", "index": 3}``;
        returns ``(observation, info)`` per slot."""
        return self._call("reset", requests)

    def step(self, actions: dict[int, np.ndarray]) -> dict[int, StepResult]:
        return self._call("step", actions)

    def privileged_state(self, slots: list[int]) -> dict[int, np.ndarray]:
        return self._call("privileged_state", {i: None for i in slots})

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
        for conn, proc in zip(self._conns, self._procs):
            try:
                conn.send(("close", None))
                conn.recv()
            except (OSError, EOFError):
                pass
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
        self._conns, self._procs = [], []

    def __enter__(self) -> "EnvPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, command: str, payload: dict[int, Any]) -> dict[int, Any]:
        unknown = [i for i in payload if not 0 <= i < len(self.specs)]
        if unknown:
            raise IndexError(f"no env slots {unknown}; the pool has {len(self.specs)}")
        if self._local is not None:
            arg = list(payload) if command == "privileged_state" else payload
            return getattr(self._local, command)(arg)
        per_worker: dict[int, dict] = {}
        for i, value in payload.items():
            per_worker.setdefault(self._owner[i], {})[i] = value
        for w, part in per_worker.items():
            self._conns[w].send((command, list(part) if command == "privileged_state" else part))
        merged: dict[int, Any] = {}
        for w in per_worker:
            merged.update(self._receive(self._conns[w]))
        return {i: merged[i] for i in payload}

    @staticmethod
    def _receive(conn):
        status, value = conn.recv()
        if status == "error":
            raise WorkerError(f"env worker failed:\n{value}")
        return value
