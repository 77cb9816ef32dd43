"""Pretrained Hugging Face vision towers: tiny random-weight ViT, CLIP, SigLIP and SmolVLM models saved to local disk."""

import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlapt.algorithms.sft import ModelConfig, build_policy_config  # noqa: E402
from vlapt.interfaces import ObservationSpec  # noqa: E402
from vlapt.policies import load_policy  # noqa: E402
from vlapt.policies.vla import Tokenizer, VLAPolicy, policy_config_for_size  # noqa: E402
from vlapt.policies.vla.backbones import LoRALinear  # noqa: E402

VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TEXT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=32)


def _hf_config(family: str):
    if family == "vit":
        return transformers.ViTConfig(**VISION)
    if family == "clip":
        return transformers.CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16)
    if family == "siglip":
        return transformers.SiglipConfig(vision_config=VISION, text_config=TEXT)
    if family == "smolvlm":  # a small VLM: SigLIP-style tower + a Llama language model
        return transformers.SmolVLMConfig(vision_config=VISION, scale_factor=2,
                                          text_config=dict(TEXT, num_key_value_heads=2, model_type="llama"))
    raise KeyError(family)


def save_tiny_model(family: str, path):
    """A random-weight model of ``family``'s architecture, saved like a downloaded snapshot (safetensors)."""
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(_hf_config(family))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=["vit", "clip", "siglip", "smolvlm"])
def tiny_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "model"
    return request.param, path, save_tiny_model(request.param, path)


def _config(path, **overrides):
    return policy_config_for_size("tiny", image_size=48, vision_backbone="hf", vision_backbone_path=str(path),
                                  image_keypoints=0, vocab=Tokenizer.build(["open the door"]).vocab, **overrides)


def _obs(batch=2, size=48, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 255, (batch, size, size, 3), dtype=np.uint8),
            "proprio": rng.normal(size=(batch, 4)).astype(np.float32), "instruction": ["open the door"] * batch}


def _tower(model):
    return getattr(model, "vision_model", model)


def test_hf_backbone_loads_the_vision_tower_from_disk(tiny_model):
    family, path, reference = tiny_model
    policy = VLAPolicy(_config(path))
    tower = _tower(policy.vision.backbone).state_dict()
    expected = _tower(reference).state_dict()
    assert set(tower) == set(expected)
    for name, value in expected.items():
        assert torch.equal(tower[name], value), name
    if family != "vit":  # only the tower is kept, not the text model
        assert not any("text" in name for name in policy.state_dict())
    chunk = policy.predict_batch(_obs())
    assert chunk.shape == (2, policy.chunk_len, 4) and np.all(np.abs(chunk) <= 1)
    assert policy.vision.num_tokens == 16


def test_hf_backbone_checkpoint_is_self_contained(tiny_model, tmp_path):
    _, path, _ = tiny_model
    copy = tmp_path / "model"
    shutil.copytree(path, copy)
    torch.manual_seed(1)
    policy = VLAPolicy(_config(copy, vision_trainable="last_1"))
    expected = policy.predict_batch(_obs())
    policy.save(tmp_path / "ckpt")
    shutil.rmtree(copy)  # the original model directory is gone: the checkpoint must suffice
    loaded = load_policy(tmp_path / "ckpt")
    assert loaded.config.vision_backbone_spec == policy.config.vision_backbone_spec != ""
    assert loaded.config.vision_trainable == "last_1"
    np.testing.assert_array_equal(loaded.predict_batch(_obs()), expected)


def _trained_parts(policy):
    policy.zero_grad()
    observations = _obs()
    sample = policy.act(observations)
    policy.evaluate(observations, sample.actions).log_prob.sum().backward()
    return {name for name, p in policy.vision.backbone.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_frozen_tower_trains_nothing_of_it_and_its_features_are_cached(tiny_model):
    _, path, _ = tiny_model
    policy = VLAPolicy(_config(path, vision_trainable="none"))
    assert _trained_parts(policy) == set()
    assert policy.vision.project.weight.grad is not None  # the projection on top still trains
    assert policy.vision.cacheable()
    stats = policy.feature_cache_stats()
    assert stats["misses"] == 2 and stats["hits"] == 2  # act computed them, evaluate reused them


def test_last_k_trains_only_the_last_layers(tiny_model):
    _, path, _ = tiny_model
    policy = VLAPolicy(_config(path, vision_trainable="last_1"))
    trained = _trained_parts(policy)
    layers = policy.vision.layers
    last = {id(p) for p in layers[-1].parameters()}
    first = {id(p) for p in layers[0].parameters()}
    params = dict(policy.vision.backbone.named_parameters())
    assert trained and all(not params[name].requires_grad or id(params[name]) not in first for name in trained)
    assert any(id(params[name]) in last for name in trained)
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert not policy.vision.cacheable()


def test_lora_adapts_a_frozen_tower_starting_from_the_pretrained_function(tiny_model):
    _, path, _ = tiny_model
    adapted = VLAPolicy(_config(path, vision_trainable="none", vision_lora_rank=2))
    adapters = [m for m in adapted.vision.backbone.modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == 2 * VISION["num_hidden_layers"]  # query and value of each layer
    x = torch.randn(3, VISION["hidden_size"])
    for adapter in adapters:  # the update starts at zero: the pretrained tower's function
        torch.testing.assert_close(adapter(x), adapter.base(x))
    trained = _trained_parts(adapted)
    assert trained and all(".lora_" in name for name in trained)
    assert not adapted.vision.cacheable()


def test_pickled_only_weights_are_refused_never_unpickled(tmp_path):
    model_dir = tmp_path / "pickled"
    save_tiny_model("vit", model_dir)
    (model_dir / "model.safetensors").unlink()
    marker = tmp_path / "ran"

    class Exploit:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*never loads.*save_pretrained"):
        VLAPolicy(_config(model_dir))
    assert not marker.exists()


def test_hf_backbone_without_a_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="vision_backbone_path"):
        VLAPolicy(_config(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .*safetensors"):
        VLAPolicy(_config(tmp_path / "empty"))


def test_hf_backbone_takes_no_keypoint_tokens(tmp_path):
    with pytest.raises(ValueError, match="set image_keypoints=0"):
        policy_config_for_size("tiny", image_size=48, vision_backbone="hf", vision_backbone_path=str(tmp_path),
                               image_keypoints=4)


def test_bad_trainable_settings_are_named():
    with pytest.raises(ValueError, match="'all', 'none' or 'last_<k>'"):
        policy_config_for_size("tiny", vision_trainable="some")
    with pytest.raises(ValueError, match="vision_lora_rank.*vision_trainable='none'"):
        policy_config_for_size("tiny", vision_backbone="hf", image_keypoints=0, vision_lora_rank=4)
    with pytest.raises(ValueError, match="'conv' image encoder trains whole"):
        VLAPolicy(policy_config_for_size("tiny", image_size=32, vision_trainable="last_1"))


def test_sft_model_config_gives_pretrained_backbones_no_keypoints_and_checks_the_name_first(tmp_path):
    spec = ObservationSpec("corner", 48, 0.0, ("x", "y", "z", "g"), 4, 39, ())
    stats = {}
    path = tmp_path / "vit"
    save_tiny_model("vit", path)
    hf = build_policy_config(ModelConfig(size="tiny", vision_backbone="hf", vision_backbone_path=str(path)), spec, stats,
                             ["open the door"])
    assert hf.image_keypoints == 0
    conv = build_policy_config(ModelConfig(size="tiny"), spec, stats, ["open the door"])
    assert conv.image_keypoints == ModelConfig().image_keypoints > 0
    with pytest.raises(ValueError, match="unknown model.vision_backbone 'resnet'.*available"):
        build_policy_config(ModelConfig(size="tiny", vision_backbone="resnet"), spec, stats, ["open the door"])
