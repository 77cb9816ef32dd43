"""VLA policy: config, tokenizer, network, checkpoints and the inference wrapper."""

from vlapt.models.checkpoint import CheckpointError, load_pretrained, load_pretrained_config, save_pretrained
from vlapt.models.config import MODEL_SIZES, PolicyConfig, policy_config_for_size
from vlapt.models.policy import Policy, load_policy, make_batch
from vlapt.models.tokenizer import Tokenizer
from vlapt.models.vla import (
    VISION_BACKBONES,
    PolicyOutput,
    VLAPolicy,
    register_vision_backbone,
)

__all__ = [
    "MODEL_SIZES",
    "VISION_BACKBONES",
    "CheckpointError",
    "Policy",
    "PolicyConfig",
    "PolicyOutput",
    "Tokenizer",
    "VLAPolicy",
    "load_policy",
    "load_pretrained",
    "load_pretrained_config",
    "make_batch",
    "policy_config_for_size",
    "register_vision_backbone",
    "save_pretrained",
]
