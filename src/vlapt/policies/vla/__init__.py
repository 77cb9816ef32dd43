"""vlapt's own VLA: a small vision-language-action transformer that trains on a CPU."""

from vlapt.policies.vla.config import MODEL_SIZES, PolicyConfig, policy_config_for_size
from vlapt.policies.vla.network import VISION_BACKBONES, register_vision_backbone
from vlapt.policies.vla.policy import VLAPolicy, load_vla, make_batch
from vlapt.policies.vla.tokenizer import Tokenizer

__all__ = ["MODEL_SIZES", "VISION_BACKBONES", "PolicyConfig", "Tokenizer", "VLAPolicy", "load_vla", "make_batch",
           "policy_config_for_size", "register_vision_backbone"]
