"""A saved policy behind a websocket: ``vlapt serve POLICY`` and `PolicyServer`.

Each client connection gets a thread; inference runs one request at a time under a lock
(the policy's sampling generator and torch module are shared), so a client's chunks follow
the same seeded stream as ``load_policy(path, seed=...).predict`` called in that order. A
request is checked before and by the policy exactly as ``predict``/``predict_batch`` check it;
whatever goes wrong with one request (garbage bytes, wrong keys, shapes or dtypes, an error
inside the policy) is answered with an error message and the connection stays open; a message
over ``max_message_bytes`` closes that connection (code 1009); a client that disappears
mid-request only ends its own thread. Nothing a client sends stops the server.

The server speaks plain, unauthenticated websocket: anyone who can reach the port can run the
policy (and spend its compute). It binds to loopback unless told otherwise (docs/serving.md).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import threading
from http import HTTPStatus
from typing import Any

import numpy as np

from vlapt.serving.protocol import DEFAULT_MAX_MESSAGE_BYTES, METHODS, PROTOCOL, ProtocolError, pack, unpack

log = logging.getLogger("vlapt.serving")


@dataclasses.dataclass
class ServeConfig:
    policy: str = ""  # checkpoint directory to serve
    host: str = "127.0.0.1"  # loopback: only this machine can connect; see docs/serving.md before changing it
    port: int = 8000  # 0: any free port
    device: str = "cpu"
    seed: int = 0  # the policy's sampling seed (deterministic requests do not use it)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # a larger request closes its connection
    max_connections: int = 64  # further clients are turned away (HTTP 503) until one leaves
    max_batch: int = 256  # observations per predict_batch request
    threads: int = 0  # torch threads for inference (0: torch's default)

    def validate(self) -> "ServeConfig":
        if not self.policy:
            raise ValueError("no policy to serve: give a checkpoint directory (vlapt serve PATH)")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535] (0: any free port), got {self.port}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        for name in ("max_connections", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: torch's default), got {self.threads}")
        return self


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PolicyServer:
    """Serve ``policy`` (anything with ``predict``, ``predict_batch``, ``chunk_len``, ``action_dim``,
    ``observation_config()``) on ``host:port``; the socket is bound on construction (``port=0``: a free one).

    Run it with `serve_forever` (stopped by `shutdown` from another thread, or Ctrl-C), or as a
    context manager that serves from a background thread.
    """

    def __init__(self, policy: Any, host: str = "127.0.0.1", port: int = 8000,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_connections: int = 64, max_batch: int = 256,
                 name: str = ""):
        from websockets.sync.server import serve

        self.policy = policy
        self.host = host
        self.max_connections, self.max_batch = max_connections, max_batch
        config = policy.observation_config()
        self.metadata = {
            "protocol": PROTOCOL,
            "name": name,
            "policy_type": getattr(policy, "policy_type", ""),
            "chunk_len": int(policy.chunk_len),
            "action_dim": int(policy.action_dim),
            "observation_config": dataclasses.asdict(config),
            "max_message_bytes": int(max_message_bytes),
            "max_batch": int(max_batch),
        }
        self._inference = threading.Lock()
        self._count = threading.Lock()
        self._active = 0
        self._thread: threading.Thread | None = None
        transport_log = logging.getLogger("vlapt.serving.websockets")  # connection-level chatter: warnings only
        if transport_log.level == logging.NOTSET:
            transport_log.setLevel(logging.WARNING)
        self._server = serve(self._handle, host, port, max_size=max_message_bytes, compression=None,
                             process_request=self._admit, logger=transport_log)
        self._port = int(self._server.socket.getsockname()[1])
        if not is_loopback(host):
            log.warning("serving on %s: anyone who can reach this address can run the policy; the connection is "
                        "neither authenticated nor encrypted (docs/serving.md)", host)

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    @property
    def active_connections(self) -> int:
        return self._active

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def shutdown(self) -> None:
        """Stop accepting, close every connection (code 1001) once its request in flight is answered, and return."""
        self._server.shutdown()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> "PolicyServer":
        self._thread = threading.Thread(target=self.serve_forever, name="vlapt-policy-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- connections -------------------------------------------------------------------------------
    def _admit(self, connection, request):
        """Turn a client away before its handshake when the server is full (the limit itself is kept in `_handle`)."""
        if self._active >= self.max_connections:
            log.warning("turned away a client: %d connections already open (max_connections)", self._active)
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE,
                                      f"the policy server already has {self._active} clients; try again later\n")
        return None

    def _handle(self, connection) -> None:
        from websockets.exceptions import ConnectionClosed

        with self._count:  # a burst of handshakes can pass `_admit` together: the count decides here
            full = self._active >= self.max_connections
            if not full:
                self._active += 1
        if full:
            log.warning("closed a client's connection: %d connections already open (max_connections)", self._active)
            connection.close(code=1013, reason="the policy server is full; try again later")
            return
        peer = _peer(connection)
        log.info("client %s connected (%d open)", peer, self._active)
        try:
            connection.send(pack(self.metadata))
            while True:
                message = connection.recv()
                connection.send(self.reply(message))
        except ConnectionClosed as exc:
            if exc.rcvd is None or exc.rcvd.code not in (1000, 1001):
                log.info("client %s: connection closed (%s)", peer, exc)
        except Exception:  # never let one connection take the server down
            log.exception("client %s: unexpected error; connection dropped", peer)
        finally:
            with self._count:
                self._active -= 1
            log.info("client %s left (%d open)", peer, self._active)

    def reply(self, message: bytes | str) -> bytes:
        """The encoded answer to one request message: actions, or an error naming what was wrong."""
        try:
            method, observation, deterministic = self._request(unpack(message))
            with self._inference:
                if method == "predict":
                    actions = self.policy.predict(observation, deterministic=deterministic)
                else:
                    actions = self.policy.predict_batch(observation, deterministic=deterministic)
            return pack({"actions": np.asarray(actions)})
        except (ValueError, TypeError, KeyError) as exc:
            return _error(exc)
        except Exception as exc:
            log.exception("inference failed")
            return _error(exc, "InternalError")

    def _request(self, request: Any) -> tuple[str, Any, bool]:
        if not isinstance(request, dict):
            raise ProtocolError(f"a request is a map with 'method', 'observation' and 'deterministic', "
                                f"got {type(request).__name__}")
        method = request.get("method", "predict")
        if method not in METHODS:
            raise ProtocolError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
        if "observation" not in request:
            raise ProtocolError("the request has no 'observation'")
        deterministic = request.get("deterministic", True)
        if not isinstance(deterministic, bool):
            raise ProtocolError(f"'deterministic' must be true or false, got {deterministic!r}")
        observation = request["observation"]
        if method == "predict_batch" and isinstance(observation, dict):
            image = observation.get("image")  # an array, or nested lists from a client without numpy
            size = len(image) if isinstance(image, list) or (isinstance(image, np.ndarray) and image.ndim >= 1) else 0
            if size > self.max_batch:
                raise ProtocolError(f"batch of {size} observations exceeds the server's max_batch {self.max_batch}; "
                                    "split it")
        return method, observation, deterministic


def _error(exc: BaseException, kind: str | None = None) -> bytes:
    kind = kind or type(exc).__name__
    return pack({"error": {"type": kind, "message": str(exc)}})


def _peer(connection) -> str:
    try:
        host, port = connection.remote_address[:2]
        return f"{host}:{port}"
    except Exception:
        return "?"


def serve_policy(config: ServeConfig, ready=None) -> None:
    """Load ``config.policy`` and serve it until Ctrl-C or SIGTERM (raised as KeyboardInterrupt)."""
    import torch

    from vlapt.policies import load_policy

    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    policy = load_policy(config.policy, device=config.device, seed=config.seed)
    server = PolicyServer(policy, config.host, config.port, config.max_message_bytes, config.max_connections,
                          config.max_batch, name=str(config.policy))
    try:
        if ready is not None:
            ready(server)
        server.serve_forever()
    finally:
        server.shutdown()
