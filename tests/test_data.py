"""Demonstration data: collection, the HDF5 format, replay of stored actions, chunk targets, the chunk dataset."""

import json
import os

import h5py
import numpy as np
import pytest
import torch

import vlapt  # noqa: F401  (sets the headless GL backend before mujoco is imported)
import vlapt.data.collect as collect_module
from vlapt.data import DatasetError, DemoWriter, dataset_suite, env_args, read_episodes
from vlapt.data.chunks import chunk_targets
from vlapt.data.collect import CollectConfig, CollectionError, collect, dataset_env_args
from vlapt.data.dataset import ChunkDataset
from vlapt.data.format import check_writable, open_dataset
from vlapt.envs import get_suite
from vlapt.envs.metaworld.env import MetaWorldVLAEnv
from vlapt.interfaces import EnvConfig, Episode, UnknownTaskError

IMAGE_SIZE = 32


def _config(output, **kwargs) -> CollectConfig:
    defaults = dict(tasks=["reach-v3"], demos_per_task=2, image_size=IMAGE_SIZE, num_workers=0, output=str(output))
    defaults.update(kwargs)
    return CollectConfig(**defaults)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("demos") / "d.hdf5"
    summary = collect(_config(path), progress=False)
    return path, summary


def _episode(task="reach-v3", length=5, seed=0, states=True, index=0) -> Episode:
    rng = np.random.default_rng(seed)
    rewards = np.zeros(length, dtype=np.float32)
    rewards[-1] = 1.0
    return Episode(
        task=task,
        instruction=f"instruction of {task}",
        success=True,
        steps=length,
        split="train",
        config_index=index,
        config_seed=7,
        source="hand-made",
        images=rng.integers(0, 256, (length, 8, 8, 3), dtype=np.uint8),
        proprio=rng.standard_normal((length, 4)).astype(np.float32),
        actions=rng.uniform(-1, 1, (length, 4)).astype(np.float32),
        rewards=rewards,
        states=rng.standard_normal((length, 39)).astype(np.float32) if states else None,
    )


# -- collection round trip ------------------------------------------------------------------------
def test_collected_dataset_reads_back(dataset):
    path, summary = dataset
    assert summary["output"] == str(path)
    assert summary["tasks"] == {"reach-v3": {"kept": 2, "tried": 2}}
    episodes = read_episodes(path)
    assert len(episodes) == 2
    assert summary["env_steps"] == sum(len(e) for e in episodes)
    for e in episodes:
        T = len(e)
        assert T > 1
        assert isinstance(e, Episode) and e.steps == T and e.decision_steps is None
        assert e.task == "reach-v3" and e.instruction == get_suite("mt10").instruction("reach-v3")
        assert e.images.shape == (T, IMAGE_SIZE, IMAGE_SIZE, 3) and e.images.dtype == np.uint8
        assert e.images.std() > 0, "images should show a scene, not a blank frame"
        assert e.proprio.shape == (T, 4) and e.proprio.dtype == np.float32
        assert e.states.shape == (T, 39)
        assert e.actions.shape == (T, 4) and e.actions.dtype == np.float32
        assert np.all(e.actions >= -1.0) and np.all(e.actions <= 1.0)
        assert e.rewards.shape == (T,)
        assert e.rewards[-1] == 1.0 and np.count_nonzero(e.rewards) == 1
        assert e.success and e.split == "train" and e.config_seed == 0 and e.source == "scripted"
        # the stored proprioception is the first 4 entries of the privileged state
        np.testing.assert_array_equal(e.proprio, e.states[:, :4])
    assert [e.config_index for e in episodes] == [0, 1]


def test_collected_file_has_robomimic_layout(dataset):
    path, _ = dataset
    episodes = read_episodes(path)
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"data", "mask"}
        data = f["data"]
        assert sorted(data.keys()) == ["demo_0", "demo_1"]
        for i, e in enumerate(episodes):
            g = data[f"demo_{i}"]
            T = len(e)
            assert g["obs/image"].shape == (T, IMAGE_SIZE, IMAGE_SIZE, 3) and g["obs/image"].dtype == np.uint8
            assert g["obs/proprio"].shape == (T, 4)
            assert g["actions"].shape == (T, 4)
            np.testing.assert_array_equal(g["actions"][()], e.actions)
            np.testing.assert_array_equal(g["rewards"][()], e.rewards)
            dones = g["dones"][()]
            assert dones.shape == (T,) and dones[-1] == 1 and dones[:-1].sum() == 0
            assert int(g.attrs["num_samples"]) == T
            assert g.attrs["task"] == "reach-v3" and g.attrs["config_split"] == "train"
        assert int(data.attrs["total"]) == sum(len(e) for e in episodes)
        assert [n.decode() for n in f["mask/reach-v3"][()]] == ["demo_0", "demo_1"]
        args = json.loads(data.attrs["env_args"])
    assert args["camera"] == "corner" and args["image_size"] == IMAGE_SIZE
    assert args["tasks"] == ["reach-v3"] and args["config_split"] == "train"
    assert args["env_name"] == "metaworld" and args["suite"] == "mt10"
    assert args["action_dim"] == 4 and args["state_dim"] == 39
    assert args["proprio_fields"] == ["hand_x", "hand_y", "hand_z", "gripper"]
    assert args["expert"] == "scripted" and args["camera_fovy"] == 30.0
    assert env_args(path) == args
    assert dataset_suite(args) is get_suite("mt10")


def test_demos_per_task_selects_the_first(dataset):
    path, _ = dataset
    both = read_episodes(path)
    first = read_episodes(path, tasks=["reach-v3"], demos_per_task=1)
    assert len(first) == 1
    assert first[0].config_index == both[0].config_index
    np.testing.assert_array_equal(first[0].actions, both[0].actions)
    with pytest.raises(DatasetError, match="fewer than the 3"):
        read_episodes(path, demos_per_task=3)
    with pytest.raises(DatasetError, match="push-v3"):
        read_episodes(path, tasks=["push-v3"])


def test_demo_writer_round_trip(tmp_path):
    episodes = [_episode("reach-v3", 5, 0, index=3), _episode("push-v3", 7, 1, states=False, index=4),
                _episode("reach-v3", 1, 2, index=9)]
    path = tmp_path / "hand.hdf5"
    with DemoWriter(path, {"camera": "corner", "image_size": 8}) as writer:
        for e in episodes:
            writer.add(e)
    assert not [p for p in tmp_path.iterdir() if p.name != "hand.hdf5"], "no temp file left behind"
    # grouped by task in the order asked for, each task's demos in the order written
    back = read_episodes(path, tasks=["reach-v3", "push-v3"])
    expected = [episodes[0], episodes[2], episodes[1]]
    assert sorted((e.task, len(e)) for e in read_episodes(path)) == sorted((e.task, len(e)) for e in episodes)
    assert [(e.task, len(e)) for e in back] == [(e.task, len(e)) for e in expected]
    for got, want in zip(back, expected):
        for field in ("images", "proprio", "actions", "rewards"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
            assert getattr(got, field).dtype == getattr(want, field).dtype
        if want.states is None:
            assert got.states is None
        else:
            np.testing.assert_array_equal(got.states, want.states)
        for key in ("task", "instruction", "success", "steps", "split", "config_index", "config_seed", "source"):
            assert getattr(got, key) == getattr(want, key), key
    assert env_args(path) == {"camera": "corner", "image_size": 8}


def test_demo_writer_takes_only_per_step_episodes(tmp_path):
    """A chunked policy's recorded episode (one observation per decision) is not a per-step demonstration."""
    chunked = _episode(length=6)
    chunked.decision_steps = np.array([0, 3])
    per_step = _episode(length=3)
    per_step.decision_steps = np.arange(3)  # every step a decision, spelled out: the same as None
    with DemoWriter(tmp_path / "d.hdf5", {}) as writer:
        with pytest.raises(ValueError, match="per-step"):
            writer.add(chunked)
        assert writer.add(per_step) == "demo_0"
    assert [len(e) for e in read_episodes(tmp_path / "d.hdf5")] == [3]


def test_demo_writer_abort_leaves_nothing(tmp_path):
    path = tmp_path / "out" / "x.hdf5"
    with pytest.raises(RuntimeError, match="boom"):
        with DemoWriter(path, {}) as writer:
            writer.add(_episode())
            raise RuntimeError("boom")
    assert list(path.parent.iterdir()) == []


# -- replay ----------------------------------------------------------------------------------------
def test_stored_actions_replay_to_success_at_the_last_step(dataset):
    path, _ = dataset
    env = MetaWorldVLAEnv("reach-v3", EnvConfig(render=False, privileged_state=True), chunk_len=1)
    try:
        for e in read_episodes(path):
            obs, info = env.reset(options={"split": e.split, "index": e.config_index})
            assert info["configuration"]["split"] == "train"
            np.testing.assert_allclose(obs["state"], e.states[0], atol=1e-6)
            T = len(e)
            for t, action in enumerate(e.actions):
                _, reward, terminated, truncated, step_info = env.step(action)
                assert reward == e.rewards[t]
                if t < T - 1:
                    assert not terminated and not truncated and not step_info["success"], f"early success at {t}"
                    np.testing.assert_allclose(env.privileged_state(), e.states[t + 1], atol=1e-6)
            assert terminated and step_info["success"] and env.episode_steps == T
    finally:
        env.close()


# -- chunk targets ----------------------------------------------------------------------------------
def test_chunk_targets_follow_each_start_and_pad_past_the_end():
    actions = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)  # row t is [2t, 2t + 1]
    targets, pad = chunk_targets(actions, np.arange(5), 3)
    assert targets.shape == (5, 3, 2) and targets.dtype == np.float32 and pad.shape == (5, 3) and pad.dtype == bool
    np.testing.assert_array_equal(targets[1], actions[1:4])
    assert pad[:3].sum() == 0 and pad[3].tolist() == [False, False, True] and pad[4].tolist() == [False, True, True]
    np.testing.assert_array_equal(targets[4], actions[[4, 4, 4]])  # past the end: the last action, repeated
    # a chunked policy's decisions: one chunk per decision, from that decision's step
    targets, pad = chunk_targets(actions, np.array([0, 2, 4]), 2)
    np.testing.assert_array_equal(targets, actions[[[0, 1], [2, 3], [4, 4]]])
    assert pad.tolist() == [[False, False], [False, False], [False, True]]
    targets, pad = chunk_targets(actions.astype(np.float64), np.array([3]), 1)
    assert targets.dtype == np.float32 and targets.shape == (1, 1, 2) and not pad.any()
    with pytest.raises(ValueError, match="chunk_len"):
        chunk_targets(actions, np.arange(5), 0)
    with pytest.raises(ValueError, match="no actions"):
        chunk_targets(np.zeros((0, 2), np.float32), np.zeros(0, int), 2)


# -- ChunkDataset ------------------------------------------------------------------------------------
@pytest.fixture()
def two_episodes():
    return [_episode("reach-v3", 5, 0), _episode("push-v3", 3, 1)]


def test_chunk_dataset_samples(two_episodes):
    h = 4
    ds = ChunkDataset(two_episodes, chunk_len=h)
    assert len(ds) == 8
    all_actions = np.concatenate([e.actions for e in two_episodes])
    starts = [0, 0, 0, 0, 0, 5, 5, 5]
    ends = [5, 5, 5, 5, 5, 8, 8, 8]
    for i in range(len(ds)):
        sample = ds[i]
        episode = two_episodes[0] if i < 5 else two_episodes[1]
        t = i - starts[i]
        np.testing.assert_array_equal(sample["image"].numpy(), episode.images[t])
        np.testing.assert_array_equal(sample["proprio"].numpy(), episode.proprio[t])
        assert sample["instruction"] == episode.instruction
        actions = sample["actions"].numpy()
        pad = sample["action_pad"].numpy()
        assert actions.shape == (h, 4) and pad.shape == (h,) and pad.dtype == bool
        valid = min(h, ends[i] - i)
        np.testing.assert_array_equal(actions[:valid], all_actions[i:i + valid])
        np.testing.assert_array_equal(pad, np.arange(h) >= valid)
        # padding repeats the episode's last action, never the next episode's first
        for k in range(valid, h):
            np.testing.assert_array_equal(actions[k], episode.actions[-1])
    # explicit: last step of episode 0 does not see episode 1's actions
    assert ds[4]["action_pad"].tolist() == [False, True, True, True]
    assert not np.any(np.all(ds[4]["actions"].numpy()[1:] == two_episodes[1].actions[0], axis=1))


def test_chunk_dataset_batch_matches_getitem(two_episodes):
    ds = ChunkDataset(two_episodes, chunk_len=3)
    indices = np.array([7, 0, 4, 4, 2])
    batch = ds.batch(indices)
    items = [ds[int(i)] for i in indices]
    for key in ("image", "proprio", "actions", "action_pad"):
        assert torch.equal(batch[key], torch.stack([item[key] for item in items])), key
    assert batch["instruction"] == [item["instruction"] for item in items]


def test_chunk_dataset_statistics_and_validation(two_episodes):
    ds = ChunkDataset(two_episodes, chunk_len=2)
    stats = ds.statistics()
    assert set(stats) == {"proprio_mean", "proprio_std", "action_mean", "action_std"}
    for key in stats:
        assert len(stats[key]) == 4
    all_actions = np.concatenate([e.actions for e in two_episodes])
    np.testing.assert_allclose(stats["action_mean"], all_actions.mean(0), rtol=1e-5)
    assert min(stats["proprio_std"]) >= 1e-3
    with pytest.raises(ValueError, match="chunk_len"):
        ChunkDataset(two_episodes, chunk_len=0)
    with pytest.raises(ValueError, match="no episodes"):
        ChunkDataset([], chunk_len=2)


def test_chunk_dataset_from_file(dataset):
    path, _ = dataset
    episodes = read_episodes(path)
    ds = ChunkDataset.from_file(path, chunk_len=5, demos_per_task=1)
    assert len(ds) == len(episodes[0])
    assert ds[0]["image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)


# -- bad input -----------------------------------------------------------------------------------------
def test_existing_dataset_is_not_overwritten(tmp_path):
    path = tmp_path / "d.hdf5"
    path.write_bytes(b"precious")
    with pytest.raises(DatasetError, match="overwrite"):
        collect(_config(path), progress=False)
    with pytest.raises(DatasetError, match="overwrite"):
        DemoWriter(path, {})
    assert path.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.hdf5"]


def test_overwrite_replaces_an_existing_dataset(tmp_path):
    path = tmp_path / "d.hdf5"
    path.write_bytes(b"old")
    with DemoWriter(path, {}, overwrite=True) as writer:
        writer.add(_episode())
    assert len(read_episodes(path)) == 1


def test_directory_as_output(tmp_path):
    out = tmp_path / "adir"
    out.mkdir()
    with pytest.raises(DatasetError, match="directory"):
        collect(_config(out, overwrite=True), progress=False)
    assert out.is_dir() and list(out.iterdir()) == []


def test_directory_as_output_without_overwrite_says_directory(tmp_path):
    out = tmp_path / "adir"
    out.mkdir()
    with pytest.raises(DatasetError, match="is a directory"):
        check_writable(out, overwrite=False)


def test_output_under_a_file_is_rejected(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DatasetError, match="cannot create the output directory"):
        collect(_config(blocker / "d.hdf5"), progress=False)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_parent(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(DatasetError, match="not writable"):
            collect(_config(locked / "d.hdf5"), progress=False)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_failed_collection_leaves_no_file(tmp_path, monkeypatch):
    out_dir = tmp_path / "out"
    original = collect_module.DemoWriter.add
    calls = []

    def failing(writer, episode):
        calls.append(episode.config_index)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return original(writer, episode)

    monkeypatch.setattr(collect_module.DemoWriter, "add", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        collect(_config(out_dir / "d.hdf5"), progress=False)
    assert len(calls) == 2, "the first episode was written before the failure"
    assert list(out_dir.iterdir()) == [], "neither the dataset nor its temp file may remain"


def test_impossible_collection_gives_up_and_leaves_no_file(tmp_path):
    out_dir = tmp_path / "out"
    # 3 steps is far too short for the expert to reach the goal: every episode fails
    config = _config(out_dir / "d.hdf5", demos_per_task=1, max_episode_steps=3, max_attempts_factor=2)
    with pytest.raises(CollectionError, match="max_attempts_factor"):
        collect(config, progress=False)
    assert list(out_dir.iterdir()) == []


def test_collecting_from_the_fast_expert_records_it_and_its_shorter_demos(tmp_path, dataset):
    path = tmp_path / "fast.hdf5"
    collect(_config(path, expert="scripted-fast"), progress=False)
    assert env_args(path)["expert"] == "scripted-fast" and "scripted-fast" in env_args(path)["policy"]
    assert env_args(dataset[0])["expert"] == "scripted"
    fast, expert = read_episodes(path), read_episodes(dataset[0])
    assert [e.config_index for e in fast] == [e.config_index for e in expert]  # the same configurations
    assert all(f.success and len(f) < len(e) for f, e in zip(fast, expert))


def test_experts_chosen_task_by_task_act_as_each_tasks_own_expert(tmp_path, dataset):
    """collect.expert_per_task: the fast experts' episodes on the tasks it names, the default experts' elsewhere."""
    fast_path, mixed_path = tmp_path / "fast.hdf5", tmp_path / "mixed.hdf5"
    tasks = ["reach-v3", "drawer-open-v3"]
    collect(_config(fast_path, tasks=tasks, expert="scripted-fast"), progress=False)
    collect(_config(mixed_path, tasks=tasks, expert_per_task={"drawer-open-v3": "scripted-fast"}), progress=False)
    args = env_args(mixed_path)
    assert args["expert"] == "scripted" and args["expert_per_task"] == {"drawer-open-v3": "scripted-fast"}
    assert "scripted-fast on drawer-open-v3" in args["policy"]
    mixed, fast = read_episodes(mixed_path), read_episodes(fast_path)
    by_task = lambda episodes, task: [e for e in episodes if e.task == task]  # noqa: E731
    for got, want in [(by_task(mixed, "reach-v3"), read_episodes(dataset[0])),
                      (by_task(mixed, "drawer-open-v3"), by_task(fast, "drawer-open-v3"))]:
        assert [e.config_index for e in got] == [e.config_index for e in want]
        assert all(np.array_equal(g.actions, w.actions) for g, w in zip(got, want))
    assert by_task(fast, "reach-v3")[0].steps < by_task(mixed, "reach-v3")[0].steps  # reach kept the default expert


def test_invalid_collect_config_is_rejected_before_work(tmp_path):
    with pytest.raises(ValueError, match="valid cameras"):
        collect(_config(tmp_path / "d.hdf5", camera="ceiling"), progress=False)
    with pytest.raises(ValueError, match="demos_per_task"):
        collect(_config(tmp_path / "d.hdf5", demos_per_task=0), progress=False)
    with pytest.raises(ValueError, match="valid experts: scripted, scripted-fast"):
        collect(_config(tmp_path / "d.hdf5", expert="oracle"), progress=False)
    with pytest.raises(ValueError, match="unknown expert 'oracle' for push-v3"):
        collect(_config(tmp_path / "d.hdf5", expert_per_task={"push-v3": "oracle"}), progress=False)
    with pytest.raises(UnknownTaskError, match="push-v4"):
        collect(_config(tmp_path / "d.hdf5", expert_per_task={"push-v4": "scripted-fast"}), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_reading_bad_files(tmp_path):
    missing = tmp_path / "missing.hdf5"
    with pytest.raises(DatasetError, match="not found.*vlapt collect"):
        read_episodes(missing)
    text = tmp_path / "notes.hdf5"
    text.write_text("this is not hdf5")
    with pytest.raises(DatasetError, match="not a readable HDF5"):
        read_episodes(text)
    foreign = tmp_path / "foreign.hdf5"
    with h5py.File(foreign, "w") as f:
        f.create_dataset("x", data=np.arange(3))
    with pytest.raises(DatasetError, match="not a vlapt demonstration file"):
        read_episodes(foreign)
    with pytest.raises(DatasetError):
        read_episodes(tmp_path)  # a directory


def _damaged_copy(source, target, edit):
    """A copy of a dataset with ``edit(h5py.File)`` applied to it."""
    import shutil

    shutil.copyfile(source, target)
    with h5py.File(target, "a") as f:
        edit(f)
    return target


@pytest.mark.parametrize("damage,where", [
    (lambda f: f.__delitem__("mask"), "mask/"),
    (lambda f: f["data"].attrs.__delitem__("env_args"), "env_args"),
], ids=["no-mask", "no-env-args"])
def test_an_incomplete_file_is_a_dataset_error_that_says_what_to_do(dataset, tmp_path, damage, where):
    path = _damaged_copy(dataset[0], tmp_path / "damaged.hdf5", damage)
    for read in (read_episodes, env_args, open_dataset):
        with pytest.raises(DatasetError, match="collect it again") as caught:
            read(path)
        assert where in str(caught.value) and str(path) in str(caught.value)
    assert issubclass(DatasetError, ValueError), "the command line answers it with exit status 2"


@pytest.mark.parametrize("member", ["actions", "obs/image", "obs/proprio", "rewards"])
def test_a_demo_missing_an_array_is_a_dataset_error(dataset, tmp_path, member):
    path = _damaged_copy(dataset[0], tmp_path / "damaged.hdf5", lambda f: f["data/demo_1"].__delitem__(member))
    with pytest.raises(DatasetError, match=f"demo_1 has no {member}.*collect it again"):
        read_episodes(path)
    assert len(read_episodes(path, demos_per_task=1)) == 1, "the intact demo before it still reads"
    with pytest.raises(DatasetError, match="demo_1"):
        ChunkDataset.from_file(path, chunk_len=2)


def test_a_demo_whose_arrays_differ_in_length_is_a_dataset_error(dataset, tmp_path):
    def one_image_more(f):
        images = f["data/demo_1/obs/image"][()]
        del f["data/demo_1/obs/image"]
        f["data/demo_1/obs/image"] = np.concatenate([images, images[-1:]])

    path = _damaged_copy(dataset[0], tmp_path / "damaged.hdf5", one_image_more)
    with pytest.raises(DatasetError, match="demo_1 has rows of different lengths.*collect it again"):
        read_episodes(path)


def test_dataset_suite_names_the_suite_a_dataset_was_collected_in():
    args = dataset_env_args(get_suite("mt50"), ["door-lock-v3"], EnvConfig(image_size=IMAGE_SIZE), 3)
    assert args["suite"] == "mt50" and args["env_name"] == "metaworld" and args["config_seed"] == 3
    assert args["camera"] == "corner", "the suite's default camera is written, not an empty name"
    assert dataset_suite(args) is get_suite("mt50")
    assert dataset_suite({"suite": "mt10", "env_name": "metaworld"}) is get_suite("mt10")
    # files written before suites existed name only the simulator: MetaWorld's datasets are read as MT50's
    assert dataset_suite({"env_name": "metaworld"}) is get_suite("mt50")
    assert dataset_suite({}) is get_suite("mt50")
    with pytest.raises(UnknownTaskError, match="mt11"):
        dataset_suite({"suite": "mt11"})


def test_action_saturation_counts_the_steps_at_the_translation_bound(load_script, tmp_path, capsys):
    import h5py

    script = load_script("action_saturation")
    path = tmp_path / "demos.hdf5"
    with h5py.File(path, "w") as f:
        for name, task, actions in (("demo_0", "reach-v3", [[1.0, 0, 0, -1], [0.5, 0.2, 0, -1], [0, -0.995, 0, 1]]),
                                    ("demo_1", "push-v3", [[0.2, 0.3, 0.1, 1], [0.1, 0.1, 0.1, 1]])):
            group = f.create_group(f"data/{name}")
            group.attrs["task"] = task
            group["actions"] = np.array(actions, np.float32)  # the gripper (last column) never counts
    assert script.saturation(path, 0.99) == {"push-v3": (1, 2, 0), "reach-v3": (1, 3, 2)}
    assert script.main([str(path)]) == 0
    assert "| all | 2 | 5 | 0.40 |" in capsys.readouterr().out
    other = tmp_path / "other.hdf5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    assert script.main([str(other)]) == 2
    assert "no 'data' group" in capsys.readouterr().err
