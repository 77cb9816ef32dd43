"""Tests for vlapt.models: shapes, likelihoods, masking, checkpoints, inference, tokenizer."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vlapt.models import (
    MODEL_SIZES,
    CheckpointError,
    Policy,
    PolicyConfig,
    Tokenizer,
    VLAPolicy,
    load_policy,
    load_pretrained,
    make_batch,
    policy_config_for_size,
    save_pretrained,
)

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
        (dict(image_film=True, vision_backbone="hf"), "image_film applies to the 'conv'"),
    ],
)
def test_validate_rejects_bad_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PolicyConfig(), **overrides).validate()


def test_unknown_override_and_backbone_are_reported(tokenizer):
    with pytest.raises(ValueError, match="unknown PolicyConfig field"):
        policy_config_for_size("tiny", widht=3)
    with pytest.raises(ValueError, match="available: .*'conv'"):
        VLAPolicy(tiny_config(tokenizer, vision_backbone="resnet_from_nowhere"))


# --------------------------------------------------------------------------- distribution


def test_log_prob_and_entropy_match_reference(model, tokenizer):
    with torch.no_grad():
        model.log_std.copy_(torch.linspace(-2.0, 0.5, model.log_std.numel()).view_as(model.log_std))
    batch = make_batch(observations(3), tokenizer, model.config)
    actions = torch.randn(3, model.chunk_len, model.action_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(batch)
        log_prob = model.log_prob(batch, actions)
        entropy = model.entropy(batch)

    mean = out.mean.double().numpy()
    std = np.exp(model.log_std.detach().double().numpy())[None]
    x = actions.double().numpy()
    reference = (-((x - mean) ** 2) / (2 * std**2) - np.log(std * math.sqrt(2 * math.pi))).sum(axis=(1, 2))
    np.testing.assert_allclose(log_prob.numpy(), reference, rtol=1e-5, atol=1e-4)

    torch_reference = torch.distributions.Normal(out.mean, out.log_std.exp()).log_prob(actions).sum((1, 2))
    torch.testing.assert_close(log_prob, torch_reference, rtol=1e-5, atol=1e-4)
    reference_entropy = np.log(std * math.sqrt(2 * math.pi * math.e)).sum()
    np.testing.assert_allclose(entropy.numpy(), np.full(3, reference_entropy), rtol=1e-6)


def test_log_std_is_clamped(model, tokenizer):
    with torch.no_grad():
        model.log_std.fill_(10.0)
    out = model(make_batch(observations(1), tokenizer, model.config))
    assert torch.all(out.log_std == model.config.max_log_std)


def test_sample_log_prob_is_consistent_and_deterministic_is_mean(model, tokenizer):
    batch = make_batch(observations(2), tokenizer, model.config)
    with torch.no_grad():
        actions, log_prob, value = model.sample(batch, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(log_prob, model.log_prob(batch, actions))
        mean_actions, _, _ = model.sample(batch, deterministic=True)
        torch.testing.assert_close(mean_actions, model(batch).mean)
    assert value.shape == (2,)


def test_correlated_chunk_noise_matches_a_full_covariance_gaussian(model, tokenizer, tmp_path):
    with torch.no_grad():
        model.log_std.copy_(torch.linspace(-2.0, 0.5, model.log_std.numel()).view_as(model.log_std))
    model.enable_correlated_noise(-0.7)
    h, A = model.chunk_len, model.action_dim
    batch = make_batch(observations(3), tokenizer, model.config)
    actions = torch.randn(3, h, A, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(batch)
        log_prob, entropy, _ = model.evaluate_actions(batch, actions)
    # Reference: one multivariate normal over the flattened chunk; per action dimension the
    # covariance is diag(s_t^2) + c^2 11^T, and dimensions are independent.
    std = model.log_std.detach().double().exp()
    c = math.exp(-0.7)
    cov = torch.zeros(h * A, h * A, dtype=torch.float64)
    for d in range(A):
        idx = torch.arange(h) * A + d
        cov[idx[:, None], idx[None, :]] = c**2
        cov[idx, idx] += std[:, d] ** 2
    reference = torch.distributions.MultivariateNormal(out.mean.double().reshape(3, -1), covariance_matrix=cov)
    torch.testing.assert_close(log_prob.double(), reference.log_prob(actions.double().reshape(3, -1)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(entropy.double(), reference.entropy(), rtol=1e-5, atol=1e-4)

    # Samples have that covariance: steps of a chunk move together.
    many = make_batch(observations(1), tokenizer, model.config)
    many = {k: v.expand(4000, *v.shape[1:]) for k, v in many.items()}
    with torch.no_grad():
        samples, sample_log_prob, _ = model.sample(many, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(sample_log_prob, model.log_prob(many, samples), rtol=1e-4, atol=1e-3)
    empirical = torch.cov(samples.double().reshape(4000, -1).T)
    assert (empirical - cov).abs().max() < 0.12 * cov.diagonal().max()
    assert empirical[0, A] > 0.5 * c**2, "consecutive steps of one dimension are correlated"

    # The setting and the learned term survive a checkpoint.
    with torch.no_grad():
        model.correlated_log_std.copy_(torch.tensor([-0.5, -1.0, -1.5, -2.0]))
    save_pretrained(model, tmp_path / "p")
    loaded = load_pretrained(tmp_path / "p")
    assert loaded.config.correlated_noise
    torch.testing.assert_close(loaded.correlated_log_std, model.correlated_log_std)
    with pytest.raises(ValueError, match="already has"):
        loaded.enable_correlated_noise(-1.0)


def test_gradients_reach_all_parameters(tokenizer):
    torch.manual_seed(0)
    model = VLAPolicy(tiny_config(tokenizer)).train()
    batch = make_batch(observations(2), tokenizer, model.config)
    log_prob, entropy, value = model.evaluate_actions(batch, torch.zeros(2, model.chunk_len, model.action_dim))
    (-log_prob.mean() - 0.01 * entropy.mean() + value.square().mean()).backward()
    without_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without_grad == []


def test_keypoint_tokens_train_and_survive_a_checkpoint(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = VLAPolicy(tiny_config(tokenizer, image_keypoints=4)).train()
    assert model.vision.num_tokens == model.config.image_grid**2 + 4
    batch = make_batch(observations(2), tokenizer, model.config)
    log_prob, _, value = model.evaluate_actions(batch, torch.zeros(2, model.chunk_len, model.action_dim))
    (-log_prob.mean() + value.square().mean()).backward()
    for name in ("keypoint_features.weight", "keypoint_log_temperature", "keypoint_embed.weight"):
        assert getattr(model.vision, name.split(".")[0]) is not None
        grad = dict(model.vision.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name

    save_pretrained(model.eval(), tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    assert loaded.config.image_keypoints == 4
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


def test_film_starts_as_the_unconditioned_encoder_and_then_follows_the_instruction(tokenizer, tmp_path):
    torch.manual_seed(0)
    plain = VLAPolicy(tiny_config(tokenizer)).eval()
    filmed = VLAPolicy(tiny_config(tokenizer, image_film=True)).eval()
    missing, unexpected = filmed.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(name.startswith("vision.film.") for name in missing)
    same_image = observations(2)
    same_image["image"][1] = same_image["image"][0]
    same_image["proprio"][1] = same_image["proprio"][0]
    batch = make_batch(same_image, tokenizer, plain.config)
    assert batch["instruction_ids"][0].tolist() != batch["instruction_ids"][1].tolist()
    with torch.no_grad():  # zero-initialised FiLM: exactly the plain encoder
        torch.testing.assert_close(filmed.vision(batch["image"], condition=torch.randn(2, plain.config.d_model)),
                                   plain.vision(batch["image"]))

    filmed.train()
    log_prob, _, value = filmed.evaluate_actions(batch, torch.zeros(2, filmed.chunk_len, filmed.action_dim))
    (-log_prob.mean() + value.square().mean()).backward()
    assert all(film.weight.grad.abs().sum() > 0 for film in filmed.vision.film)
    with torch.no_grad():
        for film in filmed.vision.film:
            film.weight.normal_(std=0.5)
    filmed.eval()
    with torch.no_grad():  # same pixels, different instructions: different image tokens
        summary = filmed.token_embed(batch["instruction_ids"]).mean(1)
        tokens = filmed.vision(batch["image"], condition=summary)
    assert not torch.allclose(tokens[0], tokens[1], atol=1e-4)
    with pytest.raises(ValueError, match="pass the instruction summary"):
        filmed.vision(batch["image"])

    save_pretrained(filmed, tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    assert loaded.config.image_film
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).mean, filmed(batch).mean)


def test_checkpoints_without_keypoint_field_load_as_before(model, tmp_path):
    save_pretrained(model, tmp_path / "old")
    document = json.loads((tmp_path / "old" / "config.json").read_text())
    del document["policy"]["image_keypoints"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(document))
    assert load_pretrained(tmp_path / "old").config.image_keypoints == 0


# --------------------------------------------------------------------------- attention structure


def test_value_readout_cannot_influence_actions(model, tokenizer):
    batch = make_batch(observations(2), tokenizer, model.config)
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


def test_make_batch_single_and_shared_instruction(model, tokenizer):
    single = make_batch(single_observation(), tokenizer, model.config)
    assert single["image"].shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and single["image"].dtype == torch.uint8
    assert single["proprio"].shape == (1, 4)
    shared = make_batch(dict(observations(3), instruction="open the drawer"), tokenizer, model)
    assert torch.equal(shared["instruction_ids"][0], shared["instruction_ids"][2])
    with pytest.raises(TypeError, match="PolicyConfig"):
        make_batch(single_observation(), tokenizer, "cpu")


def test_policy_predict_shapes_bounds_and_batch_consistency(model, tokenizer):
    with torch.no_grad():
        model.action_head[-1].weight.normal_(std=2.0)  # push some actions past the bounds
    policy = Policy(model, tokenizer)
    chunk = policy.predict(single_observation())
    assert chunk.shape == (policy.chunk_len, 4) and chunk.dtype == np.float32
    obs = observations(4)
    chunks = policy.predict_batch(obs)
    assert chunks.shape == (4, policy.chunk_len, 4)
    assert chunks.min() >= -1.0 and chunks.max() <= 1.0
    first = {"image": obs["image"][0], "proprio": obs["proprio"][0], "instruction": obs["instruction"][0]}
    np.testing.assert_allclose(policy.predict(first), chunks[0], atol=1e-5)
    assert policy.image_size == IMAGE_SIZE and policy.camera == "corner"
    with pytest.raises(ValueError, match="predict_batch"):
        policy.predict(obs)


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


def test_seeded_sampling_is_reproducible(model, tokenizer):
    obs = single_observation()
    policy = Policy(model, tokenizer, seed=3)
    first = [policy.predict(obs, deterministic=False) for _ in range(2)]
    policy.seed(3)
    again = [policy.predict(obs, deterministic=False) for _ in range(2)]
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], first[1])
    other = Policy(model, tokenizer, seed=4).predict(obs, deterministic=False)
    assert not np.array_equal(other, first[0])
    np.testing.assert_array_equal(policy.predict(obs), Policy(model, tokenizer, seed=99).predict(obs))


# --------------------------------------------------------------------------- checkpoints


def test_save_load_round_trip(model, tokenizer, tmp_path):
    with torch.no_grad():
        model.action_head[-1].weight.normal_(std=0.3)
    path = tmp_path / "ckpt"
    save_pretrained(model, path, metadata={"step": 7, "task": "pick-place-v3"})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    document = json.loads((path / "config.json").read_text())
    assert document["format"] == "vlapt-policy" and document["format_version"] == 1
    assert document["metadata"] == {"step": 7, "task": "pick-place-v3"}

    loaded = load_policy(path, seed=5)
    original = Policy(model, tokenizer, seed=5)
    assert loaded.config == model.config and loaded.tokenizer == tokenizer
    obs = observations(3)
    np.testing.assert_array_equal(loaded.predict_batch(obs), original.predict_batch(obs))
    np.testing.assert_array_equal(
        loaded.predict_batch(obs, deterministic=False), original.predict_batch(obs, deterministic=False)
    )
    for name, tensor in load_pretrained(path).state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_save_overwrites_and_leaves_no_temp_dirs(model, tmp_path):
    path = tmp_path / "ckpt"
    save_pretrained(model, path, metadata={"version": 1})
    with torch.no_grad():
        model.log_std.fill_(-2.0)
    save_pretrained(Policy(model), path, metadata={"version": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert json.loads((path / "config.json").read_text())["metadata"] == {"version": 2}
    assert torch.all(load_pretrained(path).log_std == -2.0)


def test_save_rejects_unserialisable_metadata_without_touching_disk(model, tmp_path):
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_pretrained(model, tmp_path / "ckpt", metadata={"bad": object()})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def saved(model, tmp_path):
    path = tmp_path / "ckpt"
    save_pretrained(model, path)
    return path


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def test_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_pretrained(saved)


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(saved)


def test_corrupt_safetensors(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(saved)
    (saved / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_pretrained(saved)


def test_corrupt_json(saved):
    (saved / "config.json").write_text('{"format": "vlapt-policy", ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pretrained(saved)


def test_wrong_format_and_bad_fields(saved):
    document = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(dict(document, format="something-else")))
    with pytest.raises(CheckpointError, match="not a vlapt policy checkpoint"):
        load_pretrained(saved)
    (saved / "config.json").write_text(json.dumps(dict(document, policy={**document["policy"], "colour": 1})))
    with pytest.raises(CheckpointError, match="unknown policy config field.*colour"):
        load_pretrained(saved)
    (saved / "config.json").write_text(json.dumps(dict(document, policy={**document["policy"], "n_heads": 5})))
    with pytest.raises(CheckpointError, match="divisible by n_heads"):
        load_pretrained(saved)


def test_weights_that_do_not_match_config(saved):
    state = load_file(str(saved / "model.safetensors"))
    state["log_std"] = torch.zeros(3, 4)
    state["extra.weight"] = torch.zeros(1)
    del state["value_head.0.bias"]
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_pretrained(saved)
    message = str(info.value)
    assert "log_std: file (3, 4) vs config (5, 4)" in message
    assert "extra.weight" in message and "value_head.0.bias" in message


def test_file_inside_checkpoint_points_to_directory(saved):
    with pytest.raises(CheckpointError, match="pass its directory"):
        load_pretrained(saved / "config.json")


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


def test_tokenizer_rejects_bad_vocab():
    with pytest.raises(ValueError, match="must start with"):
        Tokenizer(["hello", "[PAD]"])
