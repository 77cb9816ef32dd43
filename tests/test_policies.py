"""Tests for vlapt.policies: shapes, likelihoods, the ChunkPolicy methods, masking, checkpoints, inference, tokenizer."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vlapt.interfaces import BCLoss, ChunkEvaluation, ChunkPolicy, ChunkSample, join_views, split_views
from vlapt.policies import CheckpointError, PolicyAgent, load_policy, policy_types, read_config
from vlapt.policies.vla import MODEL_SIZES, PolicyConfig, Tokenizer, VLAPolicy, make_batch, policy_config_for_size

IMAGE_SIZE = 32
INSTRUCTIONS = ["pick up the puck and place it at the goal", "open the drawer", "press the button"]


@pytest.fixture
def tokenizer() -> Tokenizer:
    return Tokenizer.build(INSTRUCTIONS)


def tiny_config(tokenizer: Tokenizer, **overrides) -> PolicyConfig:
    return policy_config_for_size("tiny", image_size=IMAGE_SIZE, vocab=tokenizer.vocab, **overrides)


@pytest.fixture
def model(tokenizer) -> VLAPolicy:
    torch.manual_seed(0)
    return VLAPolicy(tiny_config(tokenizer)).eval()


def observations(batch_size: int = 2, image_size: int = IMAGE_SIZE, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, size=(batch_size, image_size, image_size, 3), dtype=np.uint8),
        "proprio": rng.normal(size=(batch_size, 4)).astype(np.float32),
        "instruction": [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch_size)],
    }


def single_observation(seed: int = 0) -> dict:
    obs = observations(1, seed=seed)
    return {"image": obs["image"][0], "proprio": obs["proprio"][0], "instruction": obs["instruction"][0]}


# --------------------------------------------------------------------------- config and shapes


@pytest.mark.parametrize("size, image_size", [("tiny", IMAGE_SIZE), ("default", 96), ("large", 96)])
def test_forward_shapes_for_every_size(tokenizer, size, image_size):
    torch.manual_seed(0)
    config = policy_config_for_size(size, image_size=image_size, vocab=tokenizer.vocab)
    model = VLAPolicy(config).eval()
    batch = make_batch(observations(2, image_size), tokenizer, config)
    with torch.no_grad():
        out = model(batch)
    h, a = config.chunk_len, config.action_dim
    assert out.mean.shape == (2, h, a)
    assert out.log_std.shape == (2, h, a)
    assert out.value.shape == (2,)
    assert torch.isfinite(out.mean).all() and torch.isfinite(out.value).all()
    assert out.mean.abs().max() < 0.1, "initial actions should sit near zero"
    # features are exactly what the action head reads (auxiliary heads and probes use them)
    assert out.features.shape == (2, config.d_model)
    torch.testing.assert_close(model.action_head(out.features).view_as(out.mean), out.mean)
    params = model.num_parameters()
    expected_range = {"tiny": (5e3, 2e5), "default": (5e5, 3e6), "large": (2e7, 3.5e7)}[size]
    assert expected_range[0] < params < expected_range[1]


def test_default_config_matches_default_preset():
    assert dataclasses.asdict(PolicyConfig()) == dataclasses.asdict(policy_config_for_size("default"))
    assert set(MODEL_SIZES) == {"tiny", "default", "large"}
    json.dumps(dataclasses.asdict(PolicyConfig()))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(size="huge"), "unknown model size"),
        (dict(d_model=30, n_heads=4), "divisible by n_heads"),
        (dict(chunk_len=0), "chunk_len"),
        (dict(action_mean=[0.0, 0.0], action_std=[1.0, 1.0]), "action_dim=4"),
        (dict(proprio_mean=[0.0] * 4, proprio_std=[1.0, 1.0, 0.0, 1.0]), "proprio_std"),
        (dict(init_log_std=3.0), "init_log_std"),
        (dict(d_model="big"), "must be int"),
        (dict(image_keypoints=-1), "image_keypoints must be >= 0"),
        (dict(image_keypoints=8, vision_backbone="hf"), "'conv' vision backbone only"),
    ],
)
def test_validate_rejects_bad_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PolicyConfig(), **overrides).validate()


def test_unknown_override_and_backbone_are_reported(tokenizer):
    with pytest.raises(ValueError, match="unknown PolicyConfig field"):
        policy_config_for_size("tiny", widht=3)
    with pytest.raises(ValueError, match="available: .*'conv'"):
        VLAPolicy(tiny_config(tokenizer, vision_backbone="resnet_from_nowhere", image_keypoints=0))


BACKBONE_MODULE = """
import torch
from torch import nn


class MeanColour(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_tokens = 1
        self.project = nn.Linear(3, config.d_model)

    def forward(self, image):
        return self.project(image.float().mean(dim=(1, 2)) / 255.0)[:, None]


def build(config):
    return MeanColour(config)
"""


def test_a_backbone_an_installed_package_declares_loads_in_a_fresh_process(tokenizer, tmp_path, monkeypatch):
    # an installed distribution as importlib.metadata finds it on the path: its module and its entry point
    (tmp_path / "my_backbone.py").write_text(BACKBONE_MODULE)
    info = tmp_path / "my_backbone-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-backbone\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[vlapt.vision_backbones]\nmean_colour = my_backbone:build\n"
                                           "not_a_builder = my_backbone:torch\nbroken = my_backbone:nothing\n")
    with pytest.raises(ValueError, match="unknown vision_backbone 'mean_colour'.*entry-point group"):
        VLAPolicy(tiny_config(tokenizer, vision_backbone="mean_colour", image_keypoints=0))
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    policy = VLAPolicy(tiny_config(tokenizer, vision_backbone="mean_colour", image_keypoints=0)).eval()
    policy.save(tmp_path / "policy")
    np.save(tmp_path / "expected.npy", policy.act(observations(), deterministic=True).actions.numpy())
    script = (f"import sys, numpy as np, torch; torch.set_num_threads(1); sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              "from test_policies import observations; from vlapt.policies import load_policy; "
              f"policy = load_policy({str(tmp_path / 'policy')!r}); "
              "actions = policy.act(observations(), deterministic=True).actions.numpy(); "
              f"np.testing.assert_allclose(actions, np.load({str(tmp_path / 'expected.npy')!r}), atol=1e-6); print('same')")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")])}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "same" in done.stdout, done.stderr[-2000:]
    for name, message in (("broken", "entry point, which cannot be loaded"), ("not_a_builder", "not a builder")):
        with pytest.raises(ValueError, match=message):
            VLAPolicy(tiny_config(tokenizer, vision_backbone=name, image_keypoints=0))
    with pytest.raises(ValueError, match="unknown vision_backbone"):  # a module path is not a backbone name
        VLAPolicy(tiny_config(tokenizer, vision_backbone="my_backbone:build", image_keypoints=0))


# --------------------------------------------------------------------------- distribution


def test_log_prob_and_entropy_match_reference(model):
    with torch.no_grad():
        model.log_std.copy_(torch.linspace(-2.0, 0.5, model.log_std.numel()).view_as(model.log_std))
    obs = observations(3)
    actions = torch.randn(3, model.chunk_len, model.action_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(model.make_batch(obs))
        log_prob, entropy, value = model.evaluate(obs, actions)

    mean = out.mean.double().numpy()
    std = np.exp(model.log_std.detach().double().numpy())[None]
    x = actions.double().numpy()
    reference = (-((x - mean) ** 2) / (2 * std**2) - np.log(std * math.sqrt(2 * math.pi))).sum(axis=(1, 2))
    np.testing.assert_allclose(log_prob.numpy(), reference, rtol=1e-5, atol=1e-4)

    torch_reference = torch.distributions.Normal(out.mean, out.log_std.exp()).log_prob(actions).sum((1, 2))
    torch.testing.assert_close(log_prob, torch_reference, rtol=1e-5, atol=1e-4)
    reference_entropy = np.log(std * math.sqrt(2 * math.pi * math.e)).sum()
    np.testing.assert_allclose(entropy.numpy(), np.full(3, reference_entropy), rtol=1e-6)
    torch.testing.assert_close(value, out.value)
    # the static helpers are the same functions
    torch.testing.assert_close(VLAPolicy.chunk_log_prob(out.mean, out.log_std, actions), log_prob)
    torch.testing.assert_close(VLAPolicy.chunk_entropy(out.log_std), entropy)


def test_log_std_is_clamped(model):
    with torch.no_grad():
        model.log_std.fill_(10.0)
    out = model(model.make_batch(observations(1)))
    assert torch.all(out.log_std == model.config.max_log_std)
    assert torch.all(model.clamped_log_std() == model.config.max_log_std)
    assert model.exploration_std() == pytest.approx(math.exp(model.config.max_log_std))


def test_act_log_prob_is_consistent_and_deterministic_is_mean(model):
    obs = observations(2)
    sample = model.act(obs, generator=torch.Generator().manual_seed(0))
    assert isinstance(sample, ChunkSample)
    assert sample.actions.shape == (2, model.chunk_len, model.action_dim) and isinstance(sample.actions, torch.Tensor)
    assert sample.env_actions.shape == (2, model.chunk_len, model.action_dim)
    assert sample.log_prob.shape == sample.value.shape == (2,)
    with torch.no_grad():
        evaluation = model.evaluate(obs, sample.actions)
        assert isinstance(evaluation, ChunkEvaluation)
        np.testing.assert_allclose(evaluation.log_prob.numpy(), sample.log_prob, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(evaluation.value.numpy(), sample.value, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(model.value(obs), sample.value, rtol=1e-6, atol=1e-6)
        mean = model(model.make_batch(obs)).mean
    deterministic = model.act(obs, deterministic=True)
    torch.testing.assert_close(deterministic.actions, mean)
    # a sample is not the mean, and the same generator seed reproduces it
    assert not torch.allclose(sample.actions, mean)
    again = model.act(obs, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.actions, sample.actions, rtol=0, atol=0)


def test_act_keeps_the_training_mode_and_leaves_no_graph(model):
    model.train()
    sample = model.act(observations(2), generator=torch.Generator().manual_seed(0))
    assert model.training and not sample.actions.requires_grad
    model.eval()
    model.value(observations(2))
    assert not model.training


def test_env_actions_are_the_unnormalised_unclipped_samples(tokenizer):
    torch.manual_seed(0)
    model = VLAPolicy(tiny_config(tokenizer, action_mean=[0.1, -0.2, 0.0, 0.3], action_std=[0.5, 0.5, 2.0, 1.0]))
    with torch.no_grad():
        model.log_std.fill_(model.config.max_log_std)  # wide noise: samples beyond the action bounds
    sample = model.act(observations(4), generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(sample.env_actions, model.unnormalize_actions(sample.actions).numpy(), rtol=1e-6)
    assert np.abs(sample.env_actions).max() > 1.0, "env actions are not clipped (the env clips them)"


def test_evaluate_with_steps_scores_only_the_first_steps(model):
    obs = observations(3)
    k = 2
    sample = model.act(obs, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(model.make_batch(obs))
        changed = sample.actions.clone()
        changed[:, k:] += 5.0  # steps after k are never scored
        logp_k, entropy_k, _ = model.evaluate(obs, changed, steps=k)
        reference = torch.distributions.Normal(out.mean[:, :k], out.log_std[:, :k].exp()).log_prob(changed[:, :k]).sum((1, 2))
        torch.testing.assert_close(logp_k, reference, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(logp_k, model.evaluate(obs, sample.actions, steps=k).log_prob)
        logp_all, entropy_all, _ = model.evaluate(obs, changed)
    assert (logp_all < logp_k - 1.0).all(), "scored over the whole chunk, the shifted steps count"
    torch.testing.assert_close(entropy_k, entropy_all * k / model.chunk_len)  # one std for every step here
    with pytest.raises(ValueError, match="steps must be in"):
        model.evaluate(obs, sample.actions, steps=model.chunk_len + 1)
    with pytest.raises(ValueError, match="actions must have shape"):
        model.evaluate(obs, sample.actions[:, :k])


def _bc_inputs(model, n=6, seed=0):
    rng = np.random.default_rng(seed)
    obs = observations(n, seed=seed)
    actions = torch.from_numpy(rng.normal(size=(n, model.chunk_len, model.action_dim)).astype(np.float32))
    pad = torch.zeros(n, model.chunk_len, dtype=torch.bool)
    pad[0, 3:] = True
    pad[1, 1:] = True
    pad[2, 4:] = True
    return obs, actions, pad


def test_bc_loss_is_the_chunk_nll_of_the_unpadded_entries_in_normalised_units(tokenizer):
    torch.manual_seed(0)
    model = VLAPolicy(tiny_config(tokenizer, action_mean=[0.1, -0.2, 0.0, 0.3], action_std=[0.5, 0.5, 2.0, 1.0])).eval()
    with torch.no_grad():  # an uneven std per entry, so a wrong broadcast shows
        model.log_std.copy_(torch.linspace(-1.5, 0.5, model.log_std.numel()).view_as(model.log_std))
    obs, actions, pad = _bc_inputs(model)
    with torch.no_grad():
        result = model.bc_loss(obs, actions, pad)
        out = model(model.make_batch(obs))
    assert isinstance(result, BCLoss)
    target = model.normalize_actions(actions)
    valid = ~pad
    nll = -torch.distributions.Normal(out.mean, out.log_std.exp()).log_prob(target)
    torch.testing.assert_close(result.loss, nll[valid].mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.mse, (out.mean - target).square()[valid].mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.features, out.features)


def test_bc_loss_ignores_padded_entries(model):
    obs, actions, pad = _bc_inputs(model)
    with torch.no_grad():
        loss, mse, _ = model.bc_loss(obs, actions, pad)
        changed = actions.clone()
        changed[pad] = 100.0
        loss2, mse2, _ = model.bc_loss(obs, changed, pad)
        assert loss2.item() == loss.item() and mse2.item() == mse.item()
        changed[0, 0, 0] += 1.0  # an unpadded target does count
        assert model.bc_loss(obs, changed, pad).loss.item() != loss.item()
        everything = model.bc_loss(obs, actions, torch.ones_like(pad))
    assert everything.loss.item() == 0.0 and everything.mse.item() == 0.0, "all padded: zero, not NaN"


def test_bc_loss_trains_the_mean_and_the_std(model):
    obs, actions, pad = _bc_inputs(model)
    model.train()
    loss, mse, _ = model.bc_loss(obs, actions, pad)
    assert not mse.requires_grad
    loss.backward()
    assert model.log_std.grad is not None and model.log_std.grad.abs().sum() > 0
    assert model.action_head[-1].weight.grad.abs().sum() > 0
    assert model.value_head[-1].weight.grad is None, "BC does not train the critic"


def test_param_groups_partition_the_parameters(model):
    groups = model.param_groups()
    assert set(groups) == {"actor", "critic"}
    ids = [id(p) for group in groups.values() for p in group]
    assert len(ids) == len(set(ids)), "no parameter is in both groups"
    assert set(ids) == {id(p) for p in model.parameters()}, "every parameter is in a group"
    assert {id(p) for p in groups["critic"]} == {id(p) for p in model.value_head.parameters()}
    assert any(p is model.log_std for p in groups["actor"])


def test_reset_exploration_sets_the_std(model):
    model.reset_exploration(-2.0)
    assert torch.all(model.log_std == -2.0)
    assert model.exploration_std() == pytest.approx(math.exp(-2.0))


def test_vla_policy_is_a_chunk_policy(model):
    assert isinstance(model, ChunkPolicy)
    config = model.observation_config()
    assert (config.image_size, config.camera, config.render) == (IMAGE_SIZE, "", True)
    assert "vla" in policy_types()


def test_gradients_reach_all_parameters(tokenizer):
    torch.manual_seed(0)
    model = VLAPolicy(tiny_config(tokenizer)).train()
    log_prob, entropy, value = model.evaluate(observations(2), torch.zeros(2, model.chunk_len, model.action_dim))
    (-log_prob.mean() - 0.01 * entropy.mean() + value.square().mean()).backward()
    without_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without_grad == []


def test_keypoint_tokens_train_and_survive_a_checkpoint(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = VLAPolicy(tiny_config(tokenizer, image_keypoints=4)).train()
    assert model.vision.num_tokens == model.config.image_grid**2 + 4
    obs = observations(2)
    log_prob, _, value = model.evaluate(obs, torch.zeros(2, model.chunk_len, model.action_dim))
    (-log_prob.mean() + value.square().mean()).backward()
    for name in ("keypoint_features.weight", "keypoint_log_temperature", "keypoint_embed.weight"):
        assert getattr(model.vision, name.split(".")[0]) is not None
        grad = dict(model.vision.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name

    model.eval().save(tmp_path / "ckpt")
    loaded = load_policy(tmp_path / "ckpt")
    assert loaded.config.image_keypoints == 4
    batch = model.make_batch(obs)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).mean, model(batch).mean)


@pytest.mark.parametrize("to", [np.asarray, torch.as_tensor])
def test_split_views_gives_each_view_alone_and_join_views_undoes_it(to):
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 12, 3), dtype=np.uint8)  # three 4x4 views
    split = split_views(to(images), 3)
    assert tuple(split.shape) == (6, 4, 4, 3)
    for n in range(2):
        for v in range(3):
            np.testing.assert_array_equal(np.asarray(split[3 * n + v]), images[n, :, 4 * v:4 * (v + 1)])
    np.testing.assert_array_equal(np.asarray(join_views(split, 3)), images)
    with pytest.raises(ValueError, match="not 2 square view"):
        split_views(to(images), 2)
    with pytest.raises(ValueError, match="groups of 4"):
        join_views(split, 4)
    with pytest.raises(ValueError, match="not square views"):
        join_views(to(images), 2)


def test_two_views_are_encoded_one_by_one_and_told_apart(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = VLAPolicy(tiny_config(tokenizer, camera="corner+corner2")).eval()
    assert model.config.views == 2 and model.image_pos.shape[1] == 2 * model.vision.num_tokens
    obs = observations(2)
    wide = np.concatenate([obs["image"], observations(2, seed=1)["image"]], axis=2)  # (B, 32, 64, 3)
    batch = model.make_batch({**obs, "image": wide})
    with torch.no_grad():
        tokens = model._image_tokens(batch["image"])
        n = model.vision.num_tokens
        torch.testing.assert_close(tokens[:, :n], model.vision(batch["image"][:, :, :IMAGE_SIZE].contiguous()))
        torch.testing.assert_close(tokens[:, n:], model.vision(batch["image"][:, :, IMAGE_SIZE:].contiguous()))
        swapped = torch.cat([batch["image"][:, :, IMAGE_SIZE:], batch["image"][:, :, :IMAGE_SIZE]], dim=2)
        assert not torch.allclose(model(batch).mean, model({**batch, "image": swapped}).mean), \
            "which view is which reaches the actions"
    with pytest.raises(ValueError, match=r"\(32, 64, 3\).*2 views of 32x32 side by side"):
        model.make_batch(obs)  # one square view where the policy reads two
    model.save(tmp_path / "two")
    loaded = load_policy(tmp_path / "two")
    assert loaded.config.views == 2 and loaded.observation_config().camera == "corner+corner2"
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).mean, model(batch).mean)


def test_spatial_softmax_returns_the_peak_position(tokenizer):
    encoder = VLAPolicy(tiny_config(tokenizer, image_keypoints=2)).vision
    channels = encoder.keypoint_features.in_channels
    with torch.no_grad():
        encoder.keypoint_features.weight.zero_()
        encoder.keypoint_features.bias.zero_()
        encoder.keypoint_features.weight[0, 0] = 1.0  # keypoint 0 follows channel 0
        encoder.keypoint_features.weight[1, 1] = 1.0  # keypoint 1 follows channel 1
        encoder.keypoint_log_temperature.fill_(-4.0)  # near-hard argmax
    features = torch.zeros(1, channels, 8, 8)
    features[0, 0, 1, 6] = 5.0  # row 1, column 6
    features[0, 1, 7, 0] = 5.0  # bottom-left corner
    with torch.no_grad():
        xy = encoder.spatial_softmax(features)[0]
    step = 2.0 / 7
    torch.testing.assert_close(xy[0], torch.tensor([-1 + 6 * step, -1 + 1 * step]), atol=1e-4, rtol=0)
    torch.testing.assert_close(xy[1], torch.tensor([-1.0, 1.0]), atol=1e-4, rtol=0)


def _rewrite_config(path, change, keep_hash: bool = False) -> None:
    """Edit config.json; without ``keep_hash`` as a checkpoint that records no config digest (older or hand-written)."""
    document = json.loads((path / "config.json").read_text())
    change(document)
    if not keep_hash:
        document.pop("policy_sha256", None)
    (path / "config.json").write_text(json.dumps(document))


def test_a_config_edited_after_saving_is_refused(saved):
    # a buildable image size the weights were never trained at: only the recorded digest gives it away
    _rewrite_config(saved, lambda d: d["policy"].update(image_size=d["policy"]["image_size"] * 2), keep_hash=True)
    with pytest.raises(CheckpointError, match="edited after the checkpoint was written"):
        load_policy(saved)


@pytest.mark.parametrize("key, value", [("files", ["model.safetensors"]), ("policy_type", ["vla"]),
                                        ("policy_sha256", 7)])
def test_a_config_whose_fields_have_the_wrong_type_is_refused(saved, key, value):
    _rewrite_config(saved, lambda d: d.update({key: value}), keep_hash=True)
    with pytest.raises(CheckpointError, match=f"'{key}' must be a"):
        load_policy(saved)


def test_checkpoints_without_keypoint_field_load_as_before(tokenizer, tmp_path):
    # written before image_keypoints existed: no keypoint tokens (the default then), whatever today's default is
    torch.manual_seed(0)
    old = VLAPolicy(tiny_config(tokenizer, image_keypoints=0)).eval()
    old.save(tmp_path / "old")
    _rewrite_config(tmp_path / "old", lambda d: d["policy"].pop("image_keypoints"))
    loaded = load_policy(tmp_path / "old")
    assert loaded.config.image_keypoints == 0
    batch = old.make_batch(observations(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).mean, old(batch).mean)


def test_checkpoints_with_retired_options_switched_off_load(model, tmp_path):
    model.save(tmp_path / "old")
    _rewrite_config(tmp_path / "old", lambda d: d["policy"].update(
        correlated_noise=False, init_correlated_log_std=-1.5, image_film=False))
    assert load_policy(tmp_path / "old").config == model.config
    for name in ("correlated_noise", "image_film"):
        model.save(tmp_path / name)
        _rewrite_config(tmp_path / name, lambda d: d["policy"].update({name: True}))
        with pytest.raises(CheckpointError, match=f"{name}=True"):
            load_policy(tmp_path / name)


# --------------------------------------------------------------------------- attention structure


def test_value_readout_cannot_influence_actions(model):
    batch = model.make_batch(observations(2))
    with torch.no_grad():
        model.action_head[-1].weight.normal_(std=0.5)
        model.value_head[-1].weight.normal_(std=0.5)
        before = model(batch)
        # A random (not constant) change: LayerNorm would erase a uniform shift.
        model.readouts[:, 1].add_(torch.randn(model.config.d_model, generator=torch.Generator().manual_seed(0)))
        after = model(batch)
    torch.testing.assert_close(after.mean, before.mean, rtol=0, atol=0)
    assert (after.value - before.value).abs().min() > 1e-3


def test_language_padding_is_ignored(model, tokenizer):
    obs = observations(2)
    batch = make_batch(obs, tokenizer, model.config)
    padded = dict(batch)
    padded["instruction_ids"] = batch["instruction_ids"].masked_fill(~batch["instruction_mask"], 5)
    with torch.no_grad():
        torch.testing.assert_close(model(padded).mean, model(batch).mean)
        # Shorter padding (fewer columns) must give the same result too.
        width = int(batch["instruction_mask"].sum(1).max())
        short = dict(batch, instruction_ids=batch["instruction_ids"][:, :width],
                     instruction_mask=batch["instruction_mask"][:, :width])
        torch.testing.assert_close(model(short).mean, model(batch).mean, rtol=1e-5, atol=1e-6)


def test_instruction_changes_actions(model, tokenizer):
    with torch.no_grad():
        model.action_head[-1].weight.normal_(std=0.5)
    obs = observations(1)
    a = make_batch(obs, tokenizer, model.config)
    b = make_batch(dict(obs, instruction=["press the button"]), tokenizer, model.config)
    with torch.no_grad():
        assert not torch.allclose(model(a).mean, model(b).mean)


# --------------------------------------------------------------------------- observations and inference


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("image", np.zeros((2, 16, 16, 3), np.uint8), r"\(B, 32, 32, 3\).*got \(2, 16, 16, 3\)"),
        ("image", np.zeros((2, 32, 32), np.uint8), "image"),
        ("image", np.zeros((2, 32, 32, 3), np.float32), "uint8"),
        ("proprio", np.zeros((2, 7), np.float32), r"\(4,\) or \(B, 4\).*got \(2, 7\)"),
        ("proprio", np.zeros((3, 4), np.float32), "B=2"),
        ("instruction", ["only one"], "1 instructions for a batch of 2"),
    ],
)
def test_bad_observations_raise_value_error(model, tokenizer, key, value, message):
    obs = observations(2)
    obs[key] = value
    with pytest.raises(ValueError, match=message):
        make_batch(obs, tokenizer, model.config)
    with pytest.raises(ValueError, match=message):
        model.predict_batch(obs)


def test_make_batch_single_and_shared_instruction(model, tokenizer):
    single = make_batch(single_observation(), tokenizer, model.config)
    assert single["image"].shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and single["image"].dtype == torch.uint8
    assert single["proprio"].shape == (1, 4)
    shared = model.make_batch(dict(observations(3), instruction="open the drawer"))
    assert torch.equal(shared["instruction_ids"][0], shared["instruction_ids"][2])
    with pytest.raises(TypeError, match="PolicyConfig"):
        make_batch(single_observation(), tokenizer, "cpu")


def test_predict_shapes_bounds_and_batch_consistency(model):
    with torch.no_grad():
        model.action_head[-1].weight.normal_(std=2.0)  # push some actions past the bounds
    chunk = model.predict(single_observation())
    assert chunk.shape == (model.chunk_len, 4) and chunk.dtype == np.float32
    obs = observations(4)
    chunks = model.predict_batch(obs)
    assert chunks.shape == (4, model.chunk_len, 4) and chunks.dtype == np.float32
    assert chunks.min() >= -1.0 and chunks.max() <= 1.0
    assert np.abs(model.act(obs, deterministic=True).env_actions).max() > 1.0, "the example must exercise the clipping"
    first = {"image": obs["image"][0], "proprio": obs["proprio"][0], "instruction": obs["instruction"][0]}
    np.testing.assert_allclose(model.predict(first), chunks[0], atol=1e-5)
    assert model.observation_config().image_size == IMAGE_SIZE
    with pytest.raises(ValueError, match="predict_batch"):
        model.predict(obs)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(proprio=np.array([0.0, np.nan, 0.0, 0.0], np.float32)), "NaN or inf"),
        (dict(proprio=np.array([0.0, 0.0, np.inf, 0.0], np.float32)), "NaN or inf"),
        (dict(instruction=None), "must be a str"),
        (dict(instruction=""), "empty"),
        (dict(instruction="   "), "empty"),
        (dict(instruction=3), "must be a str"),
    ],
    ids=["nan", "inf", "none", "empty", "blank", "int"],
)
def test_predict_rejects_what_no_policy_can_act_on(model, change, message):
    with pytest.raises(ValueError, match=message):
        model.predict({**single_observation(), **change})
    batch = observations(2)
    key, value = next(iter(change.items()))
    batch[key] = np.stack([batch[key][0], value]) if key == "proprio" else [batch[key][0], value]
    with pytest.raises(ValueError, match=message):
        model.predict_batch(batch)


def test_predict_rejects_a_missing_key(model):
    obs = single_observation()
    del obs["proprio"]
    with pytest.raises(ValueError, match="missing"):
        model.predict(obs)


def test_unknown_instruction_words_warn_once(model, caplog):
    obs = dict(single_observation(), instruction="open the fridge")
    with caplog.at_level(logging.WARNING, logger="vlapt.policies"):
        model.predict(obs)
        model.predict(obs)
    warnings = [r for r in caplog.records if "never saw" in r.getMessage()]
    assert len(warnings) == 1 and "fridge" in warnings[0].getMessage()


def test_one_instruction_for_a_batch_is_read_as_words_not_letters(model, caplog):
    obs = dict(observations(3), instruction=INSTRUCTIONS[0])
    with caplog.at_level(logging.WARNING, logger="vlapt.policies"):
        chunks = model.predict_batch(obs)
    assert chunks.shape[0] == 3 and not [r for r in caplog.records if "never saw" in r.getMessage()]


def test_bc_targets_of_another_chunk_length_are_refused_naming_it(model):
    h, a = model.chunk_len, model.action_dim
    for actions, pad in ((torch.zeros(2, 1, a), torch.zeros(2, 1, dtype=torch.bool)),
                         (torch.zeros(2, h, a), torch.zeros(2, 1, dtype=torch.bool))):
        with pytest.raises(ValueError, match=r"BC targets must be chunks of shape \(B, chunk_len, action_dim\)"):
            model.bc_loss(observations(2), actions, pad)
    assert torch.isfinite(model.bc_loss(observations(2), torch.zeros(2, h, a), torch.zeros(2, h, dtype=torch.bool)).loss)


def test_freeze_takes_a_single_part_by_name(model):
    model.freeze("vision")
    assert model.config.vision_trainable == "none"
    with pytest.raises(ValueError, match=r"cannot freeze \['wheels'\]"):
        model.freeze("wheels")


def test_action_normalisation_round_trip(tokenizer):
    config = tiny_config(tokenizer, action_mean=[0.1, -0.2, 0.0, 0.3], action_std=[0.5, 0.5, 2.0, 1.0])
    model = VLAPolicy(config)
    actions = np.random.default_rng(0).uniform(-1, 1, size=(3, 5, 4)).astype(np.float32)
    normalised = model.normalize_actions(actions)
    assert isinstance(normalised, np.ndarray)
    np.testing.assert_allclose(normalised[..., 0], (actions[..., 0] - 0.1) / 0.5, rtol=1e-6)
    np.testing.assert_allclose(model.unnormalize_actions(normalised), actions, rtol=1e-6, atol=1e-6)
    as_tensor = model.unnormalize_actions(torch.from_numpy(normalised))
    torch.testing.assert_close(as_tensor, torch.from_numpy(actions))
    identity = VLAPolicy(tiny_config(tokenizer))
    np.testing.assert_array_equal(identity.normalize_actions(actions), actions)


def test_seeded_sampling_is_reproducible(model):
    obs = single_observation()
    model.seed(3)
    first = [model.predict(obs, deterministic=False) for _ in range(2)]
    model.seed(3)
    again = [model.predict(obs, deterministic=False) for _ in range(2)]
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], first[1])
    other = copy.deepcopy(model)
    other.seed(4)
    assert not np.array_equal(other.predict(obs, deterministic=False), first[0])
    other.seed(99)
    np.testing.assert_array_equal(model.predict(obs), other.predict(obs))


def test_policy_agent_acts_on_a_list_of_observations(model):
    agent = PolicyAgent(model)
    assert agent.chunk_len == model.chunk_len and agent.name == "policy:vla"
    obs = observations(3)
    listed = [{"image": obs["image"][i], "proprio": obs["proprio"][i], "instruction": obs["instruction"][i]} for i in range(3)]
    chunks = agent.act(listed, ["a", "b", "c"])
    assert len(chunks) == 3
    np.testing.assert_array_equal(np.stack(chunks), model.predict_batch(obs))


# --------------------------------------------------------------------------- checkpoints


def test_save_load_round_trip(model, tokenizer, tmp_path):
    with torch.no_grad():
        model.action_head[-1].weight.normal_(std=0.3)
    path = tmp_path / "ckpt"
    model.save(path, metadata={"step": 7, "task": "pick-place-v3"})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    document = json.loads((path / "config.json").read_text())
    assert document["format"] == "vlapt-policy" and document["format_version"] == 1
    assert document["policy_type"] == "vla"
    assert document["metadata"] == {"step": 7, "task": "pick-place-v3"}
    assert document["files"]["model.safetensors"] == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert read_config(path) == document

    loaded = load_policy(path, seed=5)
    assert isinstance(loaded, VLAPolicy) and not loaded.training
    model.seed(5)
    assert loaded.config == model.config and loaded.tokenizer == tokenizer
    obs = observations(3)
    np.testing.assert_array_equal(loaded.predict_batch(obs), model.predict_batch(obs))
    np.testing.assert_array_equal(loaded.predict_batch(obs, deterministic=False), model.predict_batch(obs, deterministic=False))
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_save_overwrites_and_leaves_no_temp_dirs(model, tmp_path):
    path = tmp_path / "ckpt"
    model.save(path, metadata={"version": 1})
    with torch.no_grad():
        model.log_std.fill_(-2.0)
    model.save(path, metadata={"version": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert json.loads((path / "config.json").read_text())["metadata"] == {"version": 2}
    assert torch.all(load_policy(path).log_std == -2.0)


def test_save_rejects_unserialisable_metadata_without_touching_disk(model, tmp_path):
    with pytest.raises(ValueError, match="JSON-serialisable"):
        model.save(tmp_path / "ckpt", metadata={"bad": object()})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def saved(model, tmp_path):
    path = tmp_path / "ckpt"
    model.save(path)
    return path


def _drop_hash(path) -> None:
    """As a checkpoint written without a recorded hash (loading then checks only the file itself)."""
    _rewrite_config(path, lambda d: d.pop("files"))


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_policy(tmp_path / "nope")


def test_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_policy(saved)


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_policy(saved)
    with pytest.raises(CheckpointError, match="no config.json"):
        read_config(saved)


def test_weights_that_do_not_match_their_recorded_hash(saved):
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the last tensor: still a readable safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_policy(saved)
    _drop_hash(saved)
    load_policy(saved)  # without a recorded hash the (readable) file loads


def test_corrupt_safetensors(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_policy(saved)
    _drop_hash(saved)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_policy(saved)
    (saved / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_policy(saved)


def test_corrupt_json(saved):
    (saved / "config.json").write_text('{"format": "vlapt-policy", ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_policy(saved)


def test_wrong_format_and_bad_fields(saved):
    document = json.loads((saved / "config.json").read_text())
    document.pop("policy_sha256")  # a config without a digest: each field is still checked
    (saved / "config.json").write_text(json.dumps(dict(document, format="something-else")))
    with pytest.raises(CheckpointError, match="not a vlapt policy checkpoint"):
        load_policy(saved)
    (saved / "config.json").write_text(json.dumps(dict(document, format_version=2)))
    with pytest.raises(CheckpointError, match="format_version"):
        load_policy(saved)
    (saved / "config.json").write_text(json.dumps(dict(document, policy={**document["policy"], "colour": 1})))
    with pytest.raises(CheckpointError, match="unknown policy config field.*colour"):
        load_policy(saved)
    (saved / "config.json").write_text(json.dumps(dict(document, policy={**document["policy"], "n_heads": 5})))
    with pytest.raises(CheckpointError, match="divisible by n_heads"):
        load_policy(saved)
    (saved / "config.json").write_text(json.dumps(dict(document, policy_type="diffusion")))
    with pytest.raises(CheckpointError, match="unknown policy_type 'diffusion'"):
        load_policy(saved)


def test_a_policy_type_declared_as_an_entry_point_loads_in_any_process(saved, monkeypatch):
    import importlib.metadata as metadata

    document = json.loads((saved / "config.json").read_text())
    document.pop("policy_sha256")
    (saved / "config.json").write_text(json.dumps(dict(document, policy_type="my-family")))
    with pytest.raises(CheckpointError, match="'vlapt.policy_types' entry-point group"):
        load_policy(saved)  # nothing registers or declares it

    def declared(group=None, name=None):  # as if an installed package declared the family in its metadata
        points = [metadata.EntryPoint("my-family", "vlapt.policies.vla:load_vla", "vlapt.policy_types"),
                  metadata.EntryPoint("broken", "no_such_module_xyz:load", "vlapt.policy_types")]
        return metadata.EntryPoints(p for p in points if p.group == group and name in (None, p.name))

    monkeypatch.setattr(metadata, "entry_points", declared)
    assert {"my-family", "broken", "vla"} <= set(policy_types())
    assert isinstance(load_policy(saved), VLAPolicy)
    (saved / "config.json").write_text(json.dumps(dict(document, policy_type="broken")))
    with pytest.raises(CheckpointError, match="entry point, which cannot be loaded.*no_such_module_xyz"):
        load_policy(saved)


def test_config_whose_image_size_the_weights_cannot_serve(saved):
    # 16 px through the tiny preset's 3 stride-2 convs is a 2x2 map, smaller than its 4x4 token grid
    _rewrite_config(saved, lambda d: d["policy"].update(image_size=16))
    with pytest.raises(CheckpointError, match="image_size 16"):
        load_policy(saved)


def test_config_whose_architecture_disagrees_with_the_weights(saved):
    # a config.json that records no digest: the shapes still give the mismatch away
    _rewrite_config(saved, lambda d: d["policy"].update(image_keypoints=4))
    with pytest.raises(CheckpointError, match="do not match its config.json.*keypoint"):
        load_policy(saved)


def test_weights_that_do_not_match_config(saved):
    state = load_file(str(saved / "model.safetensors"))
    state["log_std"] = torch.zeros(3, 4)
    state["extra.weight"] = torch.zeros(1)
    del state["value_head.0.bias"]
    save_file(state, str(saved / "model.safetensors"))
    digest = hashlib.sha256((saved / "model.safetensors").read_bytes()).hexdigest()
    _rewrite_config(saved, lambda d: d["files"].update({"model.safetensors": digest}))
    with pytest.raises(CheckpointError) as info:
        load_policy(saved)
    message = str(info.value)
    assert "log_std: file (3, 4) vs config (10, 4)" in message
    assert "extra.weight" in message and "value_head.0.bias" in message


def test_file_inside_checkpoint_points_to_directory(saved):
    with pytest.raises(CheckpointError, match="pass its directory"):
        load_policy(saved / "config.json")


def test_unavailable_device_is_a_clear_error(saved):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_policy(saved, device="cuda")


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_vocab_is_sorted_and_order_independent():
    a = Tokenizer.build(INSTRUCTIONS)
    b = Tokenizer.build(reversed(INSTRUCTIONS))
    assert a.vocab == b.vocab
    assert a.vocab[:2] == ["[PAD]", "[UNK]"]
    assert a.vocab[2:] == sorted(a.vocab[2:])
    assert Tokenizer.split("Pick-up the PUCK, now!") == ["pick", "up", "the", "puck", "now"]


def test_tokenizer_encode_pads_truncates_and_maps_unknowns(tokenizer):
    ids, mask = tokenizer.encode(["open the drawer", "open the fridge", "", "pick up the puck and place it"], 4)
    assert ids.shape == mask.shape == (4, 4) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert mask.tolist()[0] == [True, True, True, False]
    assert ids[0, 3] == 0
    assert ids[1, 2] == 1, "unknown words map to [UNK]"
    assert ids[2].tolist() == [1, 0, 0, 0] and mask[2].sum() == 1, "empty text still gets one token"
    assert mask[3].all(), "long texts are truncated to max_len"
    assert tokenizer.decode(ids[0]) == "open the drawer"
    again, _ = Tokenizer.build(INSTRUCTIONS).encode(["open the drawer"], 4)
    assert torch.equal(again[0], ids[0])


def test_tokenizer_and_policy_config_reject_a_bad_vocab_alike():
    from vlapt.policies.vla.config import PolicyConfig

    for bad, match in [(["hello", "[PAD]"], "must start with"),
                       (["[PAD]", "[UNK]", "open", "close", "open"], "open more than once")]:
        with pytest.raises(ValueError, match=match):
            Tokenizer(bad)
        with pytest.raises(ValueError, match=match):
            PolicyConfig(vocab=bad).validate()


def test_soup_script_averages_the_weights_of_policies_of_one_architecture(load_script, tiny_policy_dir, tmp_path):
    import torch

    from vlapt.policies import load_policy

    soup = load_script("soup")
    first = load_policy(tiny_policy_dir)
    second = load_policy(tiny_policy_dir)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(1.0)
    other = second.save(tmp_path / "other")
    assert soup.main([str(tiny_policy_dir), str(other), "--output", str(tmp_path / "soup")]) == 0
    averaged = load_policy(tmp_path / "soup").state_dict()
    a, b = first.state_dict(), second.state_dict()
    for name, value in averaged.items():
        expected = (a[name] + b[name]) / 2 if value.is_floating_point() else a[name]
        assert torch.allclose(value, expected), name
    with pytest.raises(SystemExit):
        soup.main([str(tiny_policy_dir), "--output", str(tmp_path / "one")])
    # runs fine-tuned from different starting policies are refused, and nothing is written
    a_run = first.save(tmp_path / "from_a", metadata={"init_state_sha256": "a" * 64})
    b_run = second.save(tmp_path / "from_b", metadata={"init_state_sha256": "b" * 64})
    with pytest.raises(SystemExit, match="different starting policies"):
        soup.main([str(a_run), str(b_run), "--output", str(tmp_path / "mixed")])
    assert not (tmp_path / "mixed").exists()
    # runs of one start are averaged, and the soup keeps their lineage
    b_run = second.save(tmp_path / "from_b", metadata={"init_state_sha256": "a" * 64})
    assert soup.main([str(a_run), str(b_run), "--output", str(tmp_path / "same")]) == 0
    assert json.loads((tmp_path / "same" / "config.json").read_text())["metadata"]["init_state_sha256"] == "a" * 64


def test_state_sha256_names_the_weights_not_the_file(tiny_policy_dir, tmp_path):
    import torch

    from vlapt.policies import load_policy, state_sha256

    first = load_policy(tiny_policy_dir)
    copy = load_policy(first.save(tmp_path / "copy", metadata={"note": "another file, the same weights"}))
    assert state_sha256(first) == state_sha256(copy)
    with torch.no_grad():
        next(copy.parameters()).view(-1)[0] += 1e-3
    assert state_sha256(first) != state_sha256(copy)
    layer = torch.nn.Linear(2, 2)
    full = state_sha256(layer)
    assert state_sha256(layer.to(torch.bfloat16)) != full  # dtypes without a numpy twin hash too
