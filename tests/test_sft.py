"""Supervised fine-tuning: outputs, learning, exact resume after a crash, continuing a policy, augmentation, bad input.

The behaviour-cloning loss itself is the policy's (`VLAPolicy.bc_loss`): tests/test_policies.py tests it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vlapt  # noqa: F401  (sets the headless GL backend before mujoco is imported)
import vlapt.algorithms.sft as sft_module
from vlapt.algorithms.checkpointing import latest_checkpoint, load_training_checkpoint
from vlapt.algorithms.sft import ModelConfig, SFTConfig, build_policy_config, dataset_spec, random_shift, train_sft
from vlapt.config import load_config, save_config
from vlapt.data import DatasetError, env_args, read_episodes
from vlapt.data.collect import CollectConfig, collect
from vlapt.data.dataset import ChunkDataset
from vlapt.envs import get_suite
from vlapt.interfaces import EnvConfig
from vlapt.policies import CheckpointError, load_policy
from vlapt.policies.vla import Tokenizer, VLAPolicy, policy_config_for_size

IMAGE_SIZE = 32  # tiny model: 3 stride-2 convs, 4x4 grid -> 32 px is the smallest valid size
TASK = "reach-v3"
SUITE = get_suite("mt10")


class _Crash(Exception):
    """Stands in for the process dying in the middle of training."""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft_demos") / "demos.hdf5"
    collect(
        CollectConfig(tasks=[TASK], demos_per_task=2, image_size=IMAGE_SIZE, num_workers=0, output=str(path)),
        progress=False,
    )
    return path


def _config(dataset, out, **kwargs) -> SFTConfig:
    defaults = dict(
        dataset=str(dataset), output_dir=str(out), model=ModelConfig(size="tiny"), steps=6, batch_size=8,
        checkpoint_every=3, log_every=1, warmup_steps=1, threads=1,
    )
    defaults.update(kwargs)
    return SFTConfig(**defaults)


def _state(path) -> dict[str, torch.Tensor]:
    return load_policy(path).state_dict()


def _all_samples(data: ChunkDataset) -> tuple[dict, dict]:
    """Every sample of a dataset: the raw observation batch a policy reads, and the whole sample."""
    sample = data.batch(np.arange(len(data)))
    observations = {"image": sample["image"].numpy(), "proprio": sample["proprio"].numpy(),
                    "instruction": sample["instruction"]}
    return observations, sample


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


# -- a training run and what it leaves behind ---------------------------------------------------------
def test_train_sft_writes_policy_config_checkpoints_and_tensorboard(dataset, tmp_path):
    out = tmp_path / "run"
    final = train_sft(_config(dataset, out), progress=False)

    assert final == out / "policy"
    policy = vlapt.load_policy(final)
    cfg = policy.config
    assert cfg.size == "tiny" and cfg.image_size == IMAGE_SIZE and cfg.chunk_len == 10 and cfg.camera == "corner"
    # normalisation statistics come from the dataset
    stats = ChunkDataset(read_episodes(dataset), 10).statistics()
    np.testing.assert_allclose(cfg.action_mean, stats["action_mean"], rtol=1e-6)
    np.testing.assert_allclose(cfg.proprio_std, stats["proprio_std"], rtol=1e-6)
    # the policy acts on an observation of the dataset's format
    demo = read_episodes(dataset)[0]
    chunk = policy.predict({"image": demo.images[0], "proprio": demo.proprio[0], "instruction": SUITE.instruction(TASK)})
    assert chunk.shape == (10, 4) and np.all(np.abs(chunk) <= 1.0)

    saved = load_config(SFTConfig, out / "config.yaml")
    assert saved.steps == 6 and saved.model.size == "tiny" and saved.dataset == str(dataset)

    # checkpoints every 3 steps; latest points at the last one, which holds the final weights
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000000006"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000000003", "step_000000006"]
    latest = latest_checkpoint(out)
    model, tensors, meta = load_training_checkpoint(latest)
    assert meta["step"] == 6
    assert any(k.startswith("optim.") for k in tensors) and "rng.torch" in tensors and "rng.augment" in tensors
    _assert_same_tensors(model.state_dict(), _state(final))
    # training moved the weights away from the step-3 checkpoint
    early = _state(out / "checkpoints" / "step_000000003")
    assert any(not torch.equal(early[k], v) for k, v in model.state_dict().items())

    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    log = (out / "train.log").read_text()
    assert "step 6 loss" in log and "final policy written" in log


def test_training_lowers_the_bc_loss_on_the_demonstrations(dataset, tmp_path):
    config = _config(  # BC alone, on chunks short enough for 60 steps to fit well
        dataset, tmp_path / "run", steps=60, batch_size=16, lr=3e-3, augment_shift=0, log_every=60, checkpoint_every=60,
        model=ModelConfig(size="tiny", chunk_len=5), aux_state_coef=0.0,
    )
    final = load_policy(train_sft(config, progress=False))

    torch.manual_seed(config.seed)  # train_sft builds its initial model right after seeding like this
    initial = VLAPolicy(final.config)

    observations, sample = _all_samples(ChunkDataset(read_episodes(dataset), final.chunk_len))

    def loss_of(model):
        model.eval()
        with torch.no_grad():
            loss, mse, _ = model.bc_loss(observations, sample["actions"], sample["action_pad"])
        return loss.item(), mse.item()

    (loss0, mse0), (loss1, mse1) = loss_of(initial), loss_of(final)
    assert math.isfinite(loss1)
    assert loss1 < loss0 - 0.5, (loss0, loss1)
    assert mse1 < 0.8 * mse0, (mse0, mse1)


# -- auxiliary state prediction --------------------------------------------------------------------------
def _aux_loss_on_all_samples(dataset, run_dir) -> float:
    model, tensors, _ = load_training_checkpoint(latest_checkpoint(run_dir))
    aux = {k[len("aux."):]: v for k, v in tensors.items() if k.startswith("aux.")}
    # no aux_state_dims given: the suite's auxiliary targets (MetaWorld: object and goal positions)
    assert aux["dims"].tolist() == list(SUITE.observation_spec(EnvConfig()).aux_targets) == [4, 5, 6, 36, 37, 38]
    head = sft_module.StatePredictionHead(model.config.d_model, aux["dims"].tolist(), aux["mean"], aux["std"])
    head.load_state_dict(aux)
    observations, sample = _all_samples(ChunkDataset(read_episodes(dataset), model.chunk_len))
    with torch.no_grad():
        features = model.eval().bc_loss(observations, sample["actions"], sample["action_pad"]).features
        return head.loss(features, sample["state"]).item()


def test_aux_state_head_learns_the_goal_and_stays_out_of_the_policy(dataset, tmp_path):
    quick = dict(batch_size=16, lr=3e-3, augment_shift=0, log_every=60, aux_state_coef=1.0)
    untrained = train_sft(_config(dataset, tmp_path / "one", steps=1, checkpoint_every=1, **quick), progress=False)
    trained = train_sft(_config(dataset, tmp_path / "many", steps=60, checkpoint_every=60, **quick), progress=False)
    before = _aux_loss_on_all_samples(dataset, tmp_path / "one")
    after = _aux_loss_on_all_samples(dataset, tmp_path / "many")
    # targets are normalised, so predicting their mean scores ~1; training must do much better
    assert before > 0.5 and after < 0.3 * before, (before, after)
    assert "aux_state" in (tmp_path / "many" / "train.log").read_text()
    # the saved policy has exactly the weights of one trained without the head
    plain = train_sft(_config(dataset, tmp_path / "plain", steps=1, checkpoint_every=1, aux_state_coef=0.0), progress=False)
    assert _state(untrained).keys() == _state(plain).keys()


def test_aux_state_needs_states_in_the_dataset(dataset, tmp_path):
    from vlapt.data.format import DemoWriter

    stateless = tmp_path / "stateless.hdf5"
    with DemoWriter(stateless, env_args(dataset)) as writer:
        for episode in read_episodes(dataset):
            episode.states = None
            writer.add(episode)
    with pytest.raises(ValueError, match="obs/state"):
        train_sft(_config(stateless, tmp_path / "run", aux_state_coef=1.0), progress=False)
    assert not (tmp_path / "run" / "policy").exists()


# -- resume ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("aux_state_coef", [0.0, 1.0], ids=["plain", "aux_state"])
def test_resume_after_a_crash_reproduces_the_uninterrupted_run(dataset, tmp_path, monkeypatch, aux_state_coef):
    # dropout and augmentation make the global torch RNG and the augmentation generator matter too
    kwargs = dict(model=ModelConfig(size="tiny", dropout=0.1), augment_shift=2, aux_state_coef=aux_state_coef)
    straight = train_sft(_config(dataset, tmp_path / "straight", **kwargs), progress=False)

    crashed = tmp_path / "crashed"
    original = sft_module._checkpoint
    calls = []

    def checkpoint_then_crash(*args, **kw):
        original(*args, **kw)
        calls.append(args[1])
        raise _Crash("killed right after the first checkpoint")

    monkeypatch.setattr(sft_module, "_checkpoint", checkpoint_then_crash)
    with pytest.raises(_Crash):
        train_sft(_config(dataset, crashed, **kwargs), progress=False)
    monkeypatch.setattr(sft_module, "_checkpoint", original)
    assert calls == [3]
    assert latest_checkpoint(crashed).name == "step_000000003"
    assert not (crashed / "policy").exists()

    resumed = train_sft(_config(dataset, crashed, **kwargs), progress=False)
    assert "resumed from" in (crashed / "train.log").read_text()
    _assert_same_tensors(_state(straight), _state(resumed))
    # the whole training state (optimizer moments, RNG streams) matches too
    _, a, meta_a = load_training_checkpoint(latest_checkpoint(tmp_path / "straight"))
    _, b, meta_b = load_training_checkpoint(latest_checkpoint(crashed))
    _assert_same_tensors(a, b)
    assert meta_a == meta_b
    assert any(k.startswith("aux.") for k in a) == (aux_state_coef > 0)


def test_resuming_with_the_auxiliary_loss_switched_is_a_clear_error(dataset, tmp_path):
    out = tmp_path / "run"
    train_sft(_config(dataset, out, steps=3, checkpoint_every=3, aux_state_coef=1.0), progress=False)
    with pytest.raises(ValueError, match="aux_state_coef"):
        train_sft(_config(dataset, out, steps=6, checkpoint_every=3, aux_state_coef=0.0), progress=False)


def test_resume_false_starts_over(dataset, tmp_path):
    out = tmp_path / "run"
    other = train_sft(_config(dataset, out, steps=3, checkpoint_every=3, seed=1), progress=False)
    other_weights = _state(other)
    fresh = train_sft(_config(dataset, tmp_path / "fresh", steps=3, checkpoint_every=3), progress=False)
    again = train_sft(_config(dataset, out, steps=3, checkpoint_every=3, resume=False), progress=False)
    # resuming would pick up the seed-1 weights of the finished run; starting over retrains from seed 0
    _assert_same_tensors(_state(fresh), _state(again))
    assert any(not torch.equal(other_weights[k], v) for k, v in _state(again).items())
    assert "resumed from" not in (out / "train.log").read_text()


@pytest.mark.parametrize("keep, kept", [(0, [1, 2, 3]), (1, [3]), (2, [2, 3])])
def test_keep_checkpoints_keeps_the_newest_n_or_all(dataset, tmp_path, keep, kept):
    train_sft(_config(dataset, tmp_path / "run", steps=3, checkpoint_every=1, keep_checkpoints=keep), progress=False)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert names == [f"step_{i:09d}" for i in kept]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == names[-1]


# -- what the policy is built from, and continuing one ------------------------------------------------------
def test_policy_config_records_the_datasets_observations_and_the_suites_vocabulary(dataset):
    meta = env_args(dataset)
    spec = dataset_spec(meta)
    assert (spec.camera, spec.image_size, spec.camera_fovy) == ("corner", IMAGE_SIZE, meta["camera_fovy"])
    assert spec.proprio_fields == tuple(meta["proprio_fields"]) and spec.action_dim == meta["action_dim"] == 4
    # datasets written before env_args recorded the suite and the dimensions: their suite's
    old = {k: v for k, v in meta.items() if k not in ("suite", "proprio_fields", "action_dim", "state_dim")}
    assert dataset_spec(old) == spec
    stats = ChunkDataset(read_episodes(dataset), 5).statistics()
    config = build_policy_config(ModelConfig(size="tiny", chunk_len=5), spec, stats, SUITE.vocabulary())
    assert (config.size, config.chunk_len, config.image_size, config.camera) == ("tiny", 5, IMAGE_SIZE, "corner")
    assert config.camera_fovy == meta["camera_fovy"] and config.proprio_fields == list(spec.proprio_fields)
    assert config.proprio_dim == 4 and config.action_mean == stats["action_mean"]
    # every instruction of the suite's family is readable, not only the dataset's tasks
    words = {word for task in get_suite("mt50").tasks for word in Tokenizer.split(SUITE.instruction(task))}
    assert words <= set(config.vocab)


def test_continuing_from_a_policy_keeps_its_architecture_and_checks_its_camera(dataset, tmp_path, monkeypatch):
    first = train_sft(_config(dataset, tmp_path / "first", steps=2, checkpoint_every=2,
                              model=ModelConfig(size="tiny", chunk_len=5)), progress=False)
    more = train_sft(_config(dataset, tmp_path / "more", steps=2, checkpoint_every=2, init_policy=str(first)),
                     progress=False)
    assert load_policy(more).config == load_policy(first).config  # chunk_len 5: `model` (10 by default) is unused
    start, continued = _state(first), _state(more)
    assert any(not torch.equal(start[k], continued[k]) for k in start), "it trained on"
    assert load_config(SFTConfig, tmp_path / "more" / "config.yaml").init_policy == str(first)

    other = VLAPolicy(policy_config_for_size("tiny", image_size=64, camera="corner"))
    other.save(tmp_path / "other")
    def no_reading(*args, **kwargs):
        raise AssertionError("demonstrations read before the camera check")

    monkeypatch.setattr("vlapt.algorithms.sft.read_episodes", no_reading)
    with pytest.raises(ValueError, match=r"rendered with .*image_size=32, init_policy .* with .*image_size=64"):
        train_sft(_config(dataset, tmp_path / "bad", init_policy=str(tmp_path / "other")), progress=False)
    assert not (tmp_path / "bad").exists()


def test_a_dataset_of_two_views_trains_a_policy_that_acts_on_them(tmp_path):
    path = tmp_path / "two_views.hdf5"
    collect(CollectConfig(tasks=[TASK], demos_per_task=1, image_size=IMAGE_SIZE, camera="corner+topview",
                          num_workers=0, output=str(path)), progress=False)
    assert read_episodes(path)[0].images.shape[1:] == (IMAGE_SIZE, 2 * IMAGE_SIZE, 3)
    policy = load_policy(train_sft(_config(path, tmp_path / "run", steps=2, augment_shift=2), progress=False))
    assert policy.config.camera == "corner+topview" and policy.config.views == 2
    env = SUITE.make_env(TASK, policy.observation_config(), chunk_len=policy.chunk_len)
    try:
        observation, _ = env.reset(options={"split": "eval", "index": 0})
        actions = policy.act(observation, deterministic=True).env_actions
        assert np.isfinite(np.asarray(actions)).all()
        env.step(np.asarray(actions)[0])
    finally:
        env.close()


# -- random shift --------------------------------------------------------------------------------------
def test_random_shift_keeps_shape_dtype_and_zero_pad_is_identity():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8, generator=gen)
    out = random_shift(images, 3, gen)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert random_shift(images, 0, gen) is images
    # same seed, same shifts
    a = random_shift(images, 3, torch.Generator().manual_seed(7))
    b = random_shift(images, 3, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_random_shift_moves_views_one_by_one_without_mixing_them():
    pad, n, size = 3, 32, 16
    images = torch.zeros(n, size, 2 * size, 3, dtype=torch.uint8)
    images[:, :, size:] = 200  # the right view is bright, the left dark: replicated edges keep each as it is
    images[:, 8, 7] = 255  # one marked pixel in each view
    images[:, 8, size + 7] = 0
    out = random_shift(images, pad, torch.Generator().manual_seed(0), views=2)
    assert out.shape == images.shape
    assert int(out[:, :, :size].max()) == 255 and int((out[:, :, :size] > 0).sum(dim=(1, 2, 3)).max()) == 3
    assert int((out[:, :, size:] == 0).sum(dim=(1, 2, 3)).min()) == 3 and int(out[:, :, size:].min()) == 0
    left = [tuple(torch.nonzero(out[k, :, :size].sum(-1))[0].tolist()) for k in range(n)]
    right = [tuple(torch.nonzero(out[k, :, size:].sum(-1) == 0)[0].tolist()) for k in range(n)]
    assert all(abs(y - 8) <= pad and abs(x - 7) <= pad for y, x in left + right)
    assert sum(a != b for a, b in zip(left, right)) > n // 2, "each view gets its own offset"


def test_random_shift_translates_each_image_by_at_most_pad():
    pad, n, size = 3, 64, 16
    images = torch.zeros(n, size, size, 3, dtype=torch.uint8)
    images[:, 8, 7] = torch.tensor([255, 128, 1], dtype=torch.uint8)  # one bright pixel, far from the borders
    out = random_shift(images, pad, torch.Generator().manual_seed(0))
    offsets = set()
    for k in range(n):
        lit = torch.nonzero(out[k].sum(-1))
        assert len(lit) == 1, "the pixel moves, nothing is smeared or duplicated"
        y, x = lit[0].tolist()
        assert torch.equal(out[k, y, x], images[0, 8, 7])
        assert abs(y - 8) <= pad and abs(x - 7) <= pad
        offsets.add((y - 8, x - 7))
    assert len(offsets) > 5, "offsets are random per image"


def test_random_shift_is_a_crop_of_the_edge_padded_image():
    pad = 2
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (8, 10, 12, 3), dtype=torch.uint8, generator=gen)
    out = random_shift(images, pad, torch.Generator().manual_seed(3)).numpy()
    padded = np.pad(images.numpy(), ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    for k in range(len(images)):
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if np.array_equal(out[k], padded[k, dy : dy + 10, dx : dx + 12])
        ]
        assert matches, f"image {k} is not a translated copy"


# -- bad input -------------------------------------------------------------------------------------------
def test_missing_dataset_is_a_helpful_error(tmp_path):
    missing = tmp_path / "nope.hdf5"
    with pytest.raises(DatasetError, match="not found") as info:
        train_sft(_config(missing, tmp_path / "run"), progress=False)
    assert isinstance(info.value, ValueError)
    assert str(missing) in str(info.value) and "vlapt collect" in str(info.value)


@pytest.mark.parametrize(
    "change,words",
    [
        (dict(steps=0), ["steps"]),
        (dict(batch_size=0), ["batch_size"]),
        (dict(augment_shift=-1), ["augment_shift"]),
        (dict(model=ModelConfig(size="tiny", chunk_len=0)), ["chunk_len"]),
        (dict(aux_state_coef=-1.0), ["aux_state_coef"]),
        (dict(aux_state_dims=[-1]), ["aux_state_dims", "-1"]),
        (dict(checkpoint_every=0), ["checkpoint_every"]),
        (dict(log_every=0), ["log_every"]),
    ],
    ids=["steps", "batch", "shift", "chunk", "aux_coef", "aux_dims", "checkpoint_every", "log_every"],
)
def test_invalid_config_is_rejected_before_work(tmp_path, change, words):
    with pytest.raises(ValueError) as info:
        train_sft(_config(tmp_path / "unused.hdf5", tmp_path / "run", **change), progress=False)
    for word in words:
        assert word in str(info.value)
    assert not (tmp_path / "run").exists()


def test_aux_state_dims_must_index_the_datasets_state(dataset, tmp_path):
    with pytest.raises(ValueError) as info:
        train_sft(_config(dataset, tmp_path / "run", aux_state_coef=1.0, aux_state_dims=[36, 39]), progress=False)
    assert "aux_state_dims" in str(info.value) and "39" in str(info.value)
    assert not (tmp_path / "run").exists(), "inputs are checked before the output directory is created"


def test_model_image_size_must_match_the_dataset(dataset, tmp_path):
    with pytest.raises(ValueError, match="differs"):
        train_sft(_config(dataset, tmp_path / "run", model=ModelConfig(size="tiny", image_size=64)), progress=False)
    assert not (tmp_path / "run").exists()


def test_corrupt_training_state_is_a_checkpoint_error(dataset, tmp_path):
    out = tmp_path / "run"
    train_sft(_config(dataset, out, steps=3, checkpoint_every=3), progress=False)
    ckpt = out / "checkpoints" / "step_000000003"
    state = ckpt / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.raises(CheckpointError) as info:
        train_sft(_config(dataset, out, steps=6), progress=False)
    assert isinstance(info.value, ValueError)
    assert str(ckpt) in str(info.value)


def test_corrupt_checkpoint_weights_are_a_checkpoint_error(dataset, tmp_path):
    out = tmp_path / "run"
    train_sft(_config(dataset, out, steps=3, checkpoint_every=3), progress=False)
    weights = out / "checkpoints" / "step_000000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        train_sft(_config(dataset, out, steps=6), progress=False)


def test_dangling_latest_pointer_is_a_checkpoint_error(dataset, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_000000042\n")
    save_config(_config(dataset, out), out / "config.yaml")  # the run's own record: only the pointer is broken
    with pytest.raises(CheckpointError, match="step_000000042"):
        train_sft(_config(dataset, out), progress=False)


def test_sft_in_bfloat16_trains_a_float32_policy(dataset, tmp_path):
    final = train_sft(_config(dataset, tmp_path / "bf16", precision="bf16", device="auto"), progress=False)
    policy = load_policy(final)
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    losses = [float(line.split(" loss ")[1].split()[0]) for line in (tmp_path / "bf16" / "train.log").read_text().splitlines()
              if " loss " in line]
    assert losses and all(math.isfinite(x) for x in losses)
    with pytest.raises(ValueError, match="precision must be fp32 or bf16"):
        _config(dataset, tmp_path / "x", precision="half").validate()
