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
TEXT = dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
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


def save_tiny_model(family: str, path, words=("open the door", "reach the goal")):
    """A random-weight model of ``family``'s architecture, saved like a downloaded snapshot (safetensors), with a
    word-level fast tokenizer of ``words``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(_hf_config(family))
    model.save_pretrained(path)
    vocabulary = ["[PAD]", "[UNK]", *sorted({w for text in words for w in text.lower().split()})]
    assert len(vocabulary) <= TEXT["vocab_size"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
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


# -- language towers ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["clip", "siglip", "smolvlm"])
def tiny_text_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"{request.param}_text") / "model"
    return request.param, path, save_tiny_model(request.param, path)


def _language_config(path, **overrides):
    return policy_config_for_size("tiny", image_size=48, image_keypoints=0, language_backbone="hf",
                                  language_backbone_path=str(path), **overrides)


def test_language_tower_reads_instructions_with_its_own_tokenizer_and_weights(tiny_text_model):
    family, path, reference = tiny_text_model
    policy = VLAPolicy(_language_config(path))
    expected = getattr(reference, "text_model", reference).state_dict()
    assert set(policy.language_tower.backbone.state_dict()) == set(expected)
    for name, value in expected.items():
        assert torch.equal(policy.language_tower.backbone.state_dict()[name], value), name
    assert not any(name.startswith(("token_embed", "language_encoder")) for name in policy.state_dict())
    ids, mask = policy.tokenizer.encode(["open the door"], policy.config.max_instruction_tokens)
    assert mask.sum() == 3 and ids.shape == (1, policy.config.max_instruction_tokens)
    chunk = policy.predict_batch(_obs())
    assert chunk.shape == (2, policy.chunk_len, 4)
    assert policy.unknown_words(["stack the blocks"]) == []


def test_language_tower_checkpoint_carries_its_tokenizer(tiny_text_model, tmp_path):
    _, path, _ = tiny_text_model
    copy = tmp_path / "model"
    shutil.copytree(path, copy)
    policy = VLAPolicy(_language_config(copy, language_trainable="last_1"))
    observations = _obs()
    observations["instruction"] = ["reach the goal", "open the door"]
    expected = policy.predict_batch(observations)
    saved = policy.save(tmp_path / "ckpt")
    shutil.rmtree(copy)
    loaded = load_policy(saved)
    np.testing.assert_array_equal(loaded.predict_batch(observations), expected)
    tokenizer = saved / "language_tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"door"', '"window"'))
    with pytest.raises(ValueError, match="language_tokenizer.json does not match"):
        load_policy(saved)
    tokenizer.unlink()
    with pytest.raises(ValueError, match="no language_tokenizer.json"):
        load_policy(saved)


def test_frozen_language_tower_encodes_each_instruction_once(tiny_text_model):
    _, path, _ = tiny_text_model
    policy = VLAPolicy(_language_config(path, language_trainable="none"))
    observations = _obs(batch=4)
    observations["instruction"] = ["open the door", "reach the goal", "open the door", "open the door"]
    sample = policy.act(observations)
    policy.train()
    evaluation = policy.evaluate(observations, sample.actions)
    np.testing.assert_allclose(evaluation.log_prob.detach().numpy(), sample.log_prob, atol=1e-5)
    evaluation.log_prob.sum().backward()
    assert all(p.grad is None for p in policy.language_tower.backbone.parameters())
    assert policy.language_tower.project.weight.grad is not None
    stats = policy._instruction_cache.stats()
    assert stats["entries"] == 2 and stats["hits"] == 4
    with pytest.raises(ValueError, match="language_trainable applies to a pretrained language tower"):
        policy_config_for_size("tiny", language_trainable="none")
