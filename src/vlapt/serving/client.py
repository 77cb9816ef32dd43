"""The client of `vlapt serve`: `PolicyClient` (``predict`` as ``load_policy(path).predict``) and an `Agent`.

``PolicyClient(url).predict(observation)`` returns what ``load_policy(path).predict(observation)``
returns in-process: a float32 ``(chunk_len, action_dim)`` chunk clipped to [-1, 1]; a bad
observation raises the same ValueError (with the server's message). ``predict_batch`` likewise.
`RemotePolicyAgent` runs a served policy wherever an `Agent` is taken (``vlapt eval --server``).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from vlapt.interfaces import EnvConfig, Observation, stack_observations
from vlapt.serving.protocol import DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL, ProtocolError, pack, unpack

_ERRORS = {"ValueError": ValueError, "ProtocolError": ValueError, "TypeError": TypeError, "KeyError": KeyError}


class PolicyClient:
    """A connection to a policy server (``ws://host:port``); one request at a time (thread-safe)."""

    def __init__(self, url: str, timeout: float = 60.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        from websockets.exceptions import InvalidHandshake, InvalidURI
        from websockets.sync.client import connect

        self.url, self.timeout = url, timeout
        self._lock = threading.Lock()
        try:
            self._connection = connect(url, open_timeout=timeout, max_size=max_message_bytes, compression=None,
                                       legacy=True)  # the connection itself, closed by close()
        except InvalidURI as exc:
            raise ValueError(f"{url!r} is not a websocket URL ({exc}); use ws://HOST:PORT") from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise ConnectionError(f"cannot connect to a policy server at {url}: {exc}; is `vlapt serve` running "
                                  "there?") from None
        self._broken = ""  # why the connection can no longer be used, once it cannot
        try:
            self._read_metadata()
        except BaseException:  # no connection left open behind a failed constructor
            self.close()
            raise

    def _read_metadata(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            metadata = unpack(self._receive())
        except (ProtocolError, ConnectionClosed) as exc:
            raise ConnectionError(f"{self.url} is not a vlapt policy server, or refused the connection: {exc}") from None
        if not isinstance(metadata, dict) or metadata.get("protocol") != PROTOCOL:
            raise ConnectionError(f"{self.url} does not speak {PROTOCOL} (it sent {str(metadata)[:120]!r})")
        try:
            self.chunk_len = int(metadata["chunk_len"])
            self.action_dim = int(metadata["action_dim"])
            self.max_batch = int(metadata.get("max_batch", 256))
            self.max_message_bytes = int(metadata.get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConnectionError(f"{self.url} sent incomplete metadata ({type(exc).__name__}: {exc})") from None
        self.metadata: dict = metadata
        self.policy_type = str(metadata.get("policy_type", ""))

    def observation_config(self) -> EnvConfig:
        """The env settings the served policy observes with (camera, image size, ...)."""
        known = {f.name for f in dataclasses.fields(EnvConfig)}
        return EnvConfig(**{k: v for k, v in self.metadata["observation_config"].items() if k in known})

    def predict(self, observation: Observation, deterministic: bool = True) -> np.ndarray:
        """Action chunk ``(chunk_len, action_dim)`` (float32, clipped to [-1, 1]) for one observation."""
        if not isinstance(observation, Mapping):
            raise ValueError(f"predict takes one observation as a dict, got {type(observation).__name__}")
        actions = self._call("predict", observation, deterministic)
        return self._checked(actions, (self.chunk_len, self.action_dim))

    def predict_batch(self, observations: Observation, deterministic: bool = True) -> np.ndarray:
        """Action chunks ``(B, chunk_len, action_dim)`` (float32, clipped to [-1, 1]) for a batch."""
        if not isinstance(observations, Mapping):
            raise ValueError(f"observations must be a dict with 'image', 'proprio' and 'instruction', "
                             f"got {type(observations).__name__}")
        size = len(observations["image"]) if np.ndim(observations.get("image")) == 4 else 0
        rows = self._rows_per_request(observations, size)
        if size > rows:  # the server takes at most max_batch rows, and max_message_bytes, at a time
            parts = [self.predict_batch(_rows(observations, size, slice(s, s + rows)), deterministic)
                     for s in range(0, size, rows)]
            return np.concatenate(parts)
        actions = self._call("predict_batch", observations, deterministic)
        return self._checked(actions, (size, self.chunk_len, self.action_dim) if size else None)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------
    def _rows_per_request(self, observations: Mapping, size: int) -> int:
        """How many rows of a batch one request carries: at most max_batch, and few enough to fit the server's
        message limit (large or several-view images)."""
        if size == 0:
            return self.max_batch
        row_bytes = _ROW_OVERHEAD_BYTES + sum(
            len(v[0].encode()) if isinstance(v[0], str) else np.asarray(v[0]).nbytes
            for v in observations.values() if _per_row(v, size))
        return max(1, min(self.max_batch, (self.max_message_bytes - _REQUEST_OVERHEAD_BYTES) // row_bytes))

    def _call(self, method: str, observation: Mapping, deterministic: bool) -> Any:
        from websockets.exceptions import ConnectionClosed

        request = pack({"method": method, "observation": _sendable(observation), "deterministic": bool(deterministic)})
        with self._lock:
            if self._broken:
                raise ConnectionError(f"this connection to {self.url} is closed: {self._broken}; make a new PolicyClient")
            try:
                self._connection.send(request)
                reply = unpack(self._receive())
            except ConnectionClosed as exc:
                too_big = exc.rcvd is not None and exc.rcvd.code == 1009
                hint = (f" (the request, {len(request)} bytes, exceeds the server's limit of "
                        f"{self.metadata.get('max_message_bytes')} bytes)") if too_big else ""
                raise ConnectionError(f"the policy server at {self.url} closed the connection{hint}: {exc}") from None
        if not isinstance(reply, dict):
            raise ConnectionError(f"the policy server at {self.url} sent a malformed reply")
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {"message": str(reply["error"])}
            kind = _ERRORS.get(error.get("type"), RuntimeError)
            message = error.get("message", "")
            raise kind(message if kind is not RuntimeError else f"policy server error ({error.get('type')}): {message}")
        return reply.get("actions")

    def _receive(self) -> bytes:
        try:
            return self._connection.recv(timeout=self.timeout)
        except TimeoutError:
            # the late answer would arrive as the reply to the next request: never use this connection again
            self._broken = f"the server did not answer within {self.timeout} s"
            self.close()
            raise ConnectionError(f"the policy server at {self.url} did not answer within {self.timeout} s; "
                                  "the connection is closed (a larger timeout waits longer)") from None

    @staticmethod
    def _checked(actions: Any, shape: tuple | None) -> np.ndarray:
        if not isinstance(actions, np.ndarray) or actions.dtype != np.float32 or (shape and actions.shape != shape):
            got = f"{actions.dtype} {actions.shape}" if isinstance(actions, np.ndarray) else type(actions).__name__
            raise ConnectionError(f"the policy server answered {got}, expected float32 actions of shape {shape}")
        return actions


_ROW_OVERHEAD_BYTES = 512  # a row's instruction and framing
_REQUEST_OVERHEAD_BYTES = 1024  # a request's method name, keys and array headers


def _sendable(observation: Mapping) -> dict:
    """Observation values as the wire carries them: arrays, strings, lists of strings and plain scalars."""
    out = {}
    for key, value in observation.items():
        if value is None or isinstance(value, (str, bytes, bool, int, float, np.ndarray, np.generic)):
            out[str(key)] = value
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            out[str(key)] = list(value)
        else:  # nested lists of numbers, tensors, ...: as numpy would read them in-process
            try:
                array = np.asarray(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"observation {key!r} cannot be sent: {exc}") from None
            out[str(key)] = array if array.dtype.kind in "biuf" else value
    return out


def _per_row(value: Any, size: int) -> bool:
    """Whether a batch value holds one entry per row (not one instruction for all)."""
    return (isinstance(value, (list, tuple)) or np.ndim(value) > 0) and not isinstance(value, str) and len(value) == size


def _rows(observations: Mapping, size: int, rows: slice) -> dict:
    """Some rows of a batch; a value not per row (one instruction for all) is passed whole, as in-process."""
    return {k: (v[rows] if _per_row(v, size) else v) for k, v in observations.items()}


class RemotePolicyAgent:
    """A served policy as an `Agent`: what ``vlapt eval --server URL`` evaluates."""

    def __init__(self, url: str, deterministic: bool = True, timeout: float = 60.0):
        self.client = PolicyClient(url, timeout=timeout)
        self.deterministic = deterministic
        self.chunk_len = self.client.chunk_len
        self.name = f"server:{url}" + (f" ({self.client.metadata['name']})" if self.client.metadata.get("name") else "")

    def observation_config(self) -> EnvConfig:
        return self.client.observation_config()

    def act(self, observations: Sequence[Observation], tasks: Sequence[str]) -> list[np.ndarray]:
        return list(self.client.predict_batch(stack_observations(list(observations)), deterministic=self.deterministic))

    def close(self) -> None:
        self.client.close()
