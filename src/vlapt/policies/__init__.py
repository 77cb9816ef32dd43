"""Policies behind one interface (`vlapt.interfaces.ChunkPolicy`): vlapt's VLA and other families.

``load_policy(path)`` rebuilds any registered family from its checkpoint directory
(``config.json`` + ``model.safetensors``); ``policy.predict(observation)`` returns an action chunk.
"""

from vlapt.policies.base import (
    ChunkPolicyBase, PolicyAgent, load_policy, policy_types, register_policy_type, resolve_device,
)
from vlapt.policies.checkpoint import CheckpointError, read_config, state_sha256

__all__ = ["ChunkPolicyBase", "CheckpointError", "PolicyAgent", "load_policy", "policy_types", "read_config", "register_policy_type",
           "resolve_device", "state_sha256"]
