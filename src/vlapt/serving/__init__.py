"""Serving a saved policy over the network: `vlapt serve` and its client.

``PolicyServer`` / ``serve_policy`` (websocket + msgpack, numpy arrays as openpi sends them)
and ``PolicyClient(url).predict(observation)``, whose contract is ``load_policy(path).predict``'s;
``RemotePolicyAgent`` evaluates a served policy. Needs the ``serve`` extra (websockets, msgpack).
"""

try:
    import msgpack  # noqa: F401
    import websockets  # noqa: F401
except ImportError as exc:  # pragma: no cover - the default install has no server
    raise ImportError(f"vlapt.serving needs the serve extra ({exc.name} is missing): pip install 'vlapt[serve]'") from exc

from vlapt.serving.client import PolicyClient, RemotePolicyAgent
from vlapt.serving.protocol import PROTOCOL, ProtocolError
from vlapt.serving.server import PolicyServer, ServeConfig, serve_policy

__all__ = ["PROTOCOL", "PolicyClient", "PolicyServer", "ProtocolError", "RemotePolicyAgent", "ServeConfig", "serve_policy"]
