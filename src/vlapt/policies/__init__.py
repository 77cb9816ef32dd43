"""Policies behind one interface (`vlapt.interfaces.ChunkPolicy`): vlapt's VLA and other families.

``load_policy(path)`` rebuilds any registered family (or one an installed package declares in the
``vlapt.policy_types`` entry-point group) from its checkpoint directory
(``config.json`` + ``model.safetensors``); ``policy.predict(observation)`` returns an action chunk.
"""

from vlapt.policies.base import (
    ENTRY_POINT_GROUP, ChunkPolicyBase, PolicyAgent, load_policy, policy_types, register_policy_type, resolve_device,
)
from vlapt.policies.checkpoint import CheckpointError, read_config, state_sha256
from vlapt.policies.gaussian import GaussianChunk, GaussianChunkPolicy

__all__ = ["ENTRY_POINT_GROUP", "ChunkPolicyBase", "CheckpointError", "GaussianChunk", "GaussianChunkPolicy", "PolicyAgent",
           "load_policy", "policy_types", "read_config", "register_policy_type", "resolve_device", "state_sha256"]
