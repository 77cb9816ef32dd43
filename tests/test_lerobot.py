"""LeRobot interop: LeRobotDataset v3 written and read (vlapt.data.lerobot), LeRobot policy directories loaded and
post-trained (vlapt.policies.lerobot).

The dataset tests need only pyarrow and av (the dev extra). The tests marked with ``needs_lerobot``
need the lerobot package itself; LeRobot 0.4.x (the last releases for Python 3.11: 0.5 and later require
3.12; checked with 0.4.4) requires torch < 2.11, so they skip wherever lerobot cannot be imported
beside the installed torch (docs/dataset_format.md and docs/policies.md say what that leaves unchecked).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow")
pytest.importorskip("av")

import vlapt  # noqa: F401,E402  (sets the headless GL backend before mujoco is imported)
from vlapt.algorithms.ppo_sbc import PPOConfig, keep_shortest, train_ppo  # noqa: E402
from vlapt.algorithms.sft import ModelConfig, SFTConfig, dataset_spec, train_sft  # noqa: E402
from vlapt.data import DatasetError, env_args, read_episodes  # noqa: E402
from vlapt.data import lerobot  # noqa: E402
from vlapt.data.buffer import DemoBuffer  # noqa: E402
from vlapt.data.collect import CollectConfig, collect  # noqa: E402
from vlapt.envs import get_suite  # noqa: E402
from vlapt.interfaces import Episode  # noqa: E402
from vlapt.policies import CheckpointError, load_policy  # noqa: E402

IMAGE_SIZE = 32
TASK = "reach-v3"
SUITE = get_suite("mt10")
ENV_ARGS = {"suite": "mt10", "env_name": "metaworld", "camera": "corner", "camera_fovy": 30.0, "image_size": IMAGE_SIZE,
            "proprio_fields": ["hand_x", "hand_y", "hand_z", "gripper"], "action_dim": 4, "state_dim": 39, "tasks": []}


def _lerobot_importable() -> bool:
    try:
        import lerobot.policies.act.modeling_act  # noqa: F401
        from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: F401
    except Exception:  # noqa: BLE001 - an ImportError, or a torchvision that does not load beside this torch
        return False
    return True


needs_lerobot = pytest.mark.skipif(not _lerobot_importable(), reason="the lerobot package (0.4.x needs torch < 2.11) "
                                   "cannot be imported beside this torch")


def _episode(task: str, n: int, seed: int, success: bool = True) -> Episode:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    images = np.stack([np.stack([(x * 4 + 3 * t) % 256, (y * 4) % 256, np.full_like(x, 40 + 5 * t)], -1)
                       for t in range(n)]).astype(np.uint8)
    rewards = np.zeros(n, np.float32)
    rewards[-1] = float(success)
    return Episode(task=task, instruction=SUITE.instruction(task), success=success, steps=n, split="train",
                   config_index=seed, config_seed=7, source="scripted", images=images,
                   proprio=rng.normal(size=(n, 4)).astype(np.float32), states=rng.normal(size=(n, 39)).astype(np.float32),
                   actions=rng.uniform(-1, 1, (n, 4)).astype(np.float32), rewards=rewards)


EPISODES = [_episode("reach-v3", 7, 0), _episode("push-v3", 5, 1), _episode("reach-v3", 9, 2), _episode("push-v3", 4, 3)]


def _write(path: Path, episodes=EPISODES, **kwargs) -> Path:
    with lerobot.LeRobotWriter(path, ENV_ARGS, fps=80, **kwargs) as writer:
        for episode in episodes:
            writer.add(episode)
    return path


def _by_task(episodes):
    return sorted(episodes, key=lambda e: (e.task, e.config_index))


def _assert_same(a: Episode, b: Episode, exact_images: bool = True) -> None:
    for field in ("task", "instruction", "success", "steps", "split", "config_index", "config_seed", "source"):
        assert getattr(a, field) == getattr(b, field), field
    for field in ("proprio", "states", "actions", "rewards"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert b.images.shape == a.images.shape and b.images.dtype == np.uint8
    if exact_images:
        np.testing.assert_array_equal(a.images, b.images)


# =========================================================================== datasets (pyarrow + av)
def test_png_round_trip_is_exact_with_boundaries_tasks_fps_and_stats(tmp_path):
    path = _write(tmp_path / "ds", images="png")
    back = read_episodes(path)  # through vlapt.data.format's dispatch
    assert [(e.task, e.steps) for e in back] == [("reach-v3", 7), ("reach-v3", 9), ("push-v3", 5), ("push-v3", 4)]
    for a, b in zip(_by_task(EPISODES), _by_task(back)):
        _assert_same(a, b)
    assert env_args(path) == ENV_ARGS
    info = json.loads((path / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 80 and info["video_path"] is None
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (4, 25, 2)
    assert info["features"]["observation.image"]["dtype"] == "image"
    assert info["features"]["observation.environment_state"]["shape"] == [39]
    stats = json.loads((path / "meta/stats.json").read_text())
    actions = np.concatenate([e.actions for e in EPISODES])
    np.testing.assert_allclose(stats["action"]["mean"], actions.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["action"]["std"], actions.std(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["action"]["min"], actions.min(0))
    assert stats["action"]["count"] == [25] and np.shape(stats["observation.image"]["mean"]) == (3, 1, 1)
    # the first demos of one task, in collection order
    first = read_episodes(path, tasks=["push-v3"], demos_per_task=1)
    assert len(first) == 1
    _assert_same(EPISODES[1], first[0])
    with pytest.raises(DatasetError, match="fewer than the 3"):
        read_episodes(path, tasks=["push-v3"], demos_per_task=3)
    with pytest.raises(DatasetError, match="no episodes of"):
        read_episodes(path, tasks=["door-open-v3"])


def test_tasks_are_read_in_their_recorded_order_not_in_the_order_workers_finished(tmp_path):
    # parallel collection writes episodes as workers finish them; the HDF5 reader orders tasks by env_args["tasks"]
    path = tmp_path / "interleaved"
    with lerobot.LeRobotWriter(path, {**ENV_ARGS, "tasks": ["push-v3", "reach-v3"]}, fps=80) as writer:
        for episode in EPISODES:  # reach, push, reach, push
            writer.add(episode)
    read = read_episodes(path)
    assert [(e.task, e.config_index) for e in read] == [("push-v3", 1), ("push-v3", 3), ("reach-v3", 0), ("reach-v3", 2)]
    unrecorded = _write(tmp_path / "unrecorded")  # no recorded task list: first appearance
    assert [e.task for e in read_episodes(unrecorded)] == ["reach-v3", "reach-v3", "push-v3", "push-v3"]


def test_video_round_trip_keeps_numbers_exact_and_frames_close(tmp_path):
    path = _write(tmp_path / "ds", images="video")
    back = read_episodes(path)
    for a, b in zip(_by_task(EPISODES), _by_task(back)):
        _assert_same(a, b, exact_images=False)
        error = np.abs(a.images.astype(int) - b.images).mean()
        assert error < 8, error  # lossy AV1, but each frame is its own episode's frame (a shifted one differs by far more)
    info = json.loads((path / "meta/info.json").read_text())
    assert info["features"]["observation.image"]["info"]["video.codec"] == "av1"
    videos = list((path / "videos/observation.image").rglob("*.mp4"))
    assert len(videos) == 1  # episodes follow one another in one file, as LeRobot stores them
    import pyarrow.parquet as pq

    rows = pq.read_table(path / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    starts = [r["videos/observation.image/from_timestamp"] for r in rows]
    ends = [r["videos/observation.image/to_timestamp"] for r in rows]
    assert starts[0] == 0 and starts[1:] == ends[:-1]
    assert [r["dataset_to_index"] - r["dataset_from_index"] for r in rows] == [7, 5, 9, 4]


def test_collect_format_lerobot_matches_the_hdf5_dataset(tmp_path):
    common = dict(tasks=[TASK], demos_per_task=2, image_size=IMAGE_SIZE, num_workers=0)
    collect(CollectConfig(output=str(tmp_path / "demos.hdf5"), **common), progress=False)
    summary = collect(CollectConfig(output=str(tmp_path / "demos_lr"), format="lerobot", **common), progress=False)
    assert summary["output"] == str(tmp_path / "demos_lr")
    hdf5, lr = read_episodes(tmp_path / "demos.hdf5"), read_episodes(tmp_path / "demos_lr")
    assert len(hdf5) == len(lr) == 2
    for a, b in zip(hdf5, lr):
        _assert_same(a, b)
    assert env_args(tmp_path / "demos_lr") == env_args(tmp_path / "demos.hdf5")
    assert dataset_spec(env_args(tmp_path / "demos_lr")) == dataset_spec(env_args(tmp_path / "demos.hdf5"))
    info = json.loads((tmp_path / "demos_lr/meta/info.json").read_text())
    assert info["fps"] == SUITE.fps and info["features"]["observation.image"]["dtype"] == "image"  # lossless by default
    assert (tmp_path / "demos_lr" / "config.yaml").is_file()  # the resolved collect config, as for HDF5


@pytest.fixture(scope="module")
def lerobot_demos(tmp_path_factory):
    path = tmp_path_factory.mktemp("lerobot_demos") / "demos"
    collect(CollectConfig(tasks=[TASK], demos_per_task=2, image_size=IMAGE_SIZE, num_workers=0, output=str(path),
                          format="lerobot", lerobot_images="video"), progress=False)
    return path


def test_sft_and_the_self_bc_buffer_read_a_lerobot_dataset(lerobot_demos, tmp_path):
    policy_dir = train_sft(SFTConfig(dataset=str(lerobot_demos), output_dir=str(tmp_path / "sft"), model=ModelConfig(size="tiny"),
                                     steps=2, batch_size=8, checkpoint_every=2, log_every=1, warmup_steps=1, threads=1),
                           progress=False)
    policy = load_policy(policy_dir)
    assert policy.observation_config().camera_fovy == 30.0 and policy.config.image_size == IMAGE_SIZE
    demos = read_episodes(lerobot_demos, [TASK])
    buffer = DemoBuffer([TASK], capacity=5, chunk_len=policy.chunk_len)
    for key, demo in enumerate(demos):
        keep_shortest(buffer, demo, demo_key=key)
    assert buffer.stats()["episodes"] == 2
    sample = buffer.sample(4, np.random.default_rng(0))
    assert torch.isfinite(policy.bc_loss(sample, sample["actions"], sample["action_pad"]).loss)


def test_a_dataset_whose_features_do_not_match_is_refused_naming_them(tmp_path):
    keys = lerobot.FeatureKeys(image="observation.images.top", proprio="observation.joints")
    path = _write(tmp_path / "other", keys=keys, images="png")
    info = json.loads((path / "meta/info.json").read_text())
    del info["vlapt"]  # as a dataset LeRobot itself recorded: no mapping written down
    (path / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match=r"image feature 'observation.image' is missing.*observation.images.top \(image"):
        read_episodes(path)
    back = lerobot.read_episodes(path, keys=keys, suite=SUITE)  # mapped explicitly, it reads
    assert sorted(e.task for e in back) == ["push-v3", "push-v3", "reach-v3", "reach-v3"]  # tasks from the instructions
    info["codebase_version"] = "v2.1"
    (path / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match="convert_dataset_v21_to_v30"):
        read_episodes(path)
    plain = tmp_path / "plain_dir"
    plain.mkdir()
    with pytest.raises(DatasetError, match="not a LeRobot dataset"):
        env_args(plain)


def test_reads_a_dataset_declared_as_lerobot_records_metaworld(tmp_path):
    """As lerobot/metaworld_mt50 (v3.0) declares its features: channel-first image shape, names as a dict, no vlapt
    columns; the instruction strings are all vlapt has to name the task by."""
    import pyarrow.parquet as pq

    path = _write(tmp_path / "ds", images="png")
    info = json.loads((path / "meta/info.json").read_text())
    del info["vlapt"]
    info["features"]["observation.image"].update(shape=[3, IMAGE_SIZE, IMAGE_SIZE], names=["channels", "height", "width"])
    info["features"]["observation.state"]["names"] = {"axes": None}
    (path / "meta/info.json").write_text(json.dumps(info))
    episodes = next((path / "meta/episodes").rglob("*.parquet"))
    table = pq.read_table(episodes)
    pq.write_table(table.select([c for c in table.column_names if not c.startswith("vlapt/")]), episodes)
    assert env_args(path)["image_size"] == IMAGE_SIZE and env_args(path)["env_name"] == "metaworld"
    back = read_episodes(path, tasks=["push-v3"])  # task names recovered from the suite's instructions
    assert [e.steps for e in back] == [5, 4] and back[0].source == "lerobot"
    np.testing.assert_array_equal(back[0].images, EPISODES[1].images)


def _images_as_files(path: Path, name=lambda row: f"images/frame_{row:06d}.png") -> None:
    """Rewrite a PNG dataset as one saved without embedding its images: each frame a file its ``path`` names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for parquet in (path / "data").rglob("*.parquet"):
        table = pq.read_table(parquet)
        column = table.schema.get_field_index("observation.image")
        field = table.schema.field(column)
        frames = table.column(column).to_pylist()
        for row, frame in enumerate(frames):
            (path / name(row)).parent.mkdir(parents=True, exist_ok=True)
            (path / name(row)).write_bytes(frame["bytes"])
        moved = pa.array([{"bytes": None, "path": name(row)} for row in range(len(frames))], type=field.type)
        pq.write_table(table.set_column(column, field, moved), parquet)


def test_image_frames_stored_as_files_inside_the_dataset_are_read(tmp_path):
    path = _write(tmp_path / "ds", images="png")
    _images_as_files(path)
    for a, b in zip(_by_task(EPISODES), _by_task(read_episodes(path))):
        _assert_same(a, b)
    outside = _write(tmp_path / "outside", images="png")
    _images_as_files(outside, name=lambda row: f"../ds/images/frame_{row:06d}.png")  # files, but not its own
    with pytest.raises(DatasetError, match="not a file inside the dataset"):
        read_episodes(outside)


def test_a_damaged_dataset_is_refused(tmp_path):
    path = _write(tmp_path / "ds", images="video")
    next((path / "videos").rglob("*.mp4")).write_bytes(b"not a video")
    with pytest.raises(DatasetError, match="cannot be decoded|damaged"):
        read_episodes(path)
    path = _write(tmp_path / "ds2", images="png")
    next((path / "data").rglob("*.parquet")).unlink()
    with pytest.raises(DatasetError, match="missing"):
        read_episodes(path)
    path = _write(tmp_path / "ds3", images="png")
    info = json.loads((path / "meta" / "info.json").read_text())
    info["vlapt"]["keys"]["depth"] = "observation.depth"  # a key a newer writer might record
    (path / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match="feature keys this vlapt does not know.*upgrade"):
        read_episodes(path)


def test_the_writer_publishes_whole_datasets_only(tmp_path):
    target = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        with lerobot.LeRobotWriter(target, ENV_ARGS, images="png") as writer:
            writer.add(EPISODES[0])
            raise RuntimeError("the process dies mid-collection")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    _write(target, images="png")
    with pytest.raises(DatasetError, match="already exists"):
        lerobot.LeRobotWriter(target, ENV_ARGS)
    _write(target, episodes=EPISODES[:1], images="png", overwrite=True)
    assert len(read_episodes(target)) == 1
    with pytest.raises(DatasetError, match="directory"):
        lerobot.check_writable(tmp_path / "demos.hdf5", overwrite=False)
    with pytest.raises(ValueError, match="format must be one of"):
        CollectConfig(format="zarr").validate()
    with pytest.raises(lerobot.LeRobotDatasetError, match="shapes differ"):
        with lerobot.LeRobotWriter(tmp_path / "mixed", ENV_ARGS, images="png") as writer:
            writer.add(EPISODES[0])
            writer.add(dataclasses.replace(EPISODES[1], proprio=np.zeros((5, 7), np.float32)))
    assert not (tmp_path / "mixed").exists()


def test_overwrite_replaces_a_dataset_never_a_folder_of_other_things(tmp_path):
    (tmp_path / "datasets" / "other").mkdir(parents=True)
    (tmp_path / "datasets" / "other" / "keep.txt").write_text("not a dataset")
    with pytest.raises(lerobot.LeRobotDatasetError, match="not a LeRobot dataset"):
        lerobot.LeRobotWriter(tmp_path / "datasets", ENV_ARGS, overwrite=True)
    assert (tmp_path / "datasets" / "other" / "keep.txt").read_text() == "not a dataset"


def test_a_dataset_written_meanwhile_to_the_same_path_is_not_replaced(tmp_path):
    target = tmp_path / "ds"
    with pytest.raises(lerobot.LeRobotDatasetError, match="appeared while"):
        with lerobot.LeRobotWriter(target, ENV_ARGS, images="png") as writer:
            writer.add(EPISODES[0])
            (target / "meta").mkdir(parents=True)  # another collection to the same path publishes first
            (target / "meta" / "info.json").write_text("{}")
    assert (target / "meta" / "info.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"], "the unpublished dataset's files are removed"


def test_a_failure_while_publishing_leaves_nothing_behind(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lerobot, "_write_tasks", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _write(tmp_path / "ds", images="video")
    assert list(tmp_path.iterdir()) == []


def test_images_that_are_not_uint8_are_refused_before_anything_is_written(tmp_path):
    with lerobot.LeRobotWriter(tmp_path / "ds", ENV_ARGS, images="png") as writer:
        with pytest.raises(lerobot.LeRobotDatasetError, match="uint8"):
            writer.add(dataclasses.replace(EPISODES[0], images=EPISODES[0].images / 255.0))
        writer.add(EPISODES[1])  # the refused episode left no rows behind
    (episode,) = read_episodes(tmp_path / "ds")
    _assert_same(episode, EPISODES[1])


def test_load_policy_names_the_lerobot_types_it_cannot_post_train(tmp_path, monkeypatch):
    for policy_type, reason in (("diffusion", "likelihood"), ("smolvla", "flow-matching"), ("pi0", "flow-matching")):
        directory = tmp_path / policy_type
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({"type": policy_type}))
        with pytest.raises(CheckpointError, match=rf"LeRobot '{policy_type}' policy.*{reason}"):
            load_policy(directory)
    act = tmp_path / "act"
    act.mkdir()
    (act / "config.json").write_text(json.dumps({"type": "act"}))
    monkeypatch.setitem(sys.modules, "lerobot", None)  # as where LeRobot is not installed
    with pytest.raises(CheckpointError, match=r"needs the lerobot package.*vlapt\[lerobot\]"):
        load_policy(act)


# =========================================================================== with LeRobot itself
@needs_lerobot
def test_lerobots_own_loader_reads_what_vlapt_writes(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    frames = np.concatenate([e.images for e in EPISODES])
    actions = np.concatenate([e.actions for e in EPISODES])
    state = np.concatenate([e.proprio for e in EPISODES])
    for images in ("png", "video"):
        path = _write(tmp_path / images, images=images)
        ds = LeRobotDataset("local/vlapt-test", root=path, video_backend="pyav")
        assert (len(ds), ds.num_episodes, ds.fps) == (25, 4, 80)
        for index in (0, 6, 7, 11, 24):
            item = ds[index]
            np.testing.assert_array_equal(item["action"].numpy(), actions[index])
            np.testing.assert_array_equal(item["observation.state"].numpy(), state[index])
            image = (item["observation.image"].permute(1, 2, 0).numpy() * 255).round()
            tolerance = 0.5 if images == "png" else 8
            assert np.abs(image - frames[index]).mean() < tolerance
            episode = EPISODES[int(item["episode_index"])]
            assert item["task"] == episode.instruction and int(item["frame_index"]) < episode.steps
        chunked = LeRobotDataset("local/vlapt-test", root=path, video_backend="pyav",
                                 delta_timestamps={"action": [i / 80 for i in range(4)]})
        item = chunked[10]  # frame 3 of the 5-step second episode: two actions left, then padding
        assert item["action_is_pad"].tolist() == [False, False, True, True]
        assert set(ds.meta.stats) >= {"observation.image", "observation.state", "action"}


def _tiny_act(path: Path, image_size: int = IMAGE_SIZE, **overrides) -> Path:
    """A small ACT built from its config (no hub), saved as LeRobot saves policies: weights, config, processors."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.act.configuration_act import ACTConfig
    from lerobot.policies.act.modeling_act import ACTPolicy
    from lerobot.policies.act.processor_act import make_act_pre_post_processors

    torch.manual_seed(0)
    inputs = {"observation.image": PolicyFeature(FeatureType.VISUAL, (3, image_size, image_size)),
              "observation.state": PolicyFeature(FeatureType.STATE, (4,))}
    inputs.update(overrides.pop("extra_inputs", {}))
    settings = dict(chunk_size=8, n_action_steps=5, dim_model=32, n_heads=2, dim_feedforward=64, n_encoder_layers=1,
                    n_decoder_layers=1, n_vae_encoder_layers=1, latent_dim=8, pretrained_backbone_weights=None,
                    device="cpu")
    settings.update(overrides)
    config = ACTConfig(input_features=inputs, output_features={"action": PolicyFeature(FeatureType.ACTION, (4,))},
                       **settings)
    policy = ACTPolicy(config)
    stats = {"observation.image": {"mean": torch.full((3, 1, 1), 0.4), "std": torch.full((3, 1, 1), 0.2)},
             "observation.state": {"mean": torch.full((4,), 0.1), "std": torch.full((4,), 0.3)},
             "action": {"mean": torch.full((4,), 0.05), "std": torch.full((4,), 0.5)}}
    pre, post = make_act_pre_post_processors(config, stats)
    for part in (policy, pre, post):
        part.save_pretrained(path)
    return path


def _observations(n: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            "proprio": rng.normal(size=(n, 4)).astype(np.float32), "instruction": ["reach the goal"] * n}


@needs_lerobot
def test_act_policy_acts_as_lerobot_does_and_saves_in_lerobots_layout(tmp_path):
    from lerobot.policies.act.modeling_act import ACTPolicy
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action

    path = _tiny_act(tmp_path / "act")
    policy = load_policy(path)
    assert (policy.chunk_len, policy.action_dim, policy.policy_type) == (5, 4, "lerobot-act")
    obs = _observations()
    sample = policy.act(obs, deterministic=True)
    # LeRobot's own inference: its saved preprocessor, ACT's chunk, its saved postprocessor
    lerobot_policy = ACTPolicy.from_pretrained(str(path)).eval()
    pre = PolicyProcessorPipeline.from_pretrained(str(path), config_filename="policy_preprocessor.json")
    post = PolicyProcessorPipeline.from_pretrained(str(path), config_filename="policy_postprocessor.json",
                                                   to_transition=policy_action_to_transition,
                                                   to_output=transition_to_policy_action)
    batch = {"observation.image": torch.from_numpy(obs["image"]).permute(0, 3, 1, 2).float() / 255,
             "observation.state": torch.from_numpy(obs["proprio"])}
    with torch.no_grad():
        reference = post(lerobot_policy.predict_action_chunk(pre(batch)))
    np.testing.assert_allclose(sample.env_actions, reference[:, :5].numpy(), atol=1e-5)
    # the Gaussian: the mode has the highest log-likelihood, and evaluate agrees with act
    noisy = policy.act(obs, deterministic=False, generator=torch.Generator().manual_seed(0))
    assert np.all(sample.log_prob > noisy.log_prob)
    np.testing.assert_allclose(policy.evaluate(obs, noisy.actions).log_prob.detach().numpy(), noisy.log_prob, rtol=1e-5)
    loss = policy.bc_loss(obs, torch.from_numpy(noisy.env_actions), torch.zeros(3, 5, dtype=torch.bool))
    loss.loss.backward()
    assert policy.lerobot_policy.model.action_head.weight.grad.abs().sum() > 0 and loss.features.shape == (3, 32)
    assert {id(p) for p in policy.param_groups()["critic"]} == {id(p) for p in policy.value_head.parameters()}
    # saved: LeRobot's layout (LeRobot loads it) plus vlapt's heads, reloaded exactly
    policy.reset_exploration(-2.0)
    saved = policy.save(tmp_path / "saved", metadata={"note": "test"})
    assert {p.name for p in saved.iterdir()} >= {"config.json", "model.safetensors", "policy_preprocessor.json",
                                                 "policy_postprocessor.json", "vlapt_policy.json", "vlapt_heads.safetensors"}
    again = load_policy(saved)
    assert again.exploration_std() == pytest.approx(np.exp(-2.0))
    np.testing.assert_array_equal(again.act(obs, deterministic=True).env_actions, sample.env_actions)
    np.testing.assert_array_equal(again.value(obs), policy.value(obs))
    ACTPolicy.from_pretrained(str(saved))
    (saved / "vlapt_heads.safetensors").write_bytes(b"corrupt")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_policy(saved)


@needs_lerobot
def test_act_configurations_vlapt_cannot_serve_are_refused(tmp_path):
    from lerobot.configs.types import FeatureType, PolicyFeature

    path = _tiny_act(tmp_path / "env_state", extra_inputs={
        "observation.environment_state": PolicyFeature(FeatureType.ENV, (39,))})
    with pytest.raises(CheckpointError, match="privileged simulator state"):
        load_policy(path)
    path = _tiny_act(tmp_path / "ensemble", n_action_steps=1, temporal_ensemble_coeff=0.01)
    with pytest.raises(CheckpointError, match="temporal_ensemble_coeff"):
        load_policy(path)
    policy = load_policy(_tiny_act(tmp_path / "plain"))
    with pytest.raises(ValueError, match=r"observation 'proprio' must have shape \(B, 4\)"):
        policy.act({**_observations(), "proprio": np.zeros((3, 7), np.float32)})


@needs_lerobot
def test_chunked_ppo_post_trains_a_lerobot_act_policy(lerobot_demos, tmp_path):
    from lerobot.policies.act.modeling_act import ACTPolicy

    path = _tiny_act(tmp_path / "act")
    # as LeRobot's training writes it: the run's config names the dataset, here one vlapt wrote
    (path / "train_config.json").write_text(json.dumps({"dataset": {"repo_id": "local/demos", "root": str(lerobot_demos)}}))
    start = load_policy(path)
    assert start.observation_config().camera_fovy == 30.0  # the dataset's camera, read through train_config.json
    config = PPOConfig(init_policy=str(path), demos=str(lerobot_demos), tasks=[TASK], output_dir=str(tmp_path / "ppo"),
                       envs_per_task=1, horizon=4, num_workers=0, total_env_steps=60, epochs=2, minibatch_size=8,
                       bc_batch_size=8, checkpoint_every=1, eval_every=0, eval_episodes=1, value_warmup_iterations=1,
                       threads=1)
    final = train_ppo(config, progress=False)
    history = json.loads((tmp_path / "ppo" / "history.json").read_text())
    assert len(history) == 3 and all(np.isfinite(row["bc_loss"]) for row in history)
    trained = load_policy(final)
    before = start.lerobot_policy.model.action_head.weight
    assert not torch.equal(before, trained.lerobot_policy.model.action_head.weight)
    assert not torch.equal(start.value_head[0].weight, trained.value_head[0].weight)
    ACTPolicy.from_pretrained(str(final))  # the post-trained policy is a LeRobot policy again
    assert json.loads((final / "vlapt_policy.json").read_text())["metadata"]["trained_by"].startswith("vlapt train")


@needs_lerobot
@pytest.mark.parametrize("mode,stats", [
    ("MIN_MAX", {"min": torch.tensor([-1.0, 0.0]), "max": torch.tensor([3.0, 0.0])}),
    ("QUANTILES", {"q01": torch.tensor([-2.0, 1.0]), "q99": torch.tensor([2.0, 5.0])}),
    ("MEAN_STD", {"mean": torch.tensor([0.5, -1.0]), "std": torch.tensor([2.0, 0.1])}),
])
def test_normalisation_is_lerobots(mode, stats):
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.processor.normalize_processor import NormalizerProcessorStep, UnnormalizerProcessorStep

    from vlapt.policies.lerobot import Normalization

    features = {"observation.state": PolicyFeature(FeatureType.STATE, (2,))}
    norm_map = {FeatureType.STATE: NormalizationMode(mode)}
    theirs = NormalizerProcessorStep(features=features, norm_map=norm_map, stats={"observation.state": stats})
    inverse = UnnormalizerProcessorStep(features=features, norm_map=norm_map, stats={"observation.state": stats})
    ours = Normalization({"observation.state": "STATE"}, {"STATE": mode}, {"observation.state": stats}, 1e-8)
    x = torch.tensor([[0.3, 2.0], [-4.0, 0.0]])
    np.testing.assert_allclose(ours("observation.state", x), theirs._normalize_observation({"observation.state": x},
                               inverse=False)["observation.state"], rtol=1e-6)
    np.testing.assert_allclose(ours("observation.state", x, inverse=True), inverse._normalize_observation(
        {"observation.state": x}, inverse=True)["observation.state"], rtol=1e-6)
