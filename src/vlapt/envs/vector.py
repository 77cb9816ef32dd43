"""Many env slots (any mix of tasks) spread over worker processes.

Each call sends one batched message per worker and the workers run their slots in
parallel, so the policy sees one batch per decision across all tasks. Slots are addressed
by index, and only the slots named in a call are touched: episodes of different lengths
(chunks stop early at success) need no padding and no auto-reset surprises.

Calls can also be submitted without waiting (`submit_step`): each worker answers its
commands in order, so the caller can step one group of slots while it computes the next
actions of another, which keeps the workers busy during policy inference.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import traceback
from collections import deque
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
        self.expert = None  # built on the first expert_plans call

    def reset(self, requests: dict[int, dict]) -> dict[int, tuple[dict, dict]]:
        return {i: self.envs[i].reset(options=options) for i, options in requests.items()}

    def step(self, actions: dict[int, np.ndarray]) -> dict[int, StepResult]:
        return {i: StepResult(*self.envs[i].step(a)) for i, a in actions.items()}

    def step_and_reset(self, requests: dict[int, tuple[np.ndarray, dict]]) -> dict[int, tuple[StepResult, dict | None]]:
        """Step each slot; a slot whose episode ended is reset at once with its given options."""
        out = {}
        for i, (action, reset_options) in requests.items():
            result = StepResult(*self.envs[i].step(action))
            reset_observation = None
            if result.terminated or result.truncated:
                reset_observation, _ = self.envs[i].reset(options=reset_options)
            out[i] = (result, reset_observation)
        return out

    def privileged_state(self, slots: list[int]) -> dict[int, np.ndarray]:
        return {i: self.envs[i].privileged_state() for i in slots}

    def expert_plans(self, requests: dict[int, int]) -> dict[int, np.ndarray]:
        if self.expert is None:
            from vlapt.envs.experts import ScriptedExpert

            self.expert = ScriptedExpert()
        out = {}
        for i, steps in requests.items():
            out[i] = self.envs[i].lookahead(self.expert.state_policy(self.envs[i].task), steps)
        return out

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


class PendingCall:
    """A submitted pool call; `wait` returns its per-slot results (each worker answers in order)."""

    def __init__(self, pool: "EnvPool", ticket: int, workers: list[int], slots: list[int],
                 result: dict[int, Any] | None = None):
        self._pool, self._ticket, self._workers, self._slots = pool, ticket, workers, slots
        self._result = None if result is None else {i: result[i] for i in slots}  # in-process pools answer at once

    def wait(self) -> dict[int, Any]:
        if self._result is None:
            merged = {}
            for w in self._workers:
                merged.update(self._pool._receive_ticket(w, self._ticket))
            self._result = {i: merged[i] for i in self._slots}
        return self._result


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
        self._next_ticket = 0
        self._outstanding: list[deque] = []  # per worker: tickets sent and not yet received, in order
        self._arrived: dict[tuple[int, int], Any] = {}  # (worker, ticket) -> its part of the result
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
            self._outstanding.append(deque())
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

    def submit_step(self, actions: dict[int, np.ndarray], reset_options: dict[int, dict]) -> PendingCall:
        """Step slots without waiting; a slot whose episode ends is reset with ``reset_options[slot]``
        and reports the new episode's first observation. ``wait()`` gives ``(StepResult, observation
        or None)`` per slot."""
        missing = [i for i in actions if i not in reset_options]
        if missing:
            raise ValueError(f"slots {missing} have no reset options")
        return self._submit("step_and_reset", {i: (a, reset_options[i]) for i, a in actions.items()})

    def privileged_state(self, slots: list[int]) -> dict[int, np.ndarray]:
        return self._call("privileged_state", {i: None for i in slots})

    def expert_plans(self, requests: dict[int, int]) -> dict[int, np.ndarray]:
        """The scripted expert's next actions from each slot's current state, up to ``requests[slot]``
        of them (fewer if it succeeds first), simulated and rewound (`MetaWorldVLAEnv.lookahead`):
        the slots' episodes go on unchanged."""
        return self._call("expert_plans", requests)

    def groups(self, count: int) -> list[list[int]]:
        """Split the slots into ``count`` groups, each spread over every worker (empty groups dropped)."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        groups: list[list[int]] = [[] for _ in range(count)]
        placed: dict[int, int] = {}  # worker -> its slots placed so far
        for i in range(len(self.specs)):
            worker = self._owner.get(i, 0)  # an in-process pool is one "worker"
            groups[placed.get(worker, 0) % count].append(i)
            placed[worker] = placed.get(worker, 0) + 1
        return [g for g in groups if g]

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
        for w, (conn, proc) in enumerate(zip(self._conns, self._procs)):
            try:
                for _ in self._outstanding[w]:  # answers nobody waited for
                    conn.recv()
                conn.send(("close", None))
                conn.recv()
            except (OSError, EOFError):
                pass
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
        self._conns, self._procs, self._outstanding, self._arrived = [], [], [], {}

    def __enter__(self) -> "EnvPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, command: str, payload: dict[int, Any]) -> dict[int, Any]:
        return self._submit(command, payload).wait()

    def _submit(self, command: str, payload: dict[int, Any]) -> PendingCall:
        unknown = [i for i in payload if not 0 <= i < len(self.specs)]
        if unknown:
            raise IndexError(f"no env slots {unknown}; the pool has {len(self.specs)}")
        ticket = self._next_ticket
        self._next_ticket += 1
        if self._local is not None:
            arg = list(payload) if command == "privileged_state" else payload
            return PendingCall(self, ticket, [], list(payload), result=getattr(self._local, command)(arg))
        per_worker: dict[int, dict] = {}
        for i, value in payload.items():
            per_worker.setdefault(self._owner[i], {})[i] = value
        for w, part in per_worker.items():
            self._conns[w].send((command, list(part) if command == "privileged_state" else part))
            self._outstanding[w].append(ticket)
        return PendingCall(self, ticket, list(per_worker), list(payload))

    def _receive_ticket(self, worker: int, ticket: int) -> Any:
        """Receive from ``worker`` until ``ticket``'s answer is in, keeping earlier answers for their waiters."""
        while (worker, ticket) not in self._arrived:
            oldest = self._outstanding[worker].popleft()
            self._arrived[(worker, oldest)] = self._receive(self._conns[worker])
        return self._arrived.pop((worker, ticket))

    @staticmethod
    def _receive(conn):
        status, value = conn.recv()
        if status == "error":
            raise WorkerError(f"env worker failed:\n{value}")
        return value
