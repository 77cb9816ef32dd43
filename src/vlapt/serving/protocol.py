"""The wire format of the policy server: msgpack messages over a websocket, numpy arrays inline.

Arrays travel as openpi's ``msgpack_numpy`` writes them (a map ``{b"__ndarray__": True,
b"data": raw bytes, b"dtype": "<f4", b"shape": [...]}``), so a client written for openpi's
format reads and writes them as they are. Decoding trusts nothing: only boolean and numeric
dtypes, shapes that match the data, bounded rank; anything else is a `ProtocolError`, never an
object built from the message (msgpack, unlike pickle, cannot run code).

Messages (all msgpack maps, binary websocket frames):

- server -> client, once on connect: the metadata (``protocol``, ``policy_type``,
  ``chunk_len``, ``action_dim``, ``observation_config``, ``max_message_bytes``, ``max_batch``);
- client -> server: ``{"method": "predict" | "predict_batch", "observation": {...},
  "deterministic": bool}``;
- server -> client: ``{"actions": array}`` or ``{"error": {"type": name, "message": text}}``.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

PROTOCOL = "vlapt-policy/1"
METHODS = ("predict", "predict_batch")
DEFAULT_MAX_MESSAGE_BYTES = 16 * 2**20
_DTYPE_KINDS = "biuf"  # bool, signed and unsigned integers, floats
_MAX_RANK = 8


class ProtocolError(ValueError):
    """A message that is not a well-formed vlapt-policy message."""


def pack(message: Any) -> bytes:
    """``message`` (maps, lists, strings, numbers, numpy arrays and scalars) as msgpack bytes."""
    try:
        return msgpack.packb(message, default=_encode, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"cannot encode the message: {exc}") from None


def unpack(data: bytes | bytearray | memoryview) -> Any:
    """The message encoded in ``data``, arrays as numpy arrays; a `ProtocolError` for anything else."""
    if isinstance(data, str):
        raise ProtocolError("expected a binary (msgpack) websocket frame, got a text frame")
    try:
        return msgpack.unpackb(data, object_hook=_decode, raw=False, use_list=True, strict_map_key=True)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack's ExtraData, FormatError, StackError, ValueError, ...
        raise ProtocolError(f"not a msgpack message ({type(exc).__name__}: {exc})") from None


def _encode(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind not in _DTYPE_KINDS:
        raise ValueError(f"arrays of dtype {obj.dtype} cannot be sent; send numbers or strings")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        shape = obj.get(b"shape")
        data = obj.get(b"data")
        if (not isinstance(shape, list) or len(shape) > _MAX_RANK
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise ProtocolError(f"array shape must be a list of at most {_MAX_RANK} non-negative ints, got {shape!r}")
        if not isinstance(data, bytes) or len(data) != math.prod(shape) * dtype.itemsize:
            size = len(data) if isinstance(data, bytes) else type(data).__name__
            raise ProtocolError(f"array data ({size} bytes) does not match shape {shape} and dtype {dtype}")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    if b"__npgeneric__" in obj:
        return _dtype(obj.get(b"dtype")).type(obj.get(b"data"))
    return obj


def _dtype(text: Any) -> np.dtype:
    try:
        dtype = np.dtype(text) if isinstance(text, str) else None
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.kind not in _DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ProtocolError(f"array dtype must be a plain bool, int, uint or float type, got {text!r}")
    return dtype
