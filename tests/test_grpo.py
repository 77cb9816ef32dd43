"""Critic-free group optimisation (GRPO / RLOO): advantages, groups, losses, and a run end to end."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import vlapt  # noqa: F401
from vlapt.algorithms import get_algorithm
from vlapt.algorithms.grpo import GRPOConfig, clipped_surrogate, group_advantages, outcome_reward, train_grpo
from vlapt.rollout.groups import run_groups
from vlapt.algorithms.sft import ModelConfig, SFTConfig, train_sft
from vlapt.config import ConfigError
from vlapt.data.collect import CollectConfig, collect
from vlapt.envs import get_suite
from vlapt.envs.pools import make_pool
from vlapt.interfaces import SlotSpec
from vlapt.policies import load_policy, state_sha256

TASK = "reach-v3"


def test_group_advantages_by_hand():
    rewards = np.array([0.9, 0.0, 0.5, 0.0])
    mean, std = rewards.mean(), rewards.std()
    np.testing.assert_allclose(group_advantages(rewards, "grpo"), (rewards - mean) / (std + 1e-6), rtol=1e-5)
    # leave-one-out: each reward against the mean of the other three
    np.testing.assert_allclose(group_advantages(rewards, "rloo"),
                               [0.9 - 0.5 / 3, 0.0 - 1.4 / 3, 0.5 - 0.9 / 3, 0.0 - 1.4 / 3], rtol=1e-5)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_a_group_of_equal_outcomes_contributes_no_policy_gradient(kind):
    assert not group_advantages(np.zeros(4), kind).any()  # all failures
    assert not group_advantages(np.full(4, 0.8), kind).any()  # all successes in the same number of steps
    # successes at different paces still teach: the faster one is ahead
    fast, slow = (outcome_reward(True, s, 200, 0.5) for s in (40, 120))
    advantages = group_advantages(np.array([fast, slow, slow, slow]), kind)
    assert advantages[0] > 0 > advantages[1]


def test_the_outcome_reward_ranks_every_success_above_every_failure():
    assert outcome_reward(True, 200, 200, 0.5) > outcome_reward(False, 10, 200, 0.5) == 0.0
    assert outcome_reward(True, 20, 200, 0.5) == pytest.approx(0.95)
    with pytest.raises(ValueError, match="pace_weight must be in"):
        GRPOConfig(tasks=[TASK], pace_weight=1.0).validate()
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        GRPOConfig(tasks=[TASK], group_size=1).validate()


class _Scores:
    def __init__(self, log_prob):
        self.log_prob = log_prob

    def evaluate(self, observations, actions, steps=0):
        from vlapt.interfaces import ChunkEvaluation

        lp = self.log_prob.sum(-1)
        return ChunkEvaluation(lp, torch.ones_like(lp), None)


def test_the_surrogate_clips_each_ratio_and_has_no_value_term():
    new = torch.tensor([[0.4, 0.0], [-0.4, 0.0]])
    adv = torch.tensor([1.0, 1.0])
    loss, _, _, clipfrac = clipped_surrogate(_Scores(new), {}, torch.zeros(2, 2, 4), torch.zeros(2), adv, 0.2)
    assert loss.item() == pytest.approx(-(1.2 + math.exp(-0.4)) / 2) and clipfrac.item() == 1.0


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpo") / "demos.hdf5"
    collect(CollectConfig(tasks=[TASK], demos_per_task=2, image_size=32, num_workers=0, output=str(path)), progress=False)
    return path


@pytest.fixture(scope="module")
def sft_policy(demos, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo_sft")
    return train_sft(SFTConfig(dataset=str(demos), output_dir=str(out), model=ModelConfig(size="tiny", chunk_len=5), steps=4,
                               batch_size=8, warmup_steps=1, checkpoint_every=4, log_every=4, threads=1), progress=False)


def test_grpo_refuses_demonstrations_of_another_camera(demos, sft_policy, tmp_path):
    from vlapt.data.format import DemoWriter, env_args, read_episodes

    other = tmp_path / "two_views.hdf5"
    with DemoWriter(other, {**env_args(demos), "camera": "corner+topview"}) as writer:
        for episode in read_episodes(demos):
            writer.add(episode)
    config = GRPOConfig(init_policy=str(sft_policy), demos=str(other), output_dir=str(tmp_path / "run"), tasks=[TASK])
    with pytest.raises(ValueError, match=r"camera='corner\+topview', init_policy with camera='corner'"):
        train_grpo(config, progress=False)
    assert not (tmp_path / "run").exists()


def test_every_group_runs_one_configuration(sft_policy):
    suite = get_suite("mt10")
    policy = load_policy(sft_policy)
    config = suite.check_env_config(dataclasses.replace(policy.observation_config(), max_episode_steps=30))
    slot_tasks = [TASK] * 6
    resets = []

    with make_pool([SlotSpec(suite, t, config, policy.chunk_len) for t in slot_tasks], num_workers=0) as pool:
        original = pool.reset
        pool.reset = lambda requests: resets.append(dict(requests)) or original(requests)
        batch = run_groups(policy, pool, slot_tasks, [7, 11], 3, torch.Generator().manual_seed(0))
        for configurations, group_size in (([7], 4), ([7], 3), ([7, 11, 13], 3)):  # slots left out, or too few configs
            with pytest.raises(ValueError, match="whole number of groups and one configuration per group"):
                run_groups(policy, pool, slot_tasks, configurations, group_size, torch.Generator())
    assert [resets[0][i]["index"] for i in range(6)] == [7, 7, 7, 11, 11, 11]
    assert [e.config_index for e in batch.episodes] == [7, 7, 7, 11, 11, 11] and batch.groups == [[0, 1, 2], [3, 4, 5]]
    # the same configuration, different sampled chunks: the episodes of a group differ
    first = {e: batch.actions[batch.episode_of == e][0] for e in range(3)}
    assert not np.allclose(first[0], first[1])
    assert batch.executed.sum() == sum(e.steps for e in batch.episodes)
    assert len(batch.observations["instruction"]) == len(batch.actions) == len(batch.log_probs)


def test_grpo_end_to_end_with_resume(demos, sft_policy, tmp_path):
    assert get_algorithm("grpo").train is train_grpo
    config = GRPOConfig(init_policy=str(sft_policy), demos=str(demos), tasks=[TASK], output_dir=str(tmp_path / "grpo"),
                        group_size=2, max_episode_steps=20, num_workers=0, total_env_steps=80, minibatch_size=8,
                        bc_batch_size=8, checkpoint_every=1, eval_every=0, threads=1, advantage="rloo",
                        swa_start_env_steps=50)
    final = train_grpo(config, progress=False)
    history = json.loads((tmp_path / "grpo" / "history.json").read_text())
    assert history[-1]["env_steps"] >= 80 and load_policy(final).chunk_len == 5
    assert all(math.isfinite(row["policy_loss"]) for row in history)
    first = state_sha256(load_policy(final))
    resumed = train_grpo(dataclasses.replace(config, total_env_steps=120), progress=False)
    longer = json.loads((tmp_path / "grpo" / "history.json").read_text())
    assert longer[: len(history)] == history and longer[-1]["env_steps"] >= 120
    # a larger budget resumed is the run it extends: the same rows and weights as one uninterrupted run
    straight = train_grpo(dataclasses.replace(config, output_dir=str(tmp_path / "straight"), total_env_steps=120),
                          progress=False)
    timing = ("rollout_env_steps_per_s", "learn_time_s", "wall_time_s")

    def rows(run):
        return [{k: v for k, v in row.items() if k not in timing}
                for row in json.loads((tmp_path / run / "history.json").read_text())]
    assert rows("grpo") == rows("straight")
    assert state_sha256(load_policy(resumed)) == state_sha256(load_policy(straight)) != first  # it trained on
    # checkpoints on disk: the newest two by default; keep_checkpoints=0 keeps every one, each a loadable policy
    kept = sorted(p.name for p in (tmp_path / "grpo" / "checkpoints").glob("step_*"))
    assert kept == [f"step_{i:09d}" for i in (len(longer) - 1, len(longer))]
    every = train_grpo(dataclasses.replace(config, output_dir=str(tmp_path / "all"), total_env_steps=120,
                                           keep_checkpoints=0, swa_start_env_steps=0), progress=False)
    all_kept = sorted((tmp_path / "all" / "checkpoints").glob("step_*"))
    assert [p.name for p in all_kept] == [f"step_{i:09d}" for i in range(1, len(longer) + 1)]
    assert all(load_policy(p).chunk_len == 5 for p in all_kept)
    # swa_start_env_steps: policy_swa/ is the plain mean of the iterates made after that many env steps, carried across
    # the resume, and never fed back (the run without it kept every iterate and ends on the same weights)
    assert not (tmp_path / "all" / "policy_swa").exists()
    assert all(torch.equal(a, b) for a, b in zip(load_policy(every).state_dict().values(),
                                                  load_policy(straight).state_dict().values()))
    late = [p for p, row in zip(all_kept, longer) if row["env_steps"] > 50]
    assert 1 <= len(late) < len(all_kept)
    weights = [load_policy(p).state_dict() for p in late]
    mean = {k: torch.stack([w[k].float() for w in weights]).mean(0) for k in weights[0]}
    for run in ("grpo", "straight"):
        averaged = load_policy(tmp_path / run / "policy_swa").state_dict()
        for k, v in mean.items():
            torch.testing.assert_close(averaged[k].float(), v, rtol=1e-5, atol=1e-6, msg=f"{run}: {k}")
        assert json.loads((tmp_path / run / "policy_swa" / "config.json").read_text())["metadata"][
            "iterates_averaged"] == len(late)
    for bad in (-1, 80):
        with pytest.raises(ValueError, match="swa_start_env_steps"):
            dataclasses.replace(config, swa_start_env_steps=bad).validate()
    # its start cannot change on resume: the mean so far would mix two starts
    with pytest.raises(ConfigError, match="swa_start_env_steps"):
        train_grpo(dataclasses.replace(config, total_env_steps=160, swa_start_env_steps=60), progress=False)
    # each checkpoint's policy names the policy the run started from, so scripts/soup.py can check its iterates' lineage
    assert {json.loads((p / "config.json").read_text())["metadata"]["init_state_sha256"] for p in all_kept} == {
        state_sha256(load_policy(sft_policy))}
    with pytest.raises(ValueError, match="keep_checkpoints"):
        dataclasses.replace(config, keep_checkpoints=-1).validate()
    assert all(torch.equal(a, b) for a, b in zip(load_policy(resumed).state_dict().values(),
                                                  load_policy(straight).state_dict().values()))
    # lineage: the resumed run still names the SFT policy it started from, not its own checkpoint
    start = state_sha256(load_policy(sft_policy))
    assert json.loads((final / "config.json").read_text())["metadata"]["init_state_sha256"] == start
    assert state_sha256(load_policy(final)) != start
