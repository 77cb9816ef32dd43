"""Env slots in Ray actors spread over a cluster's nodes: ``env_backend=ray`` (``pip install 'vlapt[ray]'``).

The pool behaves as the subprocess pool does, with actors in place of worker processes: slot i
lives in actor i mod num_workers, each actor answers its slots' commands in the order they were
submitted (`vlapt.envs.pools.Slots`, the code every backend runs), ``submit``
returns at once and ``wait`` collects, so for the same seed and config an algorithm collects
the same batch on either backend. The actors ask for ``actor_cpus`` CPUs each and are spread
over the cluster's nodes (Ray's ``SPREAD`` scheduling).

Which cluster: ``ray_address`` (``"auto"``: the cluster ``ray start`` runs on this machine, or
``HOST:PORT``); else ``RAY_ADDRESS``, which Ray itself honours; else a new local Ray started in
this process (never a running cluster joined by accident). A process already connected to Ray
(``ray.init`` was called) keeps that connection. Every option can also be set by an environment
variable, so a run selects its cluster without a change to its config or algorithm:
``VLAPT_RAY_ADDRESS``, ``VLAPT_RAY_ACTOR_CPUS``, ``VLAPT_RAY_TIMEOUT_S``,
``VLAPT_RAY_START_TIMEOUT_S``, ``VLAPT_RAY_MAX_RESTARTS`` (an argument given to the pool wins
over its variable). docs/distributed.md has the cluster set-up.

Faults: an actor that dies (killed, its process crashed, its node lost) or stays silent past
``timeout_s`` is replaced by a new one, placed wherever the cluster has room, up to
``max_restarts`` times in the pool's life. Its slots' episodes are lost: every step that was in
flight on it answers ``truncated=True`` and ``info["lost"] = True`` (no reward, no steps), with
the next episode's first observation when reset options came with the step; a slot of it with
no step in flight answers its next step the same way. ``lost_episodes`` counts these answers
and a warning names the actor, its node and its tasks. Past the restart budget, or when no
node can take the replacement within ``start_timeout_s``, the pool raises `WorkerError`.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections import Counter
from typing import Any, Callable

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

from vlapt.envs.pools import Slots, WorkerError, WorkerPool
from vlapt.interfaces import SlotSpec, StepResult

log = logging.getLogger("vlapt.envs.pool")

ENV_PREFIX = "VLAPT_RAY_"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the remote traceback


class _EnvActor(Slots):
    """The slots of one actor (`vlapt.envs.pools.Slots`), and where it runs."""

    def where(self) -> dict:
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "ip": ray.util.get_node_ip_address(), "host": socket.gethostname()}


_RemoteEnvActor = ray.remote(_EnvActor)


def _option(name: str, given: Any, default: Any, cast: Callable[[str], Any]) -> Any:
    """An option given to the pool, else its ``VLAPT_RAY_*`` environment variable, else the default."""
    if given is not None:
        return given
    variable = ENV_PREFIX + name.upper()
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        return cast(raw)
    except ValueError:
        raise ValueError(f"{variable}={raw!r} is not a valid {name} ({cast.__name__}); fix or unset it") from None


def _writable(value: Any) -> Any:
    """``value`` with Ray's read-only zero-copy arrays copied, as a local pool would hand them back."""
    if isinstance(value, np.ndarray):
        return value if value.flags.writeable else value.copy()
    if isinstance(value, dict):
        return {k: _writable(v) for k, v in value.items()}
    if isinstance(value, StepResult):
        return StepResult(*map(_writable, value))
    if isinstance(value, (tuple, list)):
        return type(value)(_writable(v) for v in value)
    return value


def _brief(exc: BaseException) -> str:
    """The telling line of a Ray error (its last), shortened for a log line."""
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect this process to Ray: ``address``, else ``RAY_ADDRESS``, else a new local Ray started here.

    ``"auto"`` is the cluster that ``ray start`` runs on this machine; without any address the pool
    never joins such a cluster by accident: it starts its own, with ``num_cpus`` logical CPUs (default:
    the machine's) and its workers at normal priority, as local env workers run (Ray's default
    lowers its workers' priority to nice 15, which starves them next to any other busy process).
    """
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    local = {"num_cpus": num_cpus, "_system_config": {"worker_niceness": 0}} if target == "local" else {}
    try:
        ray.init(address=target, include_dashboard=False, **local)
    except ConnectionError as exc:
        raise ValueError(
            f"cannot connect to the Ray cluster at {target!r}: {exc}. Start it first (`ray start --head` on the head "
            "node), or fix VLAPT_RAY_ADDRESS / RAY_ADDRESS, or unset both for a local Ray; a cluster with token "
            "authentication (`ray start --head` turns it on) also needs RAY_AUTH_MODE=token and its token "
            "(RAY_AUTH_TOKEN, or ~/.ray/auth_token)") from None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    log.info("Ray %s: %d node(s), %g CPUs", "started locally" if target == "local" else f"cluster at {target}",
             len(nodes), ray.cluster_resources().get("CPU", 0))


class RayPool(WorkerPool):
    """`EnvPool` over ``num_workers`` Ray actors (slot i lives in actor i mod num_workers)."""

    def __init__(self, slots: list[SlotSpec], num_workers: int = 2, ray_address: str | None = None,
                 actor_cpus: float | None = None, timeout_s: float | None = None,
                 start_timeout_s: float | None = None, max_restarts: int | None = None):
        if num_workers < 1:
            raise ValueError(f"a Ray pool needs num_workers >= 1 (env actors), got {num_workers}")
        self.actor_cpus = _option("actor_cpus", actor_cpus, 1.0, float)
        self.timeout_s = _option("timeout_s", timeout_s, 300.0, float)
        self.start_timeout_s = _option("start_timeout_s", start_timeout_s, 600.0, float)
        self.restarts_left = _option("max_restarts", max_restarts, 3, int)
        if self.actor_cpus <= 0 or self.timeout_s <= 0 or self.start_timeout_s <= 0 or self.restarts_left < 0:
            raise ValueError("actor_cpus, timeout_s and start_timeout_s must be > 0 and max_restarts >= 0 "
                             "(VLAPT_RAY_ACTOR_CPUS, ..._TIMEOUT_S, ..._START_TIMEOUT_S, ..._MAX_RESTARTS)")
        super().__init__(slots, num_workers)
        self._actors: list = [None] * self.num_workers
        self._where: list[dict] = [{} for _ in range(self.num_workers)]
        # per actor: ticket -> (command, payload part, its ObjectRef), in submission order, until received
        self._outstanding: list[dict[int, tuple[str, dict, Any]]] = [{} for _ in range(self.num_workers)]
        connect(_option("address", ray_address, None, str))
        cpus = ray.cluster_resources().get("CPU", 0.0)
        need = self.num_workers * self.actor_cpus
        deadline = time.monotonic() + 15.0  # actors just killed give their CPUs back with a delay
        while (free := ray.available_resources().get("CPU", 0.0)) < need <= cpus and time.monotonic() < deadline:
            time.sleep(0.5)
        if need > cpus:
            raise ValueError(
                f"{self.num_workers} env actors of {self.actor_cpus:g} CPU each need {need:g} "
                f"CPUs, but the Ray cluster has {cpus:g}: lower num_workers or VLAPT_RAY_ACTOR_CPUS, or add nodes")
        if need > free:  # e.g. a periodic evaluation's pool beside the training pool: refused now, not after a timeout
            raise ValueError(
                f"{self.num_workers} env actors of {self.actor_cpus:g} CPU each need {need:g} CPUs, but only {free:g} of "
                f"the Ray cluster's {cpus:g} are free (other actors, e.g. a training run's, hold the rest): lower "
                "num_workers, or leave CPUs for the periodic evaluations (docs/distributed.md), or set eval_every=0")
        try:
            for w in range(self.num_workers):
                self._start(w, replacement=False)
            self._await_ready(range(self.num_workers))
        except BaseException:
            self.close()
            raise
        placement = Counter(self._where[w]["ip"] + " " + self._where[w]["node_id"][:8] for w in range(self.num_workers))
        log.info("%d env actors on %d Ray node(s): %s", self.num_workers, len(placement), dict(placement))

    # -- the EnvPool protocol (reset, submit, wait, groups: WorkerPool) ---------------------------
    def close(self) -> None:
        running = [actor for w, actor in enumerate(self._actors) if actor is not None and self._where[w]]
        if running:  # their envs close after the commands still queued on them; then every actor goes
            ray.wait([actor.close.remote() for actor in running], num_returns=len(running), timeout=10)
        for actor in self._actors:
            if actor is not None:
                ray.kill(actor)
        self._actors = [None] * self.num_workers
        self._outstanding = [{} for _ in range(self.num_workers)]

    # -- where the actors are (logs, tests, fault drills) ----------------------------------------
    def actor(self, worker: int):
        """The Ray actor handle of ``worker``."""
        return self._actors[worker]

    def actor_pid(self, worker: int) -> int:
        return self._where[worker]["pid"]

    def actor_node(self, worker: int) -> str:
        """The Ray node id ``worker`` runs on."""
        return self._where[worker]["node_id"]

    # -- internals -------------------------------------------------------------------------------
    def _describe(self, worker: int) -> str:
        where = self._where[worker]
        node = f", node {where['ip']} {where['node_id'][:8]}" if where else ""
        return f"env actor {worker} (tasks: {self._tasks_of(worker)}{node})"

    def _start(self, w: int, replacement: bool) -> None:
        mine = {i: s for i, s in enumerate(self.specs) if self._owner[i] == w}
        self._actors[w] = _RemoteEnvActor.options(
            num_cpus=self.actor_cpus, scheduling_strategy="SPREAD", max_restarts=0, max_task_retries=0,
        ).remote(mine, replacement)

    def _await_ready(self, workers, replacement: bool = False) -> None:
        """Wait until ``workers``' actors run; one whose node died before it started is placed again."""
        deadline = time.monotonic() + self.start_timeout_s
        pending = {self._actors[w].where.remote(): w for w in workers}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                w = min(pending.values())
                resources = ray.cluster_resources().get("CPU", 0.0)
                free = ray.available_resources().get("CPU", 0.0)
                raise WorkerError(
                    f"{self._describe(w)} was not placed within {self.start_timeout_s:g} s: the Ray cluster has "
                    f"{resources:g} CPUs, {free:g} free, and each env actor asks for {self.actor_cpus:g}. Add nodes "
                    "or lower num_workers (a run resumes from its last checkpoint), or raise VLAPT_RAY_START_TIMEOUT_S")
            w = pending.pop(ready[0])
            try:
                self._where[w] = ray.get(ready[0])
            except RayActorError as exc:
                if getattr(exc, "actor_init_failed", True):  # its envs could not be built: no use trying again
                    raise WorkerError(f"{self._describe(w)} failed to start: {_ANSI.sub('', str(exc))}") from None
                log.warning("%s was lost before it started (%s); placing it again", self._describe(w), _brief(exc))
                ray.kill(self._actors[w])
                self._start(w, replacement)
                pending[self._actors[w].where.remote()] = w

    def _send(self, w: int, number: int, command: str, part: dict) -> None:
        self._outstanding[w][number] = (command, part, self._actors[w].run.remote(command, part))

    def _receive(self, w: int, number: int) -> dict:
        """Actor ``w``'s part of ticket ``number``, replacing the actor if it died or hung meanwhile."""
        while True:
            command, _, ref = self._outstanding[w][number]
            try:
                answer = ray.get(ref, timeout=self.timeout_s)
            except RayTaskError as exc:  # the env raised; the actor goes on answering
                del self._outstanding[w][number]
                raise WorkerError(f"{self._describe(w)} failed:\n{_ANSI.sub('', str(exc))}") from None
            except GetTimeoutError:
                self._replace(w, f"did not answer a {command!r} request within {self.timeout_s:g} s (hung or stopped)")
                continue
            except (RayActorError, ObjectLostError) as exc:
                self._replace(w, f"died ({type(exc).__name__}: {_brief(exc)})")
                continue
            del self._outstanding[w][number]
            return _writable(answer)

    def _replace(self, w: int, cause: str) -> None:
        """Start a new actor for ``w``'s slots and send it every request the old one left unanswered."""
        who = self._describe(w)
        ray.kill(self._actors[w])
        if self.restarts_left <= 0:
            self._actors[w] = None
            raise self._give_up(f"{who} {cause}; no restarts left (raise the pool's max_restarts or "
                              "VLAPT_RAY_MAX_RESTARTS, or look for what kills or stalls the simulator or the node)")
        self.restarts_left -= 1
        pending = list(self._outstanding[w].items())
        in_flight = sorted({i for _, (command, part, _) in pending if command == "step" for i in part})
        log.warning("%s %s; starting a new one (%d restarts left); the episodes of its slots are lost "
                    "(%d with a step in flight)", who, cause, self.restarts_left, len(in_flight))
        self._where[w] = {}
        self._start(w, replacement=True)
        try:
            self._await_ready([w], replacement=True)
        except WorkerError as exc:
            raise self._give_up(f"{who} {cause}; its replacement: {exc}") from None
        log.warning("env actor %d replaced, now on node %s %s", w, self._where[w]["ip"], self._where[w]["node_id"][:8])
        actor = self._actors[w]
        for number, (command, part, _) in pending:  # in submission order; resets run again, steps answer lost
            if command == "step":
                ref = actor.run.remote("lose", {i: options for i, (_, options) in part.items()})
            else:
                ref = actor.run.remote(command, part)
            self._outstanding[w][number] = (command, part, ref)
