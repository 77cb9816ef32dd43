"""The pretrained-backbone path, with a tiny randomly initialised ViT saved to local disk."""

import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlapt.policies import load_policy  # noqa: E402
from vlapt.policies.vla import Tokenizer, VLAPolicy, policy_config_for_size  # noqa: E402


@pytest.fixture()
def tiny_vit_dir(tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64)
    model = transformers.ViTModel(config, add_pooling_layer=False)
    path = tmp_path / "tiny-vit"
    model.save_pretrained(path)
    return path, model


def _policy_config(path):
    return policy_config_for_size("tiny", image_size=48, vision_backbone="hf", vision_backbone_path=str(path),
                                  image_keypoints=0, vocab=Tokenizer.build(["open the door"]).vocab)


def _obs(batch=2, size=48):
    rng = np.random.default_rng(0)
    return {"image": rng.integers(0, 255, (batch, size, size, 3), dtype=np.uint8),
            "proprio": rng.normal(size=(batch, 4)).astype(np.float32), "instruction": ["open the door"] * batch}


def test_hf_backbone_loads_pretrained_weights_from_disk(tiny_vit_dir):
    path, reference = tiny_vit_dir
    policy = VLAPolicy(_policy_config(path))
    for name, value in reference.state_dict().items():
        assert torch.equal(policy.vision.backbone.state_dict()[name], value), name
    chunk = policy.predict_batch(_obs())
    assert chunk.shape == (2, policy.chunk_len, 4) and np.all(np.abs(chunk) <= 1)
    assert policy.vision.num_tokens == 16


def test_hf_backbone_checkpoint_is_self_contained(tiny_vit_dir, tmp_path):
    path, _ = tiny_vit_dir
    torch.manual_seed(1)
    policy = VLAPolicy(_policy_config(path))
    expected = policy.predict_batch(_obs())
    policy.save(tmp_path / "ckpt")
    shutil.rmtree(path)  # the original model directory is gone: the checkpoint must suffice
    loaded = load_policy(tmp_path / "ckpt")
    assert loaded.config.vision_backbone_spec == policy.config.vision_backbone_spec != ""
    np.testing.assert_array_equal(loaded.predict_batch(_obs()), expected)


def test_hf_backbone_without_a_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="vision_backbone_path"):
        VLAPolicy(_policy_config(tmp_path / "nowhere"))


def test_hf_backbone_takes_no_keypoint_tokens(tiny_vit_dir):
    path, _ = tiny_vit_dir
    with pytest.raises(ValueError, match="set image_keypoints=0"):
        policy_config_for_size("tiny", image_size=48, vision_backbone="hf", vision_backbone_path=str(path),
                               image_keypoints=4)
