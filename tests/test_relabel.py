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
from vlapt.envs.experts import ScriptedExpert
from vlapt.envs.metaworld_env import EnvConfig, MetaWorldVLAEnv
from vlapt.models import load_pretrained

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
                                    num_workers=0, output=str(path)), progress=False)
    return path, summary


def test_labels_are_the_experts_actions_at_the_states_the_policy_visited(policy, relabelled):
    path, summary = relabelled
    episodes = read_episodes(path)
    assert summary["tasks"][TASK]["episodes"] == 2 and len(episodes) == 2
    assert all(e.source == "relabelled" and e.config_split == "train" for e in episodes)
    assert [e.config_index for e in episodes] == [100_000, 100_001], "fresh configurations, past the demonstrations'"
    expert = ScriptedExpert()
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


def test_sft_continues_from_a_policy_on_demos_plus_relabelled_episodes(demos, policy, relabelled, tmp_path):
    path, _ = relabelled
    config = SFTConfig(dataset=str(demos), extra_datasets=[str(path)], init_policy=str(policy),
                       output_dir=str(tmp_path / "dagger"), model=ModelConfig(size="tiny", chunk_len=7), steps=2,
                       batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=1, threads=1)
    final = train_sft(config, progress=False)
    before, after = load_pretrained(policy), load_pretrained(final)
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
    with pytest.raises(ValueError, match=r"init_policy .* camera_fovy \(30.0 vs 0.0\)"):
        train_sft(config, progress=False)


def test_relabelled_episodes_never_seed_the_self_bc_buffer(policy, relabelled, tmp_path):
    path, _ = relabelled
    out = tmp_path / "ppo"
    with pytest.raises(ValueError, match="vlapt collect"):
        train_ppo(PPOConfig(init_policy=str(policy), demos=str(path), tasks=[TASK], output_dir=str(out)), progress=False)
    assert not out.exists(), "refused before the run started"


def test_relabel_needs_a_policy_and_leaves_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match="policy="):
        relabel(RelabelConfig(tasks=[TASK], output=str(tmp_path / "r.hdf5")), progress=False)
    with pytest.raises(Exception, match="missing|not found|does not exist|no such"):
        relabel(RelabelConfig(policy=str(tmp_path / "nope"), tasks=[TASK], output=str(tmp_path / "r.hdf5")), progress=False)
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


def test_plan_labels_are_what_the_expert_does_when_it_takes_over_at_each_decision(policy, tmp_path):
    from vlapt.data.dataset import ChunkDataset

    path = tmp_path / "plans.hdf5"
    relabel(RelabelConfig(policy=str(policy), tasks=[TASK], episodes_per_task=1, max_episode_steps=8, labels="plan",
                          num_workers=1, output=str(path)), progress=False)
    (episode,) = read_episodes(path)
    assert episode.action_plans.shape == (8, CHUNK, 4)
    assert np.flatnonzero(episode.plan_lengths).tolist() == [0, 3, 6], "a plan where the policy decided (chunk 3)"
    assert episode.plan_lengths[[0, 3, 6]].tolist() == [CHUNK] * 3
    np.testing.assert_allclose(episode.action_plans[[0, 3, 6], 0], episode.actions[[0, 3, 6]], atol=1e-6)
    # Replay: the policy acts up to decision t, then the expert takes over; its actions are the plan.
    expert, agent = ScriptedExpert(), vlapt.load_policy(policy)
    for t in (3, 6):
        env = MetaWorldVLAEnv(TASK, EnvConfig(image_size=IMAGE_SIZE, camera_fovy=30.0, privileged_state=True))
        obs, _ = env.reset(options={"split": "train", "index": episode.config_index})
        while env.episode_steps < t:
            obs, *_ = env.step(agent.predict(obs))
        taken = []
        for _ in range(CHUNK):
            taken.append(expert.act_one(obs["state"], TASK))
            obs, *_ = env.step(taken[-1][None])
        env.close()
        np.testing.assert_allclose(episode.action_plans[t], np.stack(taken), atol=1e-5)
        assert not np.allclose(episode.action_plans[t, 1:], episode.actions[t + 1 : t + CHUNK], atol=1e-3), (
            "later plan steps are the expert's own continuation, not its labels at the policy's next states")
    # SFT's samples: the whole plan is the target where there is one, else the first label only.
    data = ChunkDataset([episode], CHUNK, relabelled_label_steps=1)
    np.testing.assert_array_equal(data.targets[[0, 3, 6]], episode.action_plans[[0, 3, 6]])
    assert not data.action_pad[[0, 3, 6]].any()
    assert data.action_pad[[1, 2, 4, 5, 7], 1:].all() and not data.action_pad[[1, 2, 4, 5, 7], 0].any()
    np.testing.assert_array_equal(data.batch(np.array([3]))["actions"][0].numpy(), episode.action_plans[3])


def test_plan_shorter_than_the_chunk_is_padded_and_masked():
    from vlapt.data.dataset import ChunkDataset
    from vlapt.data.format import EpisodeData

    T, h = 5, 4
    plans = np.zeros((T, h, 4), np.float32)
    plans[1, :2] = [[0.1] * 4, [0.2] * 4]  # the expert succeeded after two actions
    episode = EpisodeData(task=TASK, instruction="x", images=np.zeros((T, 8, 8, 3), np.uint8),
                          proprio=np.zeros((T, 4), np.float32), actions=np.ones((T, 4), np.float32),
                          rewards=np.zeros(T, np.float32), source="relabelled", action_plans=plans,
                          plan_lengths=np.array([0, 2, 0, 0, 0]))
    data = ChunkDataset([episode], h, relabelled_label_steps=1)
    np.testing.assert_allclose(data.targets[1], [[0.1] * 4, [0.2] * 4, [0.2] * 4, [0.2] * 4])
    assert data.action_pad[1].tolist() == [False, False, True, True]
    assert data.action_pad[0].tolist() == [False, True, True, True]
