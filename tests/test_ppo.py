"""Chunked PPO with self-BC: GAE over chunks, the losses, rollout accounting, the demo buffer, the BC
weight, non-finite updates, and a tiny end-to-end run with checkpoint/resume."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import vlapt  # noqa: F401  (sets the headless GL backend before mujoco is imported)
import vlapt.algorithms.ppo_sbc as ppo_module
from vlapt.algorithms.checkpointing import latest_checkpoint, load_training_checkpoint
from vlapt.algorithms.ppo_sbc import (
    BCWeight,
    PPOConfig,
    TaskAdvantageScale,
    _update,
    make_optimizer,
    ppo_losses,
    rollout_functions,
    train_ppo,
)
from vlapt.algorithms.sft import ModelConfig, SFTConfig, train_sft
from vlapt.data import EpisodeData, read_episodes
from vlapt.data.collect import CollectConfig, collect
from vlapt.data.demo_buffer import BufferEpisode, DemoBuffer, episode_from_demo
from vlapt.envs import EnvConfig, MetaWorldVLAEnv
from vlapt.envs.tasks import MT50, instruction_for
from vlapt.envs.vector import EnvPool, SlotSpec
from vlapt.models import Tokenizer, VLAPolicy, load_pretrained, make_batch, policy_config_for_size
from vlapt.rollout.chunked import ChunkedRollout, RolloutBatch, chunk_gae

IMAGE_SIZE = 32
TASK = "reach-v3"
TIMING_KEYS = {"rollout_env_steps_per_s", "learn_time_s", "wall_time_s"}


class _Crash(Exception):
    """Stands in for the process dying in the middle of training."""


# =========================================================================== chunk GAE
GAMMA, LAM = 0.9, 0.8
R = np.array([0.5, 1.0, 0.2, 0.3], np.float32)
V = np.array([1.0, 2.0, 0.5, 0.4], np.float32)
STEPS = np.array([5, 3, 5, 2])
D = (GAMMA**STEPS).astype(np.float32)  # per-decision discount: gamma ** env steps executed
DONE = np.array([False, True, False, False])  # the episode ends with decision 1
LAST = np.float32(1.5)  # value of the observation after decision 3


def test_chunk_gae_matches_hand_computation():
    adv, ret = chunk_gae(R, V, D, DONE, LAST, LAM)
    d3 = R[3] + D[3] * LAST - V[3]
    d2 = R[2] + D[2] * V[3] - V[2]
    d1 = R[1] - V[1]  # terminal: no bootstrap from V[2], which belongs to the next episode
    d0 = R[0] + D[0] * V[1] - V[0]
    a3 = d3
    a2 = d2 + D[2] * LAM * a3
    a1 = d1
    a0 = d0 + D[0] * LAM * a1
    np.testing.assert_allclose(adv, [a0, a1, a2, a3], rtol=1e-6)
    np.testing.assert_allclose(ret, np.array([a0, a1, a2, a3]) + V, rtol=1e-6)
    assert adv.dtype == np.float32 and ret.dtype == np.float32 and adv.shape == (4,)


def test_chunk_gae_lambda_one_gives_discounted_returns():
    adv, ret = chunk_gae(R, V, D, DONE, LAST, 1.0)
    g3 = R[3] + D[3] * LAST
    g2 = R[2] + D[2] * g3
    g1 = R[1]
    g0 = R[0] + D[0] * g1
    np.testing.assert_allclose(ret, [g0, g1, g2, g3], rtol=1e-6)
    np.testing.assert_allclose(adv, np.array([g0, g1, g2, g3]) - V, rtol=1e-6)


def test_chunk_gae_lambda_zero_gives_one_step_td_errors():
    adv, _ = chunk_gae(R, V, D, DONE, LAST, 0.0)
    next_v = np.array([V[1], 0.0, V[3], LAST])  # 0 where the episode ended
    np.testing.assert_allclose(adv, R + D * next_v - V, rtol=1e-6, atol=1e-7)


def test_chunk_gae_treats_slots_independently():
    other = dict(r=R[::-1].copy(), v=V[::-1].copy() + 1, d=D[::-1].copy(), done=np.array([True, False, False, True]))
    adv, ret = chunk_gae(
        np.stack([R, other["r"]], 1), np.stack([V, other["v"]], 1), np.stack([D, other["d"]], 1),
        np.stack([DONE, other["done"]], 1), np.array([LAST, 7.0], np.float32), LAM,
    )
    assert adv.shape == (4, 2)
    a0, r0 = chunk_gae(R, V, D, DONE, LAST, LAM)
    a1, r1 = chunk_gae(other["r"], other["v"], other["d"], other["done"], np.float32(7.0), LAM)
    np.testing.assert_allclose(adv[:, 0], a0, rtol=1e-6)
    np.testing.assert_allclose(adv[:, 1], a1, rtol=1e-6)
    np.testing.assert_allclose(ret[:, 1], r1, rtol=1e-6)


# =========================================================================== PPO losses
def _vocab():
    return Tokenizer.build([instruction_for(t) for t in MT50]).vocab


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    config = policy_config_for_size("tiny", image_size=IMAGE_SIZE, vocab=_vocab())
    return VLAPolicy(config).eval()


def _obs_batch(model, n=6, seed=0):
    rng = np.random.default_rng(seed)
    obs = {
        "image": rng.integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
        "proprio": rng.normal(size=(n, 4)).astype(np.float32),
        "instruction": [instruction_for(MT50[i % 3]) for i in range(n)],
    }
    return make_batch(obs, Tokenizer(model.config.vocab), model.config)


def _manual_log_prob(mean, log_std, actions):
    """Joint log-density of a chunk: the sum over its h x A independent Gaussian entries."""
    normal = torch.distributions.Normal(mean.double(), log_std.double().exp().expand_as(mean))
    return normal.log_prob(actions.double()).sum(dim=(-2, -1))


def test_ppo_losses_with_an_unchanged_policy(tiny_model):
    batch = _obs_batch(tiny_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        actions, old_logp, old_values = tiny_model.sample(batch, generator=gen)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.1, 0.0])
    returns = old_values + torch.tensor([0.3, -0.3, 1.0, 0.0, 0.2, -2.0])
    pl, vl, ent, kl, cf = ppo_losses(tiny_model, batch, actions, old_logp, old_values, adv, returns, 0.2, 0.2)
    torch.testing.assert_close(pl, -adv.mean(), rtol=1e-5, atol=1e-6)
    assert abs(kl.item()) < 1e-6 and cf.item() == 0.0
    torch.testing.assert_close(vl, 0.5 * (old_values - returns).square().mean(), rtol=1e-5, atol=1e-6)
    # entropy of a diagonal Gaussian over the 20 entries of a chunk
    expected_entropy = torch.distributions.Normal(0.0, tiny_model.clamped_log_std().exp()).entropy().sum()
    torch.testing.assert_close(ent, expected_entropy, rtol=1e-5, atol=1e-5)
    pl.backward()
    assert tiny_model.log_std.grad is not None and tiny_model.log_std.grad.abs().sum() > 0


def test_ppo_ratio_is_the_joint_chunk_likelihood_ratio(tiny_model):
    batch = _obs_batch(tiny_model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        actions, old_logp, old_values = tiny_model.sample(batch, generator=gen)
        old_out = tiny_model(batch)
        torch.testing.assert_close(
            old_logp.double(), _manual_log_prob(old_out.mean, old_out.log_std, actions), rtol=1e-5, atol=1e-4
        )
        # move the policy: another std per entry and a shifted mean
        tiny_model.log_std.add_(torch.linspace(-0.3, 0.3, 20).view(5, 4))
        tiny_model.action_head[-1].bias.add_(torch.linspace(-0.2, 0.2, 20))
        new_out = tiny_model(batch)
        manual_new = _manual_log_prob(new_out.mean, new_out.log_std, actions)
        new_logp, _, _ = tiny_model.evaluate_actions(batch, actions)
    torch.testing.assert_close(new_logp.double(), manual_new, rtol=1e-5, atol=1e-4)

    ratio = (manual_new - old_logp.double()).exp()
    assert not torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3), "the perturbation must change the ratio"
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.1, 0.7])
    clip = 0.2
    pl, _, _, kl, cf = ppo_losses(tiny_model, batch, actions, old_logp, old_values, adv, old_values, clip, 0.2)
    a = adv.double()
    expected_pl = -torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a).mean()
    torch.testing.assert_close(pl.double(), expected_pl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kl.double(), ((ratio - 1) - ratio.log()).mean(), rtol=1e-3, atol=1e-5)
    assert cf.item() == pytest.approx(((ratio - 1).abs() > clip).double().mean().item())
    assert kl.item() > 0


def test_receding_horizon_ratio_and_entropy_score_only_the_executed_steps(tiny_model):
    batch = _obs_batch(tiny_model)
    k = 2
    with torch.no_grad():
        actions, old_logp, old_values = tiny_model.sample(batch, generator=torch.Generator().manual_seed(4), steps=k)
        out = tiny_model(batch)
        torch.testing.assert_close(old_logp.double(), _manual_log_prob(out.mean[:, :k], out.log_std[:, :k], actions[:, :k]),
                                   rtol=1e-5, atol=1e-4)
        # the steps after k are never executed: changing them changes nothing
        unexecuted = actions.clone()
        unexecuted[:, k:] += 5.0
        logp_k, entropy_k, _ = tiny_model.evaluate_actions(batch, unexecuted, steps=k)
        torch.testing.assert_close(logp_k, old_logp)
        logp_all, entropy_all, _ = tiny_model.evaluate_actions(batch, unexecuted)
        assert (logp_all < logp_k - 1.0).all(), "scored over the whole chunk, the shifted steps count"
    torch.testing.assert_close(entropy_k, entropy_all * k / tiny_model.chunk_len)  # one std for every step here
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.1, 0.7])
    pl, _, ent, kl, cf = ppo_losses(tiny_model, batch, unexecuted, old_logp, old_values, adv, old_values, 0.2, 0.2,
                                    execute_steps=k)
    torch.testing.assert_close(pl, -adv.mean(), rtol=1e-5, atol=1e-6)
    assert abs(kl.item()) < 1e-6 and cf.item() == 0.0
    with pytest.raises(ValueError, match="steps must be in"):
        tiny_model.evaluate_actions(batch, actions, steps=tiny_model.chunk_len + 1)


def test_ppo_clipping_is_active_for_large_moves(tiny_model):
    batch = _obs_batch(tiny_model)
    with torch.no_grad():
        actions, old_logp, old_values = tiny_model.sample(batch, generator=torch.Generator().manual_seed(2))
        tiny_model.log_std.add_(0.5)  # a big move: every chunk ratio leaves [0.8, 1.2]
    adv = torch.ones(6)
    pl, _, _, _, cf = ppo_losses(tiny_model, batch, actions, old_logp, old_values, adv, old_values, 0.2, 0.2)
    assert cf.item() == 1.0
    new_logp, _, _ = tiny_model.evaluate_actions(batch, actions)
    ratio = (new_logp - old_logp).exp().detach()
    # positive advantages: the objective is capped at (1 + clip) where the ratio grew past it
    expected = -torch.minimum(ratio, torch.full_like(ratio, 1.2)).mean()
    torch.testing.assert_close(pl.detach(), expected, rtol=1e-5, atol=1e-6)


def test_clipped_value_loss_matches_the_formula(tiny_model):
    batch = _obs_batch(tiny_model)
    with torch.no_grad():
        actions, old_logp, values = tiny_model.sample(batch, generator=torch.Generator().manual_seed(3))
    old_values = values + torch.tensor([0.5, -0.5, 0.05, -0.05, 0.3, 0.0])
    returns = values + torch.tensor([-1.0, 1.0, 0.3, -0.2, 2.0, 0.1])
    c = 0.2
    _, vl, _, _, _ = ppo_losses(tiny_model, batch, actions, old_logp, old_values, torch.zeros(6), returns, 0.2, c)
    v, o, r = values.double().numpy(), old_values.double().numpy(), returns.double().numpy()
    clipped = o + np.clip(v - o, -c, c)
    expected = 0.5 * np.mean(np.maximum((v - r) ** 2, (clipped - r) ** 2))
    assert vl.item() == pytest.approx(expected, rel=1e-5)
    unclipped = 0.5 * np.mean((v - r) ** 2)
    assert expected != pytest.approx(unclipped), "the example must exercise the clipped branch"


# =========================================================================== rollouts
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppo_demos") / "demos.hdf5"
    collect(
        CollectConfig(tasks=[TASK], demos_per_task=2, image_size=IMAGE_SIZE, num_workers=0, output=str(path)),
        progress=False,
    )
    return path


def test_rollout_stops_a_chunk_at_success_and_discounts_by_executed_steps(dataset):
    demos = read_episodes(dataset)  # demo k was collected on training configuration k
    demo = demos[0]
    T = len(demo)
    h = next(k for k in (5, 4, 6, 3, 7) if T % k)  # success must fall inside a chunk
    n_dec = -(-T // h)
    last_steps = T - (n_dec - 1) * h
    gamma = 0.9
    calls, value_calls = [], []

    def act(observations):
        k = len(calls)
        calls.append(observations)
        chunk = np.zeros((1, h, 4), np.float32)
        if k < n_dec:  # replay the expert's actions; the zeros after the last one must never run
            part = demo.actions[k * h : (k + 1) * h]
            chunk[0, : len(part)] = part
        return 2.0 * chunk, chunk, np.array([-float(k)], np.float32), np.array([10.0 + k], np.float32)

    def value(observations):
        value_calls.append(len(observations))
        return np.full(len(observations), 7.0, np.float32)

    env = EnvConfig(image_size=IMAGE_SIZE, camera_fovy=CollectConfig().camera_fovy, privileged_state=True)  # as collected
    slot = SlotSpec(TASK, env, h)
    with EnvPool([slot], num_workers=0) as pool:
        rollout = ChunkedRollout(pool, [TASK], gamma, h, {TASK: 0})
        batch, finished = rollout.collect(act, value, n_dec + 1)

    assert 0 < last_steps < h
    np.testing.assert_array_equal(batch.steps[:, 0], [h] * (n_dec - 1) + [last_steps, h])
    assert batch.steps[:n_dec].sum() == T
    expected_rewards = np.zeros(n_dec + 1)
    expected_rewards[n_dec - 1] = gamma ** (last_steps - 1)  # sparse reward 1 at the success step
    np.testing.assert_allclose(batch.rewards[:, 0], expected_rewards, rtol=1e-6)
    np.testing.assert_allclose(batch.discounts[:, 0], gamma ** batch.steps[:, 0].astype(float), rtol=1e-6)
    np.testing.assert_array_equal(batch.dones[:, 0], [False] * (n_dec - 1) + [True, False])
    # the chunk-level return of the episode is the step-level one, gamma ** (T - 1)
    episode_return = sum(np.prod(batch.discounts[:k, 0]) * batch.rewards[k, 0] for k in range(n_dec))
    assert episode_return == pytest.approx(gamma ** (T - 1), rel=1e-5)

    # what the policy saw and did is recorded per decision
    for t in range(n_dec):
        np.testing.assert_array_equal(batch.images[t, 0], demo.images[t * h])
        np.testing.assert_allclose(batch.proprio[t, 0], demo.proprio[t * h], atol=1e-6)
    np.testing.assert_array_equal(batch.images[n_dec, 0], demos[1].images[0])  # next episode: configuration 1
    assert rollout.next_index[TASK] == 3  # 0 and 1 used, 2 held in reserve for the slot's next episode
    np.testing.assert_array_equal(batch.log_probs[:, 0], -np.arange(n_dec + 1))
    np.testing.assert_array_equal(batch.values[:, 0], 10.0 + np.arange(n_dec + 1))
    np.testing.assert_array_equal(batch.actions[0, 0], 2.0 * demo.actions[:h])
    np.testing.assert_array_equal(batch.last_values, [7.0])
    assert value_calls == [1], "no truncation: only the final bootstrap value is asked for"

    assert len(finished) == 1
    ep = finished[0]
    assert ep.task == TASK and ep.success and ep.steps == T
    traj = ep.trajectory
    assert isinstance(traj, BufferEpisode) and traj.source == "self" and traj.task == TASK
    assert traj.length == T
    assert traj.images.shape == (n_dec, IMAGE_SIZE, IMAGE_SIZE, 3) and traj.actions.shape == (n_dec, h, 4)
    np.testing.assert_array_equal(traj.images, batch.images[:n_dec, 0])
    executed_per_chunk = batch.steps[:n_dec, 0]
    np.testing.assert_array_equal(traj.pad, np.arange(h)[None] >= executed_per_chunk[:, None])
    np.testing.assert_array_equal(traj.actions[~traj.pad], demo.actions)  # executed actions, in order
    np.testing.assert_array_equal(traj.actions[-1, last_steps:], np.repeat(demo.actions[-1:], h - last_steps, 0))


def _replay(demo, h, value=lambda k: 0.0):
    """An ``act`` that replays a demonstration's actions chunk by chunk (``act.calls`` counts its decisions)."""

    def act(observations):
        k = act.calls
        act.calls += 1
        chunk = np.zeros((1, h, 4), np.float32)
        part = demo.actions[k * h : (k + 1) * h]
        chunk[0, : len(part)] = part
        return chunk, chunk, np.zeros(1, np.float32), np.array([value(k)], np.float32)

    act.calls = 0
    return act


def test_rollout_scores_an_episode_against_the_value_of_its_first_decision_across_iterations(dataset):
    """An episode that spans two collects keeps the critic's value of its first observation, from the first collect."""
    demo = read_episodes(dataset)[0]
    T, h, gamma = len(demo), 4, 0.9
    n_dec = -(-T // h)
    assert n_dec > 2

    act = _replay(demo, h, value=lambda k: 0.25 + k)  # a different value per decision
    env = EnvConfig(image_size=IMAGE_SIZE, camera_fovy=CollectConfig().camera_fovy, privileged_state=True)
    with EnvPool([SlotSpec(TASK, env, h)], num_workers=0) as pool:
        rollout = ChunkedRollout(pool, [TASK], gamma, h, {TASK: 0})
        zeros = lambda obs: np.zeros(len(obs), np.float32)  # noqa: E731
        _, first = rollout.collect(act, zeros, 2)
        _, second = rollout.collect(act, zeros, n_dec - 1)
    assert first == [] and [ep.success for ep in second] == [True]
    (ep,) = second
    assert ep.first_value == pytest.approx(0.25)
    assert ep.episode_return == pytest.approx(gamma ** (T - 1), rel=1e-5)
    assert ep.trajectory.advantage == pytest.approx(gamma ** (T - 1) - 0.25, rel=1e-5)


def test_rollout_actions_are_the_samples_clipped_or_not_and_the_env_clips_them_alike(tiny_model):
    """``clip=False`` (bc_self_actions=sampled) keeps the samples as they were drawn; the env then runs exactly what
    the clipped chunk would have run, so only the self-BC targets differ."""
    with torch.no_grad():
        tiny_model.log_std.fill_(tiny_model.config.max_log_std)  # wide noise: many samples beyond the bounds
    rng = np.random.default_rng(0)
    observations = [{"image": rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
                     "proprio": rng.normal(size=4).astype(np.float32), "instruction": instruction_for(TASK)}
                    for _ in range(4)]
    tokenizer = Tokenizer(tiny_model.config.vocab)
    out = {}
    for clip in (True, False):
        act, _ = rollout_functions(tiny_model, tokenizer, torch.Generator().manual_seed(3), clip=clip)
        out[clip] = act(observations)
    np.testing.assert_array_equal(out[True][0], out[False][0])  # the same samples ...
    sampled = out[False][1]
    assert np.abs(sampled).max() > 1.0, "the test needs samples beyond the action bounds"
    np.testing.assert_allclose(sampled, tiny_model.unnormalize_actions(torch.from_numpy(out[False][0])).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(out[True][1], np.clip(sampled, -1.0, 1.0))  # ... clipped or not

    env = MetaWorldVLAEnv(TASK, EnvConfig(image_size=IMAGE_SIZE, render=False), chunk_len=sampled.shape[1])
    finals = []
    for chunk in (sampled[0], out[True][1][0]):
        env.reset(options={"split": "train", "index": 0})
        finals.append(env.step(chunk)[0]["proprio"])
    env.close()
    np.testing.assert_array_equal(finals[0], finals[1])


def test_potential_shaping_telescopes_to_the_sparse_return_minus_the_first_potential(dataset):
    """c * (gamma^n phi(end) - phi(start)) per chunk: over a solved episode it sums to -c * phi(s_0)."""
    demo = read_episodes(dataset)[0]
    T, h, gamma, c = len(demo), 4, 0.9, 0.5
    n_dec = -(-T // h)

    act = _replay(demo, h)

    env = EnvConfig(image_size=IMAGE_SIZE, camera_fovy=CollectConfig().camera_fovy, privileged_state=True)
    batches = {}
    for coef in (0.0, c):
        act.calls = 0
        with EnvPool([SlotSpec(TASK, env, h)], num_workers=0) as pool:
            batches[coef], finished = ChunkedRollout(pool, [TASK], gamma, h, {TASK: 0}, shaping_coef=coef).collect(
                act, lambda obs: np.zeros(len(obs), np.float32), n_dec)
        assert [ep.success for ep in finished] == [True]
    sparse, shaped = batches[0.0], batches[c]
    np.testing.assert_array_equal(shaped.steps, sparse.steps)
    assert not np.allclose(shaped.rewards, sparse.rewards), "progress shows in the chunks before the success"
    probe = MetaWorldVLAEnv(TASK, env, chunk_len=h)
    phi0 = probe.reset(options={"split": "train", "index": 0})[1]["potential"]
    probe.close()
    assert 0.0 < phi0 < 1.0

    def episode_return(b):
        return sum(np.prod(b.discounts[:k, 0]) * b.rewards[k, 0] for k in range(n_dec))

    assert episode_return(sparse) == pytest.approx(gamma ** (T - 1), rel=1e-5)
    assert episode_return(shaped) == pytest.approx(gamma ** (T - 1) - c * phi0, rel=1e-4, abs=1e-5)


def test_receding_horizon_rollout_keeps_only_the_executed_steps_as_bc_targets(dataset):
    """The policy proposes 5-step chunks and executes their first 2: a success's BC chunks hold those 2 steps."""
    demo = read_episodes(dataset)[0]
    h, k = 5, 2
    T = len(demo)
    calls = []

    def act(observations):
        start = k * len(calls)
        calls.append(1)
        chunk = np.zeros((1, h, 4), np.float32)
        part = demo.actions[start : start + h]
        chunk[0, : len(part)] = part
        return chunk, chunk[:, :k], np.zeros(1, np.float32), np.zeros(1, np.float32)

    env = EnvConfig(image_size=IMAGE_SIZE, camera_fovy=CollectConfig().camera_fovy, privileged_state=True)
    with EnvPool([SlotSpec(TASK, env, h)], num_workers=0) as pool:
        rollout = ChunkedRollout(pool, [TASK], 0.99, h, {TASK: 0})
        batch, finished = rollout.collect(act, lambda obs: np.zeros(len(obs), np.float32), -(-T // k))
    assert batch.steps.max() == k and batch.steps.sum() == T and batch.actions.shape[2] == h
    (ep,) = finished
    assert ep.success and ep.steps == T
    traj = ep.trajectory
    assert traj.actions.shape == (-(-T // k), h, 4) and traj.pad[:, k:].all()
    np.testing.assert_array_equal(traj.actions[~traj.pad], demo.actions)  # the executed actions, in order


def test_time_limit_truncation_bootstraps_with_the_discounted_value():
    gamma, h, c = 0.9, 5, 2.5
    short = EnvConfig(image_size=IMAGE_SIZE, reward="dense", max_episode_steps=7)
    long = EnvConfig(image_size=IMAGE_SIZE, reward="dense")
    probe = MetaWorldVLAEnv(TASK, dataclasses.replace(short, render=False), chunk_len=1)
    probe.reset(options={"split": "train", "index": 0})
    dense = [probe.step(np.zeros(4, np.float32))[1] for _ in range(7)]
    probe.close()
    value_calls = []

    def act(observations):
        zeros = np.zeros((len(observations), h, 4), np.float32)
        return zeros, zeros, np.zeros(len(observations), np.float32), np.zeros(len(observations), np.float32)

    def value(observations):
        value_calls.append(len(observations))
        return np.full(len(observations), c, np.float32)

    with EnvPool([SlotSpec(TASK, short, h), SlotSpec(TASK, long, h)], num_workers=0) as pool:
        rollout = ChunkedRollout(pool, [TASK, TASK], gamma, h, {TASK: 0})
        batch, finished = rollout.collect(act, value, 3)

    np.testing.assert_array_equal(batch.steps[:, 0], [5, 2, 5])
    np.testing.assert_array_equal(batch.steps[:, 1], [5, 5, 5])
    np.testing.assert_array_equal(batch.dones[:, 0], [False, True, False])
    assert not batch.dones[:, 1].any()
    np.testing.assert_allclose(batch.discounts[:, 0], [gamma**5, gamma**2, gamma**5], rtol=1e-6)
    first = sum(gamma**j * dense[j] for j in range(5))
    truncated = dense[5] + gamma * dense[6] + gamma**2 * c  # a time limit is not an end: bootstrap
    np.testing.assert_allclose(batch.rewards[:2, 0], [first, truncated], rtol=1e-5)
    assert value_calls == [1, 2], "one bootstrap for the truncated slot, then the last values of both"
    np.testing.assert_array_equal(batch.last_values, [c, c])
    assert len(finished) == 1
    assert not finished[0].success and finished[0].steps == 7 and finished[0].trajectory is None
    # configurations 0 and 1 at the start with 2 and 3 in reserve; slot 0 took 2 at the time limit, reserving 4
    assert rollout.next_index[TASK] == 5


def test_overlapped_groups_collect_exactly_what_lockstep_collects():
    """Stepping two slot groups in turn changes when the policy is asked, not what it sees or gets."""
    tasks = ["reach-v3", "drawer-close-v3", "button-press-topdown-v3", "window-close-v3"]
    h = 3
    env = EnvConfig(image_size=IMAGE_SIZE, reward="dense", max_episode_steps=7)

    def act(observations):  # a deterministic function of the observation
        chunks = np.stack([np.tanh(o["proprio"][None] + np.arange(h)[:, None]) for o in observations])
        chunks = chunks.astype(np.float32)
        return chunks, chunks, np.zeros(len(observations), np.float32), np.array([o["proprio"][0] for o in observations])

    def value(observations):
        return np.array([o["proprio"][1] for o in observations], np.float32)

    batches, starts = {}, {}
    for groups, workers in ((1, 0), (2, 2)):
        with EnvPool([SlotSpec(t, env, h) for t in tasks], num_workers=workers) as pool:
            rollout = ChunkedRollout(pool, tasks, 0.9, h, groups=groups)
            assert len(rollout.groups) == groups
            batches[groups], finished = rollout.collect(act, value, 6)
            starts[groups] = dict(rollout.next_index)
            assert len(finished) == 4 * 2  # every 7-step episode ended twice (after chunks of 3, 3, 1)
    for field in dataclasses.fields(RolloutBatch):
        a, b = getattr(batches[1], field.name), getattr(batches[2], field.name)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=field.name)
    assert starts[1] == starts[2]


def test_pool_answers_overlapping_calls_to_their_own_waiters():
    tasks = ["reach-v3", "drawer-close-v3", "reach-v3", "drawer-close-v3"]
    specs = [SlotSpec(t, EnvConfig(image_size=IMAGE_SIZE), 2) for t in tasks]
    chunk = np.full((2, 4), 0.5, np.float32)
    with EnvPool(specs, num_workers=2) as pool:
        assert pool.groups(2) == [[0, 1], [2, 3]]  # each group spans both workers
        pool.reset({i: {"split": "train", "index": i} for i in range(4)})
        first = pool.submit_step({0: chunk, 1: chunk}, {0: {}, 1: {}})
        second = pool.submit_step({2: chunk, 3: chunk}, {2: {}, 3: {}})
        later = second.wait()  # waiting out of order keeps the first call's answers for it
        earlier = first.wait()
        assert sorted(earlier) == [0, 1] and sorted(later) == [2, 3]
        for results in (earlier, later):
            assert all(r.info["steps"] == 2 and reset_obs is None for r, reset_obs in results.values())
        assert first.wait() is earlier
        with pytest.raises(ValueError, match="no reset options"):
            pool.submit_step({0: chunk}, {})
        pool.submit_step({0: chunk}, {0: {}})  # left unanswered: closing the pool must still work


# =========================================================================== demo buffer
def _demo(length, task=TASK, seed=0, size=8) -> EpisodeData:
    rng = np.random.default_rng(seed)
    rewards = np.zeros(length, np.float32)
    rewards[-1] = 1
    return EpisodeData(
        task=task, instruction=instruction_for(task),
        images=rng.integers(0, 256, (length, size, size, 3), dtype=np.uint8),
        proprio=rng.normal(size=(length, 4)).astype(np.float32),
        actions=rng.uniform(-1, 1, (length, 4)).astype(np.float32),
        rewards=rewards, states=None, success=True, config_split="train", config_index=seed, config_seed=0,
        source="scripted",
    )


def _self_episode(length, task=TASK, seed=100, h=3) -> BufferEpisode:
    rng = np.random.default_rng(seed)
    n = -(-length // h)
    pad = np.zeros((n, h), bool)
    pad[-1, length - (n - 1) * h :] = True
    return BufferEpisode(
        task=task, length=length, images=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
        proprio=rng.normal(size=(n, 4)).astype(np.float32), actions=rng.uniform(-1, 1, (n, h, 4)).astype(np.float32),
        pad=pad, source="self",
    )


def _lengths(buffer, task=TASK):
    return sorted(e.length for e in buffer.episodes[task])


def test_episode_from_demo_builds_padded_chunks():
    demo = _demo(4)
    ep = episode_from_demo(demo, 3, key=5)
    assert ep.source == "demo" and ep.demo_key == 5 and ep.length == 4
    assert ep.actions.shape == (4, 3, 4)
    np.testing.assert_array_equal(ep.actions[1], demo.actions[1:4])
    np.testing.assert_array_equal(ep.actions[3], demo.actions[[3, 3, 3]])
    np.testing.assert_array_equal(ep.pad[2], [False, False, True])
    np.testing.assert_array_equal(ep.pad[0], [False, False, False])


def test_buffer_seeding_admission_and_replacement():
    other = "push-v3"
    demos = [_demo(5, seed=0), _demo(9, other, seed=1), _demo(7, seed=2), _demo(6, seed=3)]
    buffer = DemoBuffer([TASK], capacity=3)
    buffer.seed(demos, 3)
    assert _lengths(buffer) == [5, 6, 7]  # the other task's demo is not for this buffer
    assert [e.demo_key for e in buffer.episodes[TASK]] == [0, 2, 3]
    assert buffer.stats()["admitted"] == 0 and buffer.stats()["self_fraction"] == 0

    assert buffer.offer(_self_episode(4)) is True  # full, shorter than the longest: replaces the 7
    assert _lengths(buffer) == [4, 5, 6] and buffer.admitted == 1 and buffer.replaced == 1
    assert buffer.offer(_self_episode(6)) is False  # ties with the longest: not shorter
    assert buffer.offer(_self_episode(50)) is False
    assert _lengths(buffer) == [4, 5, 6] and buffer.admitted == 1
    assert buffer.offer(_self_episode(2)) is True  # replaces the 6
    assert _lengths(buffer) == [2, 4, 5]
    stats = buffer.stats()
    assert stats["episodes"] == 3 and stats["self_fraction"] == pytest.approx(2 / 3)
    assert stats["mean_length"] == pytest.approx(11 / 3) and stats["admitted"] == 2


def test_buffer_admits_longer_episodes_while_it_has_room():
    buffer = DemoBuffer([TASK], capacity=3)
    buffer.seed([_demo(5)], 3)
    assert buffer.offer(_self_episode(40)) is True
    assert buffer.replaced == 0 and _lengths(buffer) == [5, 40]


def test_buffer_without_self_admission_keeps_only_demos():
    buffer = DemoBuffer([TASK], capacity=2, admit_self=False)
    buffer.seed([_demo(5), _demo(7, seed=1)], 3)
    assert buffer.offer(_self_episode(1)) is False
    assert _lengths(buffer) == [5, 7] and buffer.admitted == 0
    assert all(e.source == "demo" for e in buffer.episodes[TASK])


def _scored(length, advantage, seed=100):
    return dataclasses.replace(_self_episode(length, seed=seed), advantage=advantage)


def test_advantage_admission_takes_better_than_expected_successes_whatever_their_length():
    buffer = DemoBuffer([TASK], capacity=3, admission="advantage")
    buffer.seed([_demo(5, seed=0), _demo(6, seed=1), _demo(7, seed=2)], 3)
    assert buffer.offer(_scored(2, -0.1)) is False  # shorter than every demo, but worse than the critic expected
    assert buffer.offer(_scored(2, 0.0)) is False
    assert buffer.offer(_self_episode(2)) is False  # no critic value recorded
    assert buffer.admitted == 0 and _lengths(buffer) == [5, 6, 7]
    assert buffer.offer(_scored(90, 0.05)) is True  # longer than every stored episode: enters, replacing the oldest
    assert [e.demo_key for e in buffer.episodes[TASK] if e.source == "demo"] == [1, 2]
    assert buffer.offer(_scored(40, 0.2, seed=101)) is True
    assert buffer.offer(_scored(30, 0.1, seed=102)) is True  # the last demo goes
    assert [e.length for e in buffer.episodes[TASK]] == [90, 40, 30] and buffer.stats()["self_fraction"] == 1
    assert buffer.offer(_scored(60, 0.3, seed=103)) is True  # now the oldest self episode goes
    assert [e.length for e in buffer.episodes[TASK]] == [40, 30, 60]
    assert buffer.admitted == 4 and buffer.replaced == 4


def _round_trip(buffer, demos, tmp_path):
    """The buffer as a checkpoint stores it (safetensors + JSON) and a new one restores it."""
    tensors, meta = buffer.state()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "state.safetensors"))
    restored = DemoBuffer(buffer.tasks, capacity=buffer.capacity, admission=buffer.admission)
    restored.load_state(load_file(str(tmp_path / "state.safetensors")), json.loads(json.dumps(meta)), demos, 3)
    return restored


def test_advantage_admission_round_trips_order_and_scores(tmp_path):
    demos = [_demo(5), _demo(7, seed=1)]
    buffer = DemoBuffer([TASK], capacity=3, admission="advantage")
    buffer.seed(demos, 3)
    buffer.offer(_scored(9, 0.5, seed=11))
    buffer.offer(_scored(4, 0.25, seed=12))  # replaces demo 0
    restored = _round_trip(buffer, demos, tmp_path)
    assert [(e.source, e.length) for e in restored.episodes[TASK]] == [("demo", 7), ("self", 9), ("self", 4)]
    assert [e.advantage for e in restored.episodes[TASK][1:]] == [0.5, 0.25]
    assert math.isnan(restored.episodes[TASK][0].advantage)
    restored.offer(_scored(3, 0.1, seed=13))  # the order survived: the demo is still the oldest
    assert [e.source for e in restored.episodes[TASK]] == ["self", "self", "self"]


def _paced(length, reference, seed=100):
    return dataclasses.replace(_self_episode(length, seed=seed), reference_steps=reference)


def test_pace_admission_compares_each_success_with_the_expert_on_its_own_configuration():
    buffer = DemoBuffer([TASK], capacity=3, admission="pace")
    buffer.seed([_demo(5, seed=0), _demo(9, seed=1), _demo(7, seed=2), _demo(6, seed=3)], 3)
    assert _lengths(buffer) == [5, 6, 7], "seeded with the shortest demos, as under the default rule"
    assert [e.pace for e in buffer.episodes[TASK]] == [1.0, 1.0, 1.0], "a demo is the expert: pace 1"
    assert buffer.offer(_self_episode(2)) is False  # no expert reference recorded
    assert buffer.offer(_paced(2, 2)) is False  # as fast as the expert on its configuration: not faster
    assert buffer.offer(_paced(30, 40)) is True  # longer than every demo, but 0.75 of its expert's steps
    assert buffer.replaced == 1 and 30 in _lengths(buffer)
    assert buffer.offer(_paced(4, 5, seed=101)) is True  # 0.8: replaces another demo (the highest ratio, 1)
    assert buffer.offer(_paced(9, 10, seed=102)) is True  # 0.9: the last demo goes
    assert sorted(e.pace for e in buffer.episodes[TASK]) == [0.75, 0.8, 0.9]
    assert buffer.offer(_paced(3, 3.2, seed=103)) is False  # 0.94: shorter than all, but slower for its configuration
    assert buffer.offer(_paced(50, 100, seed=104)) is True  # 0.5 replaces the 0.9
    assert sorted(e.pace for e in buffer.episodes[TASK]) == [0.5, 0.75, 0.8]
    assert buffer.stats()["mean_pace"] == pytest.approx((0.5 + 0.75 + 0.8) / 3)
    assert buffer.admitted == 4 and buffer.replaced == 4


def test_pace_admission_round_trips_the_references(tmp_path):
    demos = [_demo(5), _demo(7, seed=1)]
    buffer = DemoBuffer([TASK], capacity=2, admission="pace")
    buffer.seed(demos, 3)
    buffer.offer(_paced(8, 10, seed=11))
    restored = _round_trip(buffer, demos, tmp_path)
    assert sorted(e.pace for e in restored.episodes[TASK]) == [0.8, 1.0]
    assert restored.offer(_paced(9, 10, seed=12)) is True  # 0.9 beats the demo's 1, not the restored 0.8
    assert sorted(e.pace for e in restored.episodes[TASK]) == [0.8, 0.9]


def test_buffer_rejects_an_unknown_admission_rule():
    with pytest.raises(ValueError, match="shorter, advantage, pace"):
        DemoBuffer([TASK], admission="longest")
    with pytest.raises(ValueError, match="buffer_admission"):
        PPOConfig(tasks=[TASK], buffer_admission="best").validate()
    with pytest.raises(ValueError, match="bc_self_actions"):
        PPOConfig(tasks=[TASK], bc_self_actions="clipped").validate()


def test_buffer_rejects_bad_capacity_and_empty_sampling():
    with pytest.raises(ValueError, match="capacity"):
        DemoBuffer([TASK], capacity=0)
    with pytest.raises(ValueError, match="empty"):
        DemoBuffer([TASK, "push-v3"]).sample(4, np.random.default_rng(0))


def test_buffer_samples_only_stored_tasks_with_the_right_shapes():
    buffer = DemoBuffer([TASK, "push-v3", "door-open-v3"], capacity=4)
    buffer.seed([_demo(5), _demo(4, "door-open-v3", seed=1)], 3)
    buffer.offer(_self_episode(60, seed=7))  # long episode: sampling is uniform over tasks, not samples
    out = buffer.sample(400, np.random.default_rng(0))
    assert out["image"].shape == (400, 8, 8, 3) and out["image"].dtype == np.uint8
    assert out["proprio"].shape == (400, 4)
    assert out["actions"].shape == (400, 3, 4) and out["actions"].dtype == torch.float32
    assert out["action_pad"].shape == (400, 3) and out["action_pad"].dtype == torch.bool
    assert set(out["instruction"]) == {instruction_for(TASK), instruction_for("door-open-v3")}
    share = out["instruction"].count(instruction_for(TASK)) / 400
    assert 0.4 < share < 0.6, share
    # every sample is a stored (image, chunk, pad) row
    rows = {
        (e.images[j].tobytes(), e.actions[j].tobytes(), e.pad[j].tobytes())
        for stored in buffer.episodes.values() for e in stored for j in range(len(e.actions))
    }
    for i in range(0, 400, 7):
        key = (out["image"][i].tobytes(), out["actions"][i].numpy().tobytes(), out["action_pad"][i].numpy().tobytes())
        assert key in rows


def test_buffer_state_round_trips_through_safetensors(tmp_path):
    demos = [_demo(5), _demo(7, seed=1), _demo(6, "push-v3", seed=2)]
    buffer = DemoBuffer([TASK, "push-v3"], capacity=2)
    buffer.seed(demos, 3)
    buffer.offer(_self_episode(4, seed=11))  # replaces the 7
    buffer.offer(_self_episode(5, "push-v3", seed=12))  # room: appended
    tensors, meta = buffer.state()
    assert not any("demo" in k for k in tensors), "demos are stored by reference"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "state.safetensors"))
    meta = json.loads(json.dumps(meta))

    restored = DemoBuffer([TASK, "push-v3"], capacity=2)
    restored.load_state(load_file(str(tmp_path / "state.safetensors")), meta, demos, 3)
    assert restored.admitted == buffer.admitted == 2 and restored.replaced == buffer.replaced == 1
    for task in buffer.tasks:
        assert len(restored.episodes[task]) == len(buffer.episodes[task])
        for a, b in zip(buffer.episodes[task], restored.episodes[task]):
            assert (a.task, a.length, a.source, a.demo_key) == (b.task, b.length, b.source, b.demo_key)
            for name in ("images", "proprio", "actions", "pad"):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
                assert getattr(a, name).dtype == getattr(b, name).dtype
    out_a = buffer.sample(16, np.random.default_rng(3))
    out_b = restored.sample(16, np.random.default_rng(3))
    np.testing.assert_array_equal(out_a["image"], out_b["image"])
    assert torch.equal(out_a["actions"], out_b["actions"])


# =========================================================================== BC weight
def test_bc_weight_none_and_fixed():
    none = BCWeight("none", 0.3, 1.5, 0.1, 1e-3, 10.0)
    fixed = BCWeight("fixed", 0.3, 1.5, 0.1, 1e-3, 10.0)
    for loss in (1.0, 50.0, -3.0, 0.0):
        assert none.update(loss) == 0.0 and none.value == 0.0
        assert fixed.update(loss) == 0.3
    assert none.target is None and fixed.target is None


def test_bc_weight_lagrangian_dual_ascent():
    w = BCWeight("lagrangian", 0.1, 1.5, 0.2, 1e-2, 1.0)
    assert w.update(2.0) == 0.1  # calibrates, no change
    assert w.target == pytest.approx(3.0, abs=1e-3)
    up = w.update(5.0)  # above target: the constraint is violated, lambda grows
    assert up == pytest.approx(0.1 * math.exp(0.2 * (5.0 - w.target) / w.scale))
    assert up > 0.1
    down = w.update(1.0)  # below target: lambda shrinks
    assert down < up
    assert w.update(w.target) == pytest.approx(down)  # on target: unchanged
    for _ in range(20):
        w.update(50.0)
    assert w.value == 1.0
    for _ in range(20):
        w.update(-50.0)
    assert w.value == pytest.approx(1e-2)
    before = w.value
    assert w.update(float("nan")) == before and w.update(float("inf")) == before


def test_bc_weight_handles_negative_nll():
    w = BCWeight("lagrangian", 0.1, 1.5, 0.1, 1e-3, 10.0)
    w.update(-2.0)
    assert w.target > -2.0, "the target must allow the loss to rise above a negative starting level"
    within = w.update(-1.9)
    assert within < 0.1  # slightly worse than the start but within the allowed ratio
    assert w.update(0.5) > within  # above the target
    w2 = BCWeight("lagrangian", 0.1, 1.5, 0.1, 1e-3, 10.0)
    w2.update(-2.0)
    assert w2.update(0.0) > 0.1  # far above the target


def test_bc_weight_survives_a_loss_spike():
    w = BCWeight("lagrangian", 0.1, 1.5, 0.1, 1e-3, 10.0)
    w.update(0.0)  # the chunk NLL passes through 0 as the std shrinks: scale = |L0| + 1e-3 is tiny
    assert w.update(20.0) == 10.0  # a spike must saturate at the maximum, not raise


def test_bc_weight_calibration_waits_for_a_finite_loss_and_state_round_trips():
    w = BCWeight("lagrangian", 0.1, 1.5, 0.1, 1e-3, 10.0)
    w.update(float("nan"))
    assert w.target is None
    w.update(1.0)
    w.update(3.0)
    copy_ = BCWeight("lagrangian", 0.5, 1.5, 0.1, 1e-3, 10.0)
    copy_.load(json.loads(json.dumps(w.state())))
    assert copy_.state() == w.state()
    assert copy_.update(2.0) == w.update(2.0)


# =========================================================================== per-task advantage normalisation
def test_task_advantage_scale_gives_each_task_unit_scale_then_tracks_a_running_variance():
    tasks = ["a", "b", "a"]  # slots 0 and 2 run task a
    rng = np.random.default_rng(0)
    first = np.stack([rng.normal(2.0, 0.5, 4), rng.normal(0.0, 0.01, 4), rng.normal(2.0, 0.5, 4)], axis=1)
    scale = TaskAdvantageScale(decay=0.75)
    out = scale.normalize(first, tasks)
    a, b = out[:, [0, 2]], out[:, 1]
    assert abs(a.mean()) < 1e-6 and abs(b.mean()) < 1e-6
    assert a.std() == pytest.approx(1.0) and b.std() == pytest.approx(1.0)  # the quiet task is not drowned
    # one mean/std over everything would have left task b ~50x smaller than task a
    pooled = (first - first.mean()) / first.std()
    assert pooled[:, 1].std() < 0.05 * pooled[:, [0, 2]].std()
    second = first * 3.0
    var_a = np.var(first[:, [0, 2]])
    out2 = scale.normalize(second, tasks)
    expected = 0.75 * var_a + 0.25 * 9 * var_a
    assert scale.variance["a"] == pytest.approx(expected)
    centred = second[:, [0, 2]] - second[:, [0, 2]].mean()
    np.testing.assert_allclose(out2[:, [0, 2]], centred / np.sqrt(expected), rtol=1e-5)
    copy_ = TaskAdvantageScale(decay=0.75)
    copy_.load(json.loads(json.dumps(scale.state())))
    np.testing.assert_array_equal(copy_.normalize(first, tasks), scale.normalize(first, tasks))
    # a task whose advantages are all equal is centred to zero, not divided by zero
    assert np.all(TaskAdvantageScale().normalize(np.ones((3, 1)), ["c"]) == 0.0)


def test_update_normalises_per_task_only_when_asked_and_not_in_the_critic_warm_up(tiny_model):
    rollout = _fake_rollout(tiny_model)
    rollout.rewards[:, 1] *= 1e-3  # push-v3's advantages are ~1000x smaller than reach-v3's
    scale = TaskAdvantageScale()
    stats, _ = _run_update(copy.deepcopy(tiny_model), rollout=rollout, critic_only=True, advantage_scale=scale,
                           advantage_norm="task")
    assert scale.variance == {}, "the warm-up's advantages (an untrained critic) do not set the scale"
    assert stats["advantage_std/push-v3"] < 1e-2 * stats["advantage_std/reach-v3"]
    _run_update(copy.deepcopy(tiny_model), rollout=rollout, advantage_scale=scale, advantage_norm="task")
    assert set(scale.variance) == {TASK, "push-v3"}
    assert scale.variance["push-v3"] < 1e-4 * scale.variance[TASK]
    untouched = TaskAdvantageScale()
    _run_update(copy.deepcopy(tiny_model), rollout=rollout, advantage_scale=untouched)  # the default: per minibatch
    assert untouched.variance == {}
    with pytest.raises(ValueError, match="advantage_norm"):
        PPOConfig(tasks=[TASK], advantage_norm="episode").validate()
    with pytest.raises(ValueError, match="advantage_norm_decay"):
        PPOConfig(tasks=[TASK], advantage_norm_decay=1.0).validate()


# =========================================================================== non-finite updates
def _fake_rollout(model, T=2, S=2, seed=0) -> RolloutBatch:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (T, S, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    proprio = rng.normal(size=(T, S, 4)).astype(np.float32)
    tasks = [TASK, "push-v3"][:S]
    batch = make_batch(
        {"image": images.reshape(T * S, IMAGE_SIZE, IMAGE_SIZE, 3), "proprio": proprio.reshape(T * S, 4),
         "instruction": [instruction_for(t) for _ in range(T) for t in tasks]},
        Tokenizer(model.config.vocab), model.config,
    )
    with torch.no_grad():
        actions, logp, values = model.sample(batch, generator=torch.Generator().manual_seed(seed))
    return RolloutBatch(
        images=images, proprio=proprio, tasks=tasks, actions=actions.numpy().reshape(T, S, 5, 4),
        log_probs=logp.numpy().reshape(T, S), values=values.numpy().reshape(T, S),
        rewards=rng.normal(size=(T, S)).astype(np.float32), discounts=np.full((T, S), 0.9**5, np.float32),
        dones=np.zeros((T, S), bool), steps=np.full((T, S), 5, np.int32), last_values=np.zeros(S, np.float32),
    )


def _run_update(model, bc_weight=None, buffer=None, reference_model=None, lr=1e-3, optimizer=None, rollout=None,
                critic_only=False, advantage_scale=None, **config_changes):
    config = PPOConfig(tasks=[TASK], epochs=2, minibatch_size=2, target_kl=0.0, bc_batch_size=4, **config_changes)
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    stats = _update(
        model, optimizer, rollout or _fake_rollout(model), buffer, bc_weight or BCWeight("none", 0.1, 1.5, 0.1, 1e-3, 10.0),
        Tokenizer(model.config.vocab), model.config, config, np.random.default_rng(0), critic_only=critic_only,
        reference_model=reference_model, advantage_scale=advantage_scale,
    )
    return stats, optimizer


def _bc_buffer():
    buffer = DemoBuffer([TASK, "push-v3"])
    buffer.seed([_demo(6, size=IMAGE_SIZE), _demo(4, "push-v3", seed=1, size=IMAGE_SIZE)], 5)
    return buffer


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_update_takes_every_minibatch_when_losses_are_finite(tiny_model):
    before = _params(tiny_model)
    stats, _ = _run_update(tiny_model)
    assert stats["updates"] == 4 and stats["nonfinite"] == 0  # 2 epochs x 2 minibatches of 2
    assert all(math.isfinite(stats[k]) for k in ("policy_loss", "value_loss", "entropy", "approx_kl"))
    assert any(not torch.equal(before[k], v) for k, v in tiny_model.named_parameters())


def test_value_head_learns_at_its_own_rate(tiny_model):
    config = PPOConfig(tasks=[TASK], lr=1e-9, value_lr=1e-2)
    optimizer = make_optimizer(tiny_model, config)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-9, 1e-2]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(tiny_model.parameters()))
    before = _params(tiny_model)
    _run_update(tiny_model, optimizer=optimizer)
    moved = {k: float((v.detach() - before[k]).abs().max()) for k, v in tiny_model.named_parameters()}
    assert all(moved[k] > 1e-4 for k in moved if k.startswith("value_head"))
    assert all(moved[k] < 1e-6 for k in moved if not k.startswith("value_head"))
    assert make_optimizer(tiny_model, PPOConfig(tasks=[TASK], lr=3e-5)).param_groups[1]["lr"] == 3e-5  # 0: the actor's
    with pytest.raises(ValueError, match="value_lr"):
        PPOConfig(tasks=[TASK], value_lr=-1.0).validate()


def test_resuming_an_optimiser_with_other_parameter_groups_names_the_problem(tiny_model):
    from vlapt.algorithms.checkpointing import optimizer_from_flat, optimizer_to_flat
    from vlapt.models.checkpoint import CheckpointError

    _, one_group = _run_update(tiny_model)  # a plain one-group Adam, as PPO used before value_lr
    tensors, meta = optimizer_to_flat(one_group)
    with pytest.raises(CheckpointError, match="parameter groups"):
        optimizer_from_flat(make_optimizer(tiny_model, PPOConfig(tasks=[TASK])), tensors, meta)
    two_groups = make_optimizer(tiny_model, PPOConfig(tasks=[TASK]))
    optimizer_from_flat(two_groups, *optimizer_to_flat(make_optimizer(tiny_model, PPOConfig(tasks=[TASK], value_lr=1e-3))))
    assert [g["lr"] for g in two_groups.param_groups] == [2e-5, 1e-3]  # the checkpoint's rates come back


def test_update_adds_the_weighted_bc_loss_and_calibrates_the_weight(tiny_model):
    plain = copy.deepcopy(tiny_model)
    _run_update(plain)
    weighted = copy.deepcopy(tiny_model)
    fixed_stats, _ = _run_update(weighted, BCWeight("fixed", 10.0, 1.5, 0.1, 1e-3, 10.0), _bc_buffer())
    assert fixed_stats["bc_loss"] != 0.0 and math.isfinite(fixed_stats["bc_loss"])
    assert not torch.equal(plain.action_head[-1].weight, weighted.action_head[-1].weight), "BC changes the update"

    w = BCWeight("lagrangian", 0.1, 1.5, 0.1, 1e-3, 10.0)
    stats, _ = _run_update(tiny_model, w, _bc_buffer())
    bc = stats["bc_loss"]
    assert w.target == pytest.approx(bc + 0.5 * (abs(bc) + 1e-3)) and w.value == 0.1


def test_update_holds_bc_to_the_reference_policy_on_the_same_samples(tiny_model):
    # lr 0: the policy keeps the reference's means, so the two losses agree and the constraint is
    # slack; the reference's own std (here an SFT-like narrow one) does not count, the policy's does
    reference = copy.deepcopy(tiny_model).eval()
    with torch.no_grad():
        reference.log_std.fill_(-3.0)
    w = BCWeight("lagrangian", 0.1, 1.5, 0.1, 1e-3, 10.0)
    stats, _ = _run_update(tiny_model, w, _bc_buffer(), reference_model=reference, lr=0.0)
    assert stats["bc_reference_loss"] == pytest.approx(stats["bc_loss"], rel=1e-5)
    ref = stats["bc_reference_loss"]
    assert w.target == pytest.approx(ref + 0.5 * (abs(ref) + 1e-3))
    assert w.value < 0.1, "a loss below its target relaxes the weight from the first update on"


def test_bc_weight_reference_target_moves_with_the_reference():
    w = BCWeight("lagrangian", 1.0, 1.5, 0.1, 1e-3, 10.0)
    assert w.update(1.5, reference_loss=1.0) == pytest.approx(1.0, abs=1e-3)  # exactly on target 1.5
    assert w.update(3.0, reference_loss=2.0) == pytest.approx(1.0, abs=1e-3)  # the target followed: 3.0
    assert w.update(3.0, reference_loss=1.0) > 1.0  # above 1.5: tighten
    before = w.value
    assert w.update(float("nan"), reference_loss=1.0) == before
    assert w.update(1.0, reference_loss=float("nan")) == before


def test_update_with_every_minibatch_skipped_leaves_the_bc_weight_alone(tiny_model, monkeypatch):
    def nan_policy_loss(*args, **kwargs):
        pl, vl, ent, kl, cf = ppo_losses(*args, **kwargs)
        return pl * float("nan"), vl, ent, kl, cf

    monkeypatch.setattr(ppo_module, "ppo_losses", nan_policy_loss)
    w = BCWeight("lagrangian", 0.1, 1.5, 0.1, 1e-3, 10.0)
    w.update(2.0)  # calibrated on an earlier iteration
    before = w.state()
    stats, _ = _run_update(tiny_model, w, _bc_buffer())
    assert stats["updates"] == 0 and stats["nonfinite"] == 4
    assert w.state() == before


def test_update_skips_minibatches_with_nan_loss(tiny_model, monkeypatch):
    def nan_policy_loss(*args, **kwargs):
        pl, vl, ent, kl, cf = ppo_losses(*args, **kwargs)
        return pl * float("nan"), vl, ent, kl, cf

    monkeypatch.setattr(ppo_module, "ppo_losses", nan_policy_loss)
    before = _params(tiny_model)
    stats, optimizer = _run_update(tiny_model)
    assert stats["nonfinite"] == 4 and stats["updates"] == 0
    for name, p in tiny_model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed by a skipped step"
        assert p.grad is None
    assert not optimizer.state, "the optimizer never stepped"
    assert math.isfinite(stats["action_std"])


def test_update_skips_only_the_bad_minibatch(tiny_model, monkeypatch):
    calls = []

    def first_is_nan(*args, **kwargs):
        out = ppo_losses(*args, **kwargs)
        calls.append(1)
        return (out[0] * float("nan"),) + out[1:] if len(calls) == 1 else out

    monkeypatch.setattr(ppo_module, "ppo_losses", first_is_nan)
    stats, _ = _run_update(tiny_model)
    assert stats["nonfinite"] == 1 and stats["updates"] == 3
    assert math.isfinite(stats["policy_loss"]) and math.isfinite(stats["value_loss"])
    assert all(torch.isfinite(p).all() for p in tiny_model.parameters())


def test_update_skips_a_nonfinite_gradient_with_a_finite_loss(tiny_model, monkeypatch):
    model = tiny_model

    def nan_gradient(*args, **kwargs):
        pl, vl, ent, kl, cf = ppo_losses(*args, **kwargs)
        # sqrt at 0 is finite, its derivative is not: the loss is fine, the gradient is NaN
        return pl + torch.sqrt((model.log_std * 0).sum()), vl, ent, kl, cf

    monkeypatch.setattr(ppo_module, "ppo_losses", nan_gradient)
    before = _params(model)
    stats, optimizer = _run_update(model)
    assert stats["nonfinite"] == 4 and stats["updates"] == 0
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.grad is None
    assert not optimizer.state


# =========================================================================== end to end
@pytest.fixture(scope="module")
def sft_policy(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_sft")
    config = SFTConfig(
        dataset=str(dataset), output_dir=str(out), model=ModelConfig(size="tiny", chunk_len=5), steps=4, batch_size=8,
        warmup_steps=1, checkpoint_every=4, log_every=4, threads=1,
    )
    return train_sft(config, progress=False)


def _ppo_config(dataset, sft_policy, out, **kwargs) -> PPOConfig:
    defaults = dict(
        init_policy=str(sft_policy), demos=str(dataset), tasks=[TASK], output_dir=str(out), envs_per_task=1,
        horizon=4, num_workers=0, total_env_steps=60, epochs=2, minibatch_size=8, bc_batch_size=8,
        checkpoint_every=1, eval_every=0, eval_episodes=1, value_warmup_iterations=1, threads=1,
    )
    defaults.update(kwargs)
    return PPOConfig(**defaults)


def _spy_updates(mp, records):
    """Record the training state each `_update` call starts from."""
    original = ppo_module._update

    def spy(model, optimizer, batch, buffer, bc_weight, *args, **kwargs):
        rng = args[-1]
        records.append({
            "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optim": copy.deepcopy(optimizer.state_dict()),
            "bc_weight": dict(bc_weight.state()),
            "rng": copy.deepcopy(rng.bit_generator.state),
            "buffer": {t: [(e.source, e.length, e.demo_key) for e in eps] for t, eps in buffer.episodes.items()},
            "critic_only": kwargs["critic_only"],
            "steps": int(batch.steps.sum()),
        })
        return original(model, optimizer, batch, buffer, bc_weight, *args, **kwargs)

    mp.setattr(ppo_module, "_update", spy)


@pytest.fixture(scope="module")
def reference_run(dataset, sft_policy, tmp_path_factory):
    """An uninterrupted run that evaluates (for real) only at the end."""
    out = tmp_path_factory.mktemp("ppo_reference")
    records = []
    with pytest.MonkeyPatch.context() as mp:
        _spy_updates(mp, records)
        final = train_ppo(_ppo_config(dataset, sft_policy, out, eval_every=3, ema_decay=0.5), progress=False)
    return SimpleNamespace(out=out, final=final, records=records)


def _fake_evaluation(path, tasks, config, write_into_checkpoint=True):
    metrics = {"episodes": 1, "success_rate": 0.25, "steps_to_success": 42.0, "steps_failures_as_limit": 100.0}
    result = {"per_task": {t: metrics for t in tasks}, "average": metrics}
    if write_into_checkpoint:
        (path / "eval.json").write_text(json.dumps(result))
    return result


@pytest.fixture(scope="module")
def resumed_run(dataset, sft_policy, tmp_path_factory):
    """The same run, evaluated every iteration, killed inside iteration 3 and resumed."""
    out = tmp_path_factory.mktemp("ppo_resumed")
    config = _ppo_config(dataset, sft_policy, out, eval_every=1, ema_decay=0.5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ppo_module, "_evaluate_checkpoint", _fake_evaluation)
        original = ppo_module._update
        calls = []

        def crash_in_third(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise _Crash("killed after the rollout of iteration 3")
            return original(*args, **kwargs)

        mp.setattr(ppo_module, "_update", crash_in_third)
        with pytest.raises(_Crash):
            train_ppo(config, progress=False)
    checkpoint = latest_checkpoint(out)
    _, tensors, state = load_training_checkpoint(checkpoint)
    weights = load_pretrained(checkpoint).state_dict()
    records, start_indices = [], []

    class RecordingRollout(ChunkedRollout):
        def __init__(self, pool, tasks, gamma, chunk_len, start_index=None, groups=2, **kwargs):
            start_indices.append(dict(start_index))
            super().__init__(pool, tasks, gamma, chunk_len, start_index, groups, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ppo_module, "_evaluate_checkpoint", _fake_evaluation)
        mp.setattr(ppo_module, "ChunkedRollout", RecordingRollout)
        _spy_updates(mp, records)
        final = train_ppo(config, progress=False)
    return SimpleNamespace(out=out, final=final, records=records, checkpoint=checkpoint, state=state,
                           weights=weights, tensors=tensors, start_indices=start_indices)


def _history(out):
    return json.loads((out / "history.json").read_text())


def _same(a, b) -> bool:
    """Equality of JSON rows where NaN equals NaN."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_train_ppo_end_to_end(reference_run, sft_policy):
    out, records = reference_run.out, reference_run.records
    assert reference_run.final == out / "policy"
    policy = vlapt.load_policy(out / "policy")
    assert policy.config.image_size == IMAGE_SIZE and policy.chunk_len == 5
    init = load_pretrained(sft_policy).state_dict()
    trained = load_pretrained(out / "policy").state_dict()
    assert any(not torch.equal(init[k], trained[k]) for k in init)
    assert all(torch.isfinite(v).all() for v in trained.values())

    history = _history(out)
    n = len(history)
    assert n >= 3 and [row["iteration"] for row in history] == list(range(1, n + 1))
    steps = [row["env_steps"] for row in history]
    increments = np.diff([0] + steps)
    # horizon x chunk_len per iteration at most (chunks stop early at a success)
    assert np.all(increments > 0) and np.all(increments <= 4 * 5)
    assert steps[-1] >= 60 and steps[-2] < 60
    assert [r["steps"] for r in records] == list(increments)
    for row in history:
        assert row["updates"] > 0 and row["buffer_episodes"] >= 2
        assert math.isfinite(row["value_loss"]) and math.isfinite(row["policy_loss"])
    # evaluation ran (for real) at iteration 3 and at the end; results are in the history and the checkpoint
    evaluated = [row["iteration"] for row in history if "eval_success" in row]
    assert evaluated == sorted({3, n})
    assert 0.0 <= history[-1]["eval_success"] <= 1.0
    last = out / "checkpoints" / f"step_{n:09d}"
    assert json.loads((last / "eval.json").read_text())["average"]["success_rate"] == history[-1]["eval_success"]

    # value warm-up: the first iteration trains only the critic
    assert [r["critic_only"] for r in records] == [True] + [False] * (n - 1)
    assert history[0]["bc_loss"] == 0.0 and history[1]["bc_loss"] != 0.0
    actor = [k for k in records[0]["params"] if k.startswith("action_head") or k == "log_std"]
    assert len(actor) == 5
    for name in actor:  # no gradient reaches the actor's own parameters in a critic-only update
        assert torch.equal(records[0]["params"][name], records[1]["params"][name]), name
    assert torch.all(records[0]["params"]["log_std"] == -1.0)  # reset to init_log_std at the start
    value_head = [k for k in records[0]["params"] if k.startswith("value_head")]
    assert any(not torch.equal(records[0]["params"][k], records[1]["params"][k]) for k in value_head)
    # the lagrangian BC weight calibrates at its first measurement
    assert records[1]["bc_weight"]["target"] is None and records[2]["bc_weight"]["target"] is not None

    # checkpoints: every iteration, the last two kept, the latest holds the final state
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == [f"step_{n - 1:09d}", f"step_{n:09d}"]
    assert latest_checkpoint(out) == last
    _, tensors, state = load_training_checkpoint(last)
    assert state["iteration"] == n and state["env_steps"] == steps[-1]
    assert [row["iteration"] for row in state["history"]] == list(range(1, n + 1))
    assert "rng.sample" in tensors and state["next_index"][TASK] >= 1
    assert state["buffer"]["admitted"] == history[-1]["buffer_admitted"]
    assert (out / "config.yaml").is_file() and list((out / "tb").glob("events.out.tfevents.*"))


def test_train_ppo_resume_continues_where_the_checkpoint_left_off(reference_run, resumed_run):
    ckpt_state = resumed_run.state
    assert resumed_run.checkpoint.name == "step_000000002"
    assert ckpt_state["iteration"] == 2

    history = _history(resumed_run.out)
    iterations = [row["iteration"] for row in history]
    assert iterations == list(range(1, len(history) + 1)), "no repeated or skipped iterations"
    env_steps = [row["env_steps"] for row in history]
    assert env_steps[:2] == [row["env_steps"] for row in ckpt_state["history"]]
    assert env_steps[1] == ckpt_state["env_steps"] < env_steps[2] <= ckpt_state["env_steps"] + 20
    assert np.all(np.diff(env_steps) > 0) and env_steps[-1] >= 60 > env_steps[-2]
    # the rows before the crash are the checkpointed ones, and the same as in the uninterrupted run
    for mine, saved in zip(history[:2], ckpt_state["history"]):
        assert _same(mine, saved)
    drop = TIMING_KEYS | {"eval_success", "eval_steps_to_success"}
    for mine, ref in zip(history[:2], _history(reference_run.out)[:2]):
        assert _same({k: v for k, v in mine.items() if k not in drop}, {k: v for k, v in ref.items() if k not in drop})

    # the resumed run's only update starts from exactly the state the uninterrupted run had there
    assert len(resumed_run.records) == len(history) - 2
    resumed, straight = resumed_run.records[0], reference_run.records[2]
    assert resumed["critic_only"] is False
    for name, tensor in resumed_run.weights.items():
        assert torch.equal(resumed["params"][name], tensor), name
        assert torch.equal(straight["params"][name], tensor), name
    assert resumed["bc_weight"] == ckpt_state["bc_weight"] == straight["bc_weight"]
    assert resumed["bc_weight"]["target"] is not None
    assert resumed["rng"] == straight["rng"]
    assert resumed["buffer"] == straight["buffer"]
    assert _same(resumed["optim"]["param_groups"], straight["optim"]["param_groups"])  # (tuples come back as lists)
    for index, entry in straight["optim"]["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(resumed["optim"]["state"][index][key]), torch.as_tensor(value))

    # new episodes start on the next unused configuration, not on configuration 0 again
    assert resumed_run.start_indices == [ckpt_state["next_index"]]
    assert ckpt_state["next_index"][TASK] >= 1
    _, _, final_state = load_training_checkpoint(latest_checkpoint(resumed_run.out))
    assert final_state["iteration"] == len(history)
    assert final_state["next_index"][TASK] > ckpt_state["next_index"][TASK]
    assert "resumed from" in (resumed_run.out / "train.log").read_text()


def _expected_average(start: dict, iterates: list[dict], decay: float) -> dict:
    average = {k: v.clone().float() for k, v in start.items()}
    for weights in iterates:
        for k in average:
            average[k] = decay * average[k] + (1 - decay) * weights[k].float()
    return average


def test_weight_average_follows_the_iterates_and_survives_a_resume(reference_run, resumed_run):
    """ema_decay: policy_ema/ averages the iterates after the critic warm-up, and a resumed run carries the average on."""
    history = _history(reference_run.out)
    final = load_pretrained(reference_run.out / "policy").state_dict()
    # records[k] holds the weights iteration k + 1 starts from, i.e. those after iteration k
    iterates = [r["params"] for r in reference_run.records[2:]] + [final]  # after iterations 2..n (1 is the warm-up)
    assert len(iterates) == len(history) - 1 >= 2
    averaged = load_pretrained(reference_run.out / "policy_ema").state_dict()
    for k, v in _expected_average(iterates[0], iterates[1:], 0.5).items():
        torch.testing.assert_close(averaged[k].float(), v, rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(averaged[k], final[k]) for k in final), "the average is not the last iterate"
    assert json.loads((reference_run.out / "policy_ema" / "config.json").read_text())["metadata"]["ema_decay"] == 0.5

    # the checkpoint of iteration 2 holds the average so far (one iterate: itself), and the resumed run goes on from it
    saved = {k[len("ema.module."):]: v for k, v in resumed_run.tensors.items() if k.startswith("ema.module.")}
    assert saved.keys() == resumed_run.weights.keys()
    for k, v in resumed_run.weights.items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0, msg=k)
    after = [r["params"] for r in resumed_run.records[1:]] + [load_pretrained(resumed_run.out / "policy").state_dict()]
    resumed = load_pretrained(resumed_run.out / "policy_ema").state_dict()
    for k, v in _expected_average(saved, after, 0.5).items():
        torch.testing.assert_close(resumed[k].float(), v, rtol=1e-5, atol=1e-6, msg=k)


def test_weight_average_never_feeds_back_into_training(dataset, sft_policy, reference_run, tmp_path):
    """The same run without the average ends on the same weights; a later invocation without it drops the stale one."""
    plain = train_ppo(_ppo_config(dataset, sft_policy, tmp_path / "plain", eval_every=3, ema_decay=0.0), progress=False)
    assert not (tmp_path / "plain" / "policy_ema").exists()
    with_average = load_pretrained(reference_run.final).state_dict()
    for k, v in load_pretrained(plain).state_dict().items():
        assert torch.equal(v, with_average[k]), k

    stale = tmp_path / "stale"
    shutil.copytree(reference_run.out, stale)
    assert (stale / "policy_ema").is_dir()
    train_ppo(_ppo_config(dataset, sft_policy, stale, eval_every=3, ema_decay=0.0), progress=False)  # already finished
    assert (stale / "policy").is_dir() and not (stale / "policy_ema").exists()


def test_resume_keeps_the_evaluation_results_of_the_checkpointed_iteration(resumed_run):
    history = _history(resumed_run.out)
    assert [row.get("eval_success") for row in history] == [0.25] * len(history)


def test_train_ppo_stops_after_too_many_nonfinite_updates(dataset, sft_policy, tmp_path, monkeypatch):
    def nan_losses(*args, **kwargs):
        pl, vl, ent, kl, cf = ppo_losses(*args, **kwargs)
        return pl * float("nan"), vl * float("nan"), ent, kl, cf

    monkeypatch.setattr(ppo_module, "ppo_losses", nan_losses)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="non-finite") as info:
        config = _ppo_config(dataset, sft_policy, out, max_nonfinite_updates=1, value_warmup_iterations=0)
        train_ppo(config, progress=False)
    assert "checkpoints" in str(info.value)
    assert latest_checkpoint(out) is None, "nothing from the broken update is checkpointed"
    assert not (out / "policy").exists() and not (out / "history.json").exists()


def test_train_ppo_rejects_bad_config(dataset, sft_policy, tmp_path):
    cases = [
        (dict(bc_weight_rule="sometimes"), "bc_weight_rule"), (dict(horizon=0), "horizon"), (dict(gamma=0.0), "gamma"),
        (dict(reward="shaped"), "reward"), (dict(tasks=["reach-v9"]), "reach-v9"), (dict(bc_target="final"), "bc_target"),
        (dict(rollout_groups=0), "rollout_groups"), (dict(shaping_coef=-1.0), "shaping_coef"),
        (dict(shaping_coef=0.5, reward="dense"), "shaping_coef"), (dict(ema_decay=1.0), "ema_decay"),
    ]
    for change, word in cases:
        with pytest.raises(ValueError, match=word):
            train_ppo(_ppo_config(dataset, sft_policy, tmp_path / "run", **change), progress=False)
    assert not (tmp_path / "run").exists()


def test_evaluations_start_at_the_initial_policy_and_are_kept_per_iteration(resumed_run):
    evals = sorted(p.name for p in (resumed_run.out / "evals").glob("iteration_*.json"))
    history = _history(resumed_run.out)
    assert evals[0] == "iteration_000000.json", "the starting (SFT) policy is evaluated once, before training"
    assert evals[1:] == [f"iteration_{row['iteration']:06d}.json" for row in history]


def test_per_task_advantage_scale_is_checkpointed_and_resumed(dataset, sft_policy, tmp_path, monkeypatch):
    """A resumed run's first update starts from the scale the uninterrupted run had at that iteration."""
    seen = []
    original = ppo_module._update

    def spy(*args, **kwargs):
        seen.append(copy.deepcopy(kwargs["advantage_scale"].state()))
        return original(*args, **kwargs)

    monkeypatch.setattr(ppo_module, "_update", spy)
    config = _ppo_config(dataset, sft_policy, tmp_path / "straight", advantage_norm="task", total_env_steps=45)
    train_ppo(config, progress=False)
    straight, seen[:] = list(seen), []
    assert straight[0] == straight[1] == {"variance": {}} and set(straight[2]["variance"]) == {TASK}  # after the warm-up
    half = dataclasses.replace(config, output_dir=str(tmp_path / "resumed"), total_env_steps=25)
    train_ppo(half, progress=False)
    done = len(seen)
    _, _, state = load_training_checkpoint(latest_checkpoint(tmp_path / "resumed"))
    assert state["advantage_scale"]["variance"] and state["iteration"] == done
    seen[:] = []
    train_ppo(dataclasses.replace(half, total_env_steps=45), progress=False)
    assert seen[0] == state["advantage_scale"] == straight[done]


def test_train_ppo_wires_the_admission_rule_and_the_self_bc_targets(dataset, sft_policy, tmp_path, monkeypatch):
    rules, clips = [], []
    original, original_rollout = ppo_module._update, ppo_module.rollout_functions

    def spy(model, optimizer, batch, buffer, *args, **kwargs):
        rules.append(buffer.admission)
        return original(model, optimizer, batch, buffer, *args, **kwargs)

    def spy_rollout(*args, clip=True, **kwargs):
        clips.append(clip)
        return original_rollout(*args, clip=clip, **kwargs)

    monkeypatch.setattr(ppo_module, "_update", spy)
    monkeypatch.setattr(ppo_module, "rollout_functions", spy_rollout)
    train_ppo(_ppo_config(dataset, sft_policy, tmp_path / "run", buffer_admission="advantage", bc_self_actions="executed",
                          total_env_steps=30), progress=False)
    assert rules and set(rules) == {"advantage"} and clips == [True]
    train_ppo(_ppo_config(dataset, sft_policy, tmp_path / "default", total_env_steps=30), progress=False)
    assert set(rules[-1:]) == {"shorter"} and clips[-1] is False  # the default keeps the unclipped samples


def test_pace_admission_has_the_envs_measure_the_expert_and_the_rollout_carry_it(dataset, sft_policy, tmp_path,
                                                                                 monkeypatch):
    pools, finished = [], []
    original_pool, original_finish = ppo_module.EnvPool, ChunkedRollout._finish

    def spy_pool(slots, **kwargs):
        pools.append([s.env.expert_reference for s in slots])
        return original_pool(slots, **kwargs)

    def spy_finish(self, *args):
        finished.append(original_finish(self, *args))
        return finished[-1]

    monkeypatch.setattr(ppo_module, "EnvPool", spy_pool)
    monkeypatch.setattr(ChunkedRollout, "_finish", spy_finish)
    train_ppo(_ppo_config(dataset, sft_policy, tmp_path / "pace", buffer_admission="pace", total_env_steps=60),
              progress=False)
    assert pools == [[True] * len(pools[0])]
    assert finished and all(1 <= ep.reference_steps <= 500 for ep in finished)
    assert all(ep.trajectory.reference_steps == ep.reference_steps for ep in finished if ep.success)
    train_ppo(_ppo_config(dataset, sft_policy, tmp_path / "default", total_env_steps=30), progress=False)
    assert pools[-1] == [False] * len(pools[-1]), "the default rule does not pay for the expert's run"


def test_post_training_with_correlated_chunk_noise(dataset, sft_policy, tmp_path):
    """The shared chunk-noise term is added to the SFT policy, trained, logged, saved and resumed."""
    assert not load_pretrained(sft_policy).config.correlated_noise
    config = _ppo_config(dataset, sft_policy, tmp_path / "run", correlated_noise_log_std=-1.2, bc_target="reference",
                         lr=1e-3)
    final = train_ppo(config, progress=False)
    policy = load_pretrained(final)
    assert policy.config.correlated_noise
    assert not torch.allclose(policy.correlated_log_std, torch.full_like(policy.correlated_log_std, -1.2)), "it trained"
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert all(math.isfinite(row["correlated_std"]) for row in history)
    # resuming keeps the trained term instead of resetting it to the initial value
    more = train_ppo(dataclasses.replace(config, total_env_steps=120), progress=False)
    resumed = load_pretrained(latest_checkpoint(tmp_path / "run"))
    assert resumed.config.correlated_noise and load_pretrained(more).config.correlated_noise


def test_post_training_with_a_receding_horizon(dataset, sft_policy, tmp_path, monkeypatch):
    """execute_steps=2: every decision executes at most 2 env steps and the rollout's log-probs are those of the
    executed steps; a bad value is refused before anything is written."""
    batches = []
    original = ppo_module._update

    def spy(model, optimizer, batch, *args, **kwargs):
        if not batches:  # the first batch was collected by the policy as it is now
            with torch.no_grad():
                T, S = batch.rewards.shape
                flat = make_batch({"image": batch.images.reshape(T * S, *batch.images.shape[2:]),
                                   "proprio": batch.proprio.reshape(T * S, -1),
                                   "instruction": [instruction_for(t) for _ in range(T) for t in batch.tasks]},
                                  Tokenizer(model.config.vocab), model.config)
                expected = model.log_prob(flat, torch.from_numpy(batch.actions.reshape(T * S, *batch.actions.shape[2:])),
                                          steps=2)
            np.testing.assert_allclose(batch.log_probs.reshape(-1), expected.numpy(), rtol=1e-4, atol=1e-3)
        batches.append(batch)
        return original(model, optimizer, batch, *args, **kwargs)

    monkeypatch.setattr(ppo_module, "_update", spy)
    config = _ppo_config(dataset, sft_policy, tmp_path / "run", execute_steps=2, horizon=40, total_env_steps=300)
    train_ppo(config, progress=False)
    steps = np.concatenate([b.steps.reshape(-1) for b in batches])
    assert steps.max() == 2 and steps.min() >= 1
    assert all(b.actions.shape[2] == load_pretrained(sft_policy).chunk_len for b in batches), "whole chunks are stored"

    with pytest.raises(ValueError, match="exceeds the chunk length"):
        train_ppo(_ppo_config(dataset, sft_policy, tmp_path / "bad", execute_steps=99), progress=False)
    assert not (tmp_path / "bad").exists()


def test_bc_loss_with_correlated_noise_uses_each_entrys_marginal(tiny_model):
    from vlapt.algorithms.sft import chunk_bc_loss

    tiny_model.enable_correlated_noise(-0.8)
    batch = _obs_batch(tiny_model, n=3)
    actions = torch.randn(3, tiny_model.chunk_len, tiny_model.action_dim, generator=torch.Generator().manual_seed(2))
    pad = torch.zeros(3, tiny_model.chunk_len, dtype=torch.bool)
    pad[0, 2:] = True  # padded entries drop out
    with torch.no_grad():
        loss, _ = chunk_bc_loss(tiny_model, batch, actions, pad)
        out = tiny_model(batch)
    std = (out.log_std.exp().square() + math.exp(-1.6)).sqrt()
    nll = -torch.distributions.Normal(out.mean, std).log_prob(actions)
    valid = (~pad).unsqueeze(-1).expand_as(nll)
    torch.testing.assert_close(loss, nll[valid].mean())


def test_buffer_contents_script_reads_a_checkpoints_buffer(tmp_path, load_script):
    script = load_script("buffer_contents")
    buffer = DemoBuffer([TASK], capacity=3, admission="pace")
    buffer.seed([_demo(5), _demo(7, seed=1), _demo(6, seed=2)], 3)
    episode = _paced(6, 8, seed=11)  # 2 chunks of 3, no padding
    episode.actions[:] = 0.5
    episode.actions[0, :, 0] = 1.0  # 3 of its 18 xyz targets at the bound
    episode.actions[1, 0, 1] = -1.7  # and one beyond it
    assert buffer.offer(episode)
    tensors, meta = buffer.state()
    checkpoint = tmp_path / "step_000000001"
    checkpoint.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(checkpoint / "state.safetensors"))
    (checkpoint / "state.json").write_text(json.dumps({"buffer": meta}))
    row = script.summarise(checkpoint)[TASK]
    assert (row["entries"], row["self"], row["self_mean_length"]) == (3, 1, 6.0)
    assert row["self_mean_pace"] == pytest.approx(0.75)
    assert row["self_at_bound"] == pytest.approx(4 / 18)
    pad = np.array([[False, True]])
    assert script.at_bound_share(np.array([[[1.0, 0, 0, 1], [1.0, 1, 1, 1]]]), pad) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="training checkpoint"):
        script.summarise(tmp_path)
