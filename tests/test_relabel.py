"""Expert relabelling (DAgger) and training on it: labels, executed actions, the guards around both."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

import vlapt  # noqa: F401  (sets the headless GL backend before mujoco is imported)
from vlapt.algorithms.ppo_sbc import PPOConfig, train_ppo
from vlapt.algorithms.sft import ModelConfig, SFTConfig, train_sft
from vlapt.data import read_episodes
from vlapt.data.collect import CollectConfig, collect
from vlapt.data.relabel import RelabelConfig, relabel
from vlapt.evaluation import CheckpointAgent
from vlapt.envs.metaworld.env import MetaWorldVLAEnv
from vlapt.envs.metaworld.experts import FastScriptedExpert, ScriptedExpert
from vlapt.interfaces import EnvConfig, Episode
from vlapt.policies import load_policy

IMAGE_SIZE = 32
TASK = "reach-v3"
CHUNK = 3


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    path = tmp_path_factory.mktemp("relabel") / "demos.hdf5"
    collect(CollectConfig(tasks=[TASK], demos_per_task=2, image_size=IMAGE_SIZE, num_workers=0, output=str(path)),
            progress=False)
    return path


@pytest.fixture(scope="module")
def policy(demos, tmp_path_factory):
    out = tmp_path_factory.mktemp("relabel_sft") / "sft"
    config = SFTConfig(dataset=str(demos), output_dir=str(out), model=ModelConfig(size="tiny", chunk_len=CHUNK),
                       steps=2, batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=2, threads=1)
    return train_sft(config, progress=False)


@pytest.fixture(scope="module")
def relabelled(policy, tmp_path_factory):
    path = tmp_path_factory.mktemp("relabelled") / "relabelled.hdf5"
    summary = relabel(RelabelConfig(policy=str(policy), tasks=[TASK], episodes_per_task=2, max_episode_steps=8,
                                    num_workers=0, output=str(path)), CheckpointAgent(str(policy)), progress=False)
    return path, summary


def test_labels_are_the_experts_actions_at_the_states_the_policy_visited(policy, relabelled):
    path, summary = relabelled
    episodes = read_episodes(path)
    assert summary["tasks"][TASK]["episodes"] == 2 and len(episodes) == 2
    assert all(isinstance(e, Episode) and e.source == "relabelled" and e.split == "train" for e in episodes)
    assert [e.config_index for e in episodes] == [100_000, 100_001], "fresh configurations, past the demonstrations'"
    expert = ScriptedExpert()
    with h5py.File(path) as f:
        record = json.loads(f["data"].attrs["env_args"])["relabelled"]
    assert record["executed_policy"] == str(policy) and record["agent"] == f"checkpoint:{policy}" and record["deterministic"]
    agent = vlapt.load_policy(policy)
    for episode in episodes:
        assert len(episode) == 8, "an untrained policy runs to the step limit"
        labels = np.stack([expert.act_one(state, TASK) for state in episode.states])
        np.testing.assert_allclose(episode.actions, labels, atol=1e-6)
        # Re-run the policy alone in the same configuration, one chunk per decision: the stored
        # states are the ones *its* actions reach, not the expert's.
        env = MetaWorldVLAEnv(TASK, EnvConfig(image_size=IMAGE_SIZE, camera_fovy=30.0, privileged_state=True,
                                              max_episode_steps=8))
        obs, _ = env.reset(options={"split": "train", "index": episode.config_index})
        states, executed = [], []
        while len(states) < len(episode):
            chunk = agent.predict(obs)
            for action in chunk:
                states.append(obs["state"])
                executed.append(action)
                np.testing.assert_array_equal(obs["image"], episode.images[len(states) - 1])
                obs, _, terminated, truncated, _ = env.step(action[None])
                if terminated or truncated:
                    break
        env.close()
        np.testing.assert_allclose(np.stack(states), episode.states, atol=1e-5)
        assert not np.allclose(np.stack(executed), episode.actions, atol=1e-2), "executed actions are not the labels"
    with h5py.File(path) as f:
        meta = json.loads(f["data"].attrs["env_args"])
    assert meta["relabelled"]["executed_policy"] == str(policy) and meta["camera_fovy"] == 30.0
    assert meta["expert"] == "scripted" and meta["suite"] == "mt10" and meta["relabelled"]["first_config_index"] == 100_000


def test_sft_continues_from_a_policy_on_demos_plus_relabelled_episodes(demos, policy, relabelled, tmp_path):
    path, _ = relabelled
    config = SFTConfig(dataset=str(demos), extra_datasets=[str(path)], init_policy=str(policy),
                       output_dir=str(tmp_path / "dagger"), model=ModelConfig(size="tiny", chunk_len=7), steps=2,
                       batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=1, threads=1)
    final = train_sft(config, progress=False)
    before, after = load_policy(policy), load_policy(final)
    assert after.config == before.config, "architecture and normalisation come from init_policy (model.* unused)"
    assert after.config.chunk_len == CHUNK
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed, "training moved the weights"
    log = (tmp_path / "dagger" / "train.log").read_text()
    assert "4 episodes" in log, "both datasets were read"


def test_extra_dataset_or_init_policy_with_other_camera_settings_is_refused(demos, policy, tmp_path):
    other = tmp_path / "wide.hdf5"
    collect(CollectConfig(tasks=[TASK], demos_per_task=1, image_size=IMAGE_SIZE, camera_fovy=0.0, num_workers=0,
                          output=str(other)), progress=False)
    config = SFTConfig(dataset=str(demos), extra_datasets=[str(other)], output_dir=str(tmp_path / "run"),
                       model=ModelConfig(size="tiny"), steps=1, threads=1)
    with pytest.raises(ValueError, match="camera_fovy"):
        train_sft(config, progress=False)
    config = SFTConfig(dataset=str(other), init_policy=str(policy), output_dir=str(tmp_path / "run2"), steps=1, threads=1)
    with pytest.raises(ValueError, match=r"rendered with camera_fovy=0.0, init_policy .* with camera_fovy=30.0"):
        train_sft(config, progress=False)
    assert not (tmp_path / "run2").exists()


def test_relabelled_episodes_never_seed_the_self_bc_buffer(policy, relabelled, tmp_path):
    path, _ = relabelled
    out = tmp_path / "ppo"
    with pytest.raises(ValueError, match="vlapt collect"):
        train_ppo(PPOConfig(init_policy=str(policy), demos=str(path), tasks=[TASK], output_dir=str(out)), progress=False)
    assert not out.exists(), "refused before the run started"


def test_relabel_needs_a_policy_and_leaves_nothing_behind(tmp_path, policy):
    agent = CheckpointAgent(str(policy))
    with pytest.raises(ValueError, match="policy="):
        relabel(RelabelConfig(tasks=[TASK], output=str(tmp_path / "r.hdf5")), agent, progress=False)
    with pytest.raises(ValueError, match="valid experts: scripted, scripted-fast"):
        relabel(RelabelConfig(policy=str(policy), tasks=[TASK], expert="oracle", output=str(tmp_path / "r.hdf5")), agent,
                progress=False)
    with pytest.raises(ValueError, match="unknown expert 'oracle' for reach-v3"):
        relabel(RelabelConfig(policy=str(policy), tasks=[TASK], expert_per_task={TASK: "oracle"},
                              output=str(tmp_path / "r.hdf5")), agent, progress=False)
    with pytest.raises(ValueError, match="max_episode_steps"):
        relabel(RelabelConfig(policy=str(policy), tasks=[TASK], max_episode_steps=501, output=str(tmp_path / "r.hdf5")),
                agent, progress=False)
    with pytest.raises(Exception, match="missing|not found|does not exist|no such"):
        CheckpointAgent(str(tmp_path / "nope"))  # what `vlapt relabel` and the pipeline load policy= with
    assert list(tmp_path.iterdir()) == []


def test_relabelled_label_steps_masks_the_rest_of_relabelled_chunks_only(demos, relabelled):
    from vlapt.data.dataset import ChunkDataset

    episodes = read_episodes(demos) + read_episodes(relabelled[0])
    full, first = ChunkDataset(episodes, 4), ChunkDataset(episodes, 4, relabelled_label_steps=1)
    relabelled_rows = np.repeat([e.source == "relabelled" for e in episodes], [len(e) for e in episodes])
    assert relabelled_rows.any() and (~relabelled_rows).any()
    np.testing.assert_array_equal(first.action_pad[~relabelled_rows], full.action_pad[~relabelled_rows])
    assert not first.action_pad[relabelled_rows, 0].any(), "the expert's action at the decision state stays a target"
    assert first.action_pad[relabelled_rows, 1:].all()
    assert not full.action_pad[relabelled_rows][0].any()


def test_the_fast_expert_can_label_instead(policy, relabelled, tmp_path):
    path = tmp_path / "fast.hdf5"
    relabel(RelabelConfig(policy=str(policy), tasks=[TASK], episodes_per_task=1, max_episode_steps=8,
                          expert="scripted-fast", num_workers=0, output=str(path)), CheckpointAgent(str(policy)),
            progress=False)
    (episode,) = read_episodes(path)
    (scripted,) = read_episodes(relabelled[0], demos_per_task=1)
    assert episode.config_index == scripted.config_index == 100_000
    # the same policy visits the same states; only the labels differ
    np.testing.assert_allclose(episode.states, scripted.states, atol=1e-6)
    fast = FastScriptedExpert()
    np.testing.assert_allclose(episode.actions, np.stack([fast.act_one(s, TASK) for s in episode.states]), atol=1e-6)
    assert not np.allclose(episode.actions, scripted.actions, atol=1e-3)
    with h5py.File(path) as f:
        meta = json.loads(f["data"].attrs["env_args"])
    assert meta["expert"] == "scripted-fast" and "scripted-fast" in meta["policy"]


def test_experts_chosen_task_by_task_label_their_tasks(policy, relabelled, tmp_path):
    path = tmp_path / "per_task.hdf5"
    relabel(RelabelConfig(policy=str(policy), tasks=[TASK], episodes_per_task=1, max_episode_steps=8,
                          expert="scripted-fast", expert_per_task={TASK: "scripted"}, num_workers=0, output=str(path)),
            CheckpointAgent(str(policy)), progress=False)
    (episode,) = read_episodes(path)
    (scripted,) = read_episodes(relabelled[0], demos_per_task=1)
    np.testing.assert_allclose(episode.states, scripted.states, atol=1e-6)
    np.testing.assert_allclose(episode.actions, scripted.actions, atol=1e-6)  # the task's own expert labels it
    with h5py.File(path) as f:
        meta = json.loads(f["data"].attrs["env_args"])
    assert meta["expert"] == "scripted-fast" and meta["expert_per_task"] == {TASK: "scripted"}
    assert "scripted-fast; scripted on reach-v3" in meta["policy"]
