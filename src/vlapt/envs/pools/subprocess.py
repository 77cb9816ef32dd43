"""Env slots spread over worker processes on this machine: the default pool.

Each call sends one batched message per worker and the workers run their slots in parallel.
Calls can be submitted without waiting (`submit`): each worker answers its commands in order,
so the caller can step one group of slots while it computes the next actions of another.

A watchdog guards every answer: a worker that dies (SIGKILL, a crash in the simulator) or
stays silent past ``timeout_s`` (hung, stopped) is killed and replaced, up to ``max_restarts``
times in the pool's life. Its slots' episodes in flight are lost: each such slot answers its
pending step with ``truncated=True`` and ``info["lost"] = True`` (no reward, no steps), so a
caller can drop the partial episode instead of learning from it, and ``lost_episodes`` counts
them. Past the restart budget the pool raises `WorkerError`, naming the worker and its tasks.
A worker whose answer an interrupt (Ctrl-C) cut mid-message is replaced the same way if the
caller goes on, without counting against the budget: the worker did not fail.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import time
import traceback
from collections import deque
from typing import Any

from vlapt.envs.pools import Slots, WorkerError, WorkerPool
from vlapt.interfaces import SlotSpec

log = logging.getLogger("vlapt.envs.pool")


def _worker(conn, specs: dict[int, SlotSpec], replacement: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; workers end when it closes them
    try:
        slots = Slots(specs, replacement)
    except BaseException:  # report construction errors instead of dying silently
        conn.send(("error", traceback.format_exc()))
        conn.close()
        return
    conn.send(("ok", None))
    while True:
        try:
            command, payload = conn.recv()
        except (EOFError, OSError):
            break
        if command == "close":
            slots.close()
            conn.send(("ok", None))
            break
        try:
            conn.send(("ok", slots.run(command, payload)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    conn.close()


class _WorkerGone(Exception):
    """The worker died or did not answer in time (the message says which)."""


class SubprocessPool(WorkerPool):
    """`EnvPool` over ``num_workers`` processes (slot i lives in worker i mod num_workers)."""

    def __init__(self, slots: list[SlotSpec], num_workers: int = 2, timeout_s: float = 300.0,
                 start_timeout_s: float = 900.0, max_restarts: int = 3):
        if num_workers < 1:
            raise ValueError(f"a subprocess pool needs num_workers >= 1, got {num_workers}")
        if timeout_s <= 0 or start_timeout_s <= 0 or max_restarts < 0:
            raise ValueError("timeout_s and start_timeout_s must be > 0 and max_restarts >= 0")
        super().__init__(slots, num_workers)
        self.timeout_s, self.start_timeout_s, self.restarts_left = timeout_s, start_timeout_s, max_restarts
        self._ctx = mp.get_context("spawn")
        self._conns: list = [None] * self.num_workers
        self._procs: list = [None] * self.num_workers
        # per worker: (ticket, command, payload) sent and not yet received, in order
        self._outstanding: list[deque] = [deque() for _ in range(self.num_workers)]
        self._arrived: dict[tuple[int, int], Any] = {}  # (worker, ticket) -> its part of the answer
        self._torn: set[int] = set()  # workers whose pipe an interrupt left mid-message: nothing more can be read
        try:
            for w in range(self.num_workers):
                self._spawn(w)
            for w in range(self.num_workers):
                self._await_ready(w)
        except BaseException:
            self.close()
            raise

    # -- the EnvPool protocol (reset, submit, wait, groups: WorkerPool) ---------------------------
    def close(self) -> None:
        for w in range(self.num_workers):
            conn, proc = self._conns[w], self._procs[w]
            if conn is None:
                continue
            if w in self._torn:  # a half-read answer: the rest would be read as a message, so nothing is
                proc.kill()
            else:
                try:
                    for _ in self._outstanding[w]:  # answers nobody waited for
                        if conn.poll(min(self.timeout_s, 10.0)):
                            conn.recv()
                    conn.send(("close", None))
                    if conn.poll(10):
                        conn.recv()
                except Exception as exc:  # gone, or its pipe unreadable: the worker is killed below
                    log.debug("env worker %d did not close cleanly (%r); killing it", w, exc)
                except BaseException:  # Ctrl-C while draining: a second close kills it without reading
                    self._torn.add(w)
                    raise
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
            conn.close()
            self._conns[w] = self._procs[w] = None
        self._outstanding = [deque() for _ in range(self.num_workers)]
        self._arrived = {}
        self._torn = set()

    def worker_pid(self, worker: int) -> int:
        return self._procs[worker].pid

    # -- internals -------------------------------------------------------------------------------
    def _spawn(self, w: int, replacement: bool = False) -> None:
        mine = {i: s for i, s in enumerate(self.specs) if self._owner[i] == w}
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker, args=(child, mine, replacement), daemon=True, name=f"vlapt-env-{w}")
        proc.start()
        child.close()
        self._conns[w], self._procs[w] = parent, proc
        self._torn.discard(w)

    def _await_ready(self, w: int) -> None:
        try:
            self._recv(w, self.start_timeout_s, "start")
        except _WorkerGone as exc:
            raise WorkerError(f"env worker {w} (tasks: {self._tasks_of(w)}) failed to start: {exc}") from None

    def _send(self, w: int, number: int, command: str, part: dict) -> None:
        self._outstanding[w].append((number, command, part))
        try:
            self._conns[w].send((command, part))
        except (OSError, EOFError, ValueError):
            pass  # a dead worker: found and handled when its answer is awaited
        except Exception:  # the request did not pickle, so nothing was sent: no answer will come for it
            self._outstanding[w].pop()
            raise

    def _receive(self, w: int, number: int) -> Any:
        """Receive from worker ``w`` until ticket ``number``'s answer is in, keeping earlier answers for their waiters."""
        while (w, number) not in self._arrived:
            oldest, command, part = self._outstanding[w][0]
            try:
                answer = self._recv(w, self.timeout_s, command)
            except _WorkerGone as exc:
                self._replace(w, str(exc))
                continue  # _replace answered every outstanding ticket of this worker
            except WorkerError:
                self._outstanding[w].popleft()  # it answered, with an error: that request is done
                raise
            self._outstanding[w].popleft()
            self._arrived[(w, oldest)] = answer
        return self._arrived.pop((w, number))

    def _recv(self, w: int, timeout: float, what: str) -> Any:
        conn, proc = self._conns[w], self._procs[w]
        if w in self._torn:
            raise _WorkerGone("an interrupt left its pipe mid-message")
        deadline = time.monotonic() + timeout
        while True:
            try:
                if conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
                    try:
                        status, value = conn.recv()
                    except (EOFError, OSError):
                        raise
                    except BaseException:  # Ctrl-C mid-message: the rest of it is still in the pipe
                        self._torn.add(w)
                        raise
                    break
            except (EOFError, OSError):
                raise _WorkerGone(f"it died (exit code {proc.exitcode})") from None
            if not proc.is_alive():
                raise _WorkerGone(f"it died (exit code {proc.exitcode})")
            if time.monotonic() >= deadline:
                raise _WorkerGone(f"it did not answer a {what!r} request within {timeout:g} s (hung or stopped)")
        if status == "error":
            raise WorkerError(f"env worker {w} (tasks: {self._tasks_of(w)}) failed:\n{value}")
        return value

    def _replace(self, w: int, cause: str) -> None:
        """Kill worker ``w`` and start a new one for its slots; send it every request the old one left unanswered."""
        tasks = self._tasks_of(w)
        charged = w not in self._torn  # a pipe torn by an interrupt is this process's doing, not the worker's failure
        proc = self._procs[w]
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=10)
        self._conns[w].close()
        if charged and self.restarts_left <= 0:
            self._conns[w] = self._procs[w] = None
            raise self._give_up(f"env worker {w} (tasks: {tasks}) failed: {cause}; no restarts left (raise the pool's "
                                "max_restarts, or look for what kills or stalls the simulator)")
        self.restarts_left -= charged
        pending = list(self._outstanding[w])
        self._outstanding[w].clear()
        in_flight = sorted({i for _, command, part in pending if command == "step" for i in part})
        log.warning("env worker %d (tasks: %s) %s; restarting it (%d restarts left); the episodes of its slots are "
                    "lost (%d with a step in flight)", w, tasks, cause, self.restarts_left, len(in_flight))
        try:
            self._spawn(w, replacement=True)
            try:
                self._await_ready(w)
            except WorkerError as exc:
                raise self._give_up(str(exc)) from None
            for number, command, part in pending:  # in submission order: resets run again, steps answer lost
                if command == "step":
                    self._send(w, number, "lose", {i: options for i, (_, options) in part.items()})
                else:
                    self._send(w, number, command, part)
        except WorkerError:
            raise
        except BaseException:  # Ctrl-C mid-replacement: the next wait replaces it again, re-sending every request
            self._outstanding[w] = deque(pending)
            self._torn.add(w)
            raise
