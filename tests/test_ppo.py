"""Chunked PPO with self-BC: GAE over chunks, the losses, rollout accounting, the demo buffer and its admission
rule, the BC weight, non-finite updates, and a tiny end-to-end run with evaluation, checkpoint/resume."""

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
from vlapt.algorithms import get_algorithm
from vlapt.algorithms.checkpointing import latest_checkpoint, load_training_checkpoint
from vlapt.algorithms.ppo_sbc import (
    BCWeight,
    PPOConfig,
    _update,
    keep_shortest,
    make_optimizer,
    ppo_losses,
    train_ppo,
)
from vlapt.algorithms.returns import chunk_gae
from vlapt.algorithms.sft import ModelConfig, SFTConfig, train_sft
from vlapt.config import ConfigError, load_config
from vlapt.data import DemoWriter, env_args, read_episodes
from vlapt.data.buffer import DemoBuffer
from vlapt.data.chunks import chunk_targets
from vlapt.data.collect import CollectConfig, collect
from vlapt.envs import get_suite
from vlapt.envs.metaworld.tasks import MT50
from vlapt.envs.pools import make_pool
from vlapt.evaluation import checkpoint_evaluator
from vlapt.interfaces import ChunkSample, EnvConfig, Episode, SlotSpec, StepResult
from vlapt.policies import CheckpointError, load_policy, state_sha256
from vlapt.policies.vla import Tokenizer, VLAPolicy, policy_config_for_size
from vlapt.rollout.chunked import ChunkedRollout, RolloutBatch

IMAGE_SIZE = 32
TASK = "reach-v3"
SUITE = get_suite("mt10")
TIMING_KEYS = {"rollout_env_steps_per_s", "learn_time_s", "wall_time_s"}


def instruction(task: str) -> str:
    return SUITE.instruction(task)


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
@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    config = policy_config_for_size("tiny", image_size=IMAGE_SIZE, chunk_len=5,
                                    vocab=Tokenizer.build(SUITE.vocabulary()).vocab)
    return VLAPolicy(config).eval()


def _obs_batch(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
        "proprio": rng.normal(size=(n, 4)).astype(np.float32),
        "instruction": [instruction(MT50[i % 3]) for i in range(n)],
    }


def _sample(model, obs, seed):
    """``(actions, old_log_probs, old_values)`` as a rollout records them, as tensors."""
    sample = model.act(obs, generator=torch.Generator().manual_seed(seed))
    return sample.actions, torch.from_numpy(sample.log_prob), torch.from_numpy(sample.value)


def _manual_log_prob(mean, log_std, actions):
    """Joint log-density of a chunk: the sum over its h x A independent Gaussian entries."""
    normal = torch.distributions.Normal(mean.double(), log_std.double().exp().expand_as(mean))
    return normal.log_prob(actions.double()).sum(dim=(-2, -1))


def test_ppo_losses_with_an_unchanged_policy(tiny_model):
    obs = _obs_batch()
    actions, old_logp, old_values = _sample(tiny_model, obs, 0)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.1, 0.0])
    returns = old_values + torch.tensor([0.3, -0.3, 1.0, 0.0, 0.2, -2.0])
    pl, vl, ent, kl, cf = ppo_losses(tiny_model, obs, actions, old_logp, old_values, adv, returns, 0.2, 0.2)
    torch.testing.assert_close(pl, -adv.mean(), rtol=1e-5, atol=1e-6)
    assert abs(kl.item()) < 1e-6 and cf.item() == 0.0
    torch.testing.assert_close(vl, 0.5 * (old_values - returns).square().mean(), rtol=1e-5, atol=1e-6)
    # entropy of a diagonal Gaussian over the 20 entries of a chunk
    expected_entropy = torch.distributions.Normal(0.0, tiny_model.clamped_log_std().exp()).entropy().sum()
    torch.testing.assert_close(ent, expected_entropy, rtol=1e-5, atol=1e-5)
    pl.backward()
    assert tiny_model.log_std.grad is not None and tiny_model.log_std.grad.abs().sum() > 0


def test_ppo_ratio_is_the_joint_chunk_likelihood_ratio(tiny_model):
    obs = _obs_batch()
    actions, old_logp, old_values = _sample(tiny_model, obs, 1)
    batch = tiny_model.make_batch(obs)
    with torch.no_grad():
        old_out = tiny_model(batch)
        torch.testing.assert_close(
            old_logp.double(), _manual_log_prob(old_out.mean, old_out.log_std, actions), rtol=1e-5, atol=1e-4
        )
        # move the policy: another std per entry and a shifted mean
        tiny_model.log_std.add_(torch.linspace(-0.3, 0.3, 20).view(5, 4))
        tiny_model.action_head[-1].bias.add_(torch.linspace(-0.2, 0.2, 20))
        new_out = tiny_model(batch)
        manual_new = _manual_log_prob(new_out.mean, new_out.log_std, actions)
        new_logp, _, _ = tiny_model.evaluate(obs, actions)
    torch.testing.assert_close(new_logp.double(), manual_new, rtol=1e-5, atol=1e-4)

    ratio = (manual_new - old_logp.double()).exp()
    assert not torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3), "the perturbation must change the ratio"
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.1, 0.7])
    clip = 0.2
    pl, _, _, kl, cf = ppo_losses(tiny_model, obs, actions, old_logp, old_values, adv, old_values, clip, 0.2)
    a = adv.double()
    expected_pl = -torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a).mean()
    torch.testing.assert_close(pl.double(), expected_pl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kl.double(), ((ratio - 1) - ratio.log()).mean(), rtol=1e-3, atol=1e-5)
    assert cf.item() == pytest.approx(((ratio - 1).abs() > clip).double().mean().item())
    assert kl.item() > 0


def test_ppo_clipping_is_active_for_large_moves(tiny_model):
    obs = _obs_batch()
    actions, old_logp, old_values = _sample(tiny_model, obs, 2)
    with torch.no_grad():
        tiny_model.log_std.add_(0.5)  # a big move: every chunk ratio leaves [0.8, 1.2]
    adv = torch.ones(6)
    pl, _, _, _, cf = ppo_losses(tiny_model, obs, actions, old_logp, old_values, adv, old_values, 0.2, 0.2)
    assert cf.item() == 1.0
    new_logp, _, _ = tiny_model.evaluate(obs, actions)
    ratio = (new_logp - old_logp).exp().detach()
    # positive advantages: the objective is capped at (1 + clip) where the ratio grew past it
    expected = -torch.minimum(ratio, torch.full_like(ratio, 1.2)).mean()
    torch.testing.assert_close(pl.detach(), expected, rtol=1e-5, atol=1e-6)


def test_clipped_value_loss_matches_the_formula(tiny_model):
    obs = _obs_batch()
    actions, old_logp, values = _sample(tiny_model, obs, 3)
    old_values = values + torch.tensor([0.5, -0.5, 0.05, -0.05, 0.3, 0.0])
    returns = values + torch.tensor([-1.0, 1.0, 0.3, -0.2, 2.0, 0.1])
    c = 0.2
    _, vl, _, _, _ = ppo_losses(tiny_model, obs, actions, old_logp, old_values, torch.zeros(6), returns, 0.2, c)
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


class _ScriptedPolicy:
    """A stand-in `ChunkPolicy` for rollout tests.

    ``act_fn(observations, k)`` answers decision call k with ``(actions, env_actions, log_prob, value)``;
    ``value_fn(observations)`` gives values. Calls are counted.
    """

    action_dim = 4

    def __init__(self, act_fn, value_fn=None):
        self.act_fn = act_fn
        self.value_fn = value_fn or (lambda obs: np.zeros(len(obs["proprio"]), np.float32))
        self.calls = 0
        self.value_calls: list[int] = []

    def act(self, observations, deterministic=False, generator=None) -> ChunkSample:
        assert not deterministic, "training rollouts sample"
        sample = ChunkSample(*self.act_fn(observations, self.calls))
        self.calls += 1
        return sample

    def value(self, observations) -> np.ndarray:
        self.value_calls.append(len(observations["proprio"]))
        return self.value_fn(observations)


def _replay(demo, h):
    """An ``act_fn`` that replays a demonstration's actions chunk by chunk (zeros after its end)."""

    def act(observations, k):
        chunk = np.zeros((1, h, 4), np.float32)
        part = demo.actions[k * h : (k + 1) * h]
        chunk[0, : len(part)] = part
        return chunk, chunk, np.zeros(1, np.float32), np.zeros(1, np.float32)

    return act


def _collected_env() -> EnvConfig:
    """The env settings the test dataset was collected with, so replayed demonstrations succeed again."""
    return EnvConfig(image_size=IMAGE_SIZE, camera_fovy=CollectConfig().camera_fovy, privileged_state=True)


def test_rollout_stops_a_chunk_at_success_and_discounts_by_executed_steps(dataset):
    demos = read_episodes(dataset)  # demo k was collected on training configuration k
    demo = demos[0]
    T = len(demo)
    h = next(k for k in (5, 4, 6, 3, 7) if T % k)  # success must fall inside a chunk
    n_dec = -(-T // h)
    last_steps = T - (n_dec - 1) * h
    gamma = 0.9

    def act(observations, k):
        chunk = np.zeros((1, h, 4), np.float32)
        if k < n_dec:  # replay the expert's actions; the zeros after the last one must never run
            part = demo.actions[k * h : (k + 1) * h]
            chunk[0, : len(part)] = part
        return 2.0 * chunk, chunk, np.array([-float(k)], np.float32), np.array([10.0 + k], np.float32)

    policy = _ScriptedPolicy(act, lambda obs: np.full(len(obs["proprio"]), 7.0, np.float32))
    with make_pool([SlotSpec(SUITE, TASK, _collected_env(), h)], num_workers=0) as pool:
        rollout = ChunkedRollout(pool, [TASK], gamma, h, {TASK: 0})
        batch, finished = rollout.collect(policy, n_dec + 1)

    assert 0 < last_steps < h
    np.testing.assert_array_equal(batch.steps[:, 0], [h] * (n_dec - 1) + [last_steps, h])
    assert batch.steps[:n_dec].sum() == T
    expected_rewards = np.zeros(n_dec + 1)
    expected_rewards[n_dec - 1] = gamma ** (last_steps - 1)  # sparse reward 1 at the success step
    np.testing.assert_allclose(batch.rewards[:, 0], expected_rewards, rtol=1e-6)
    np.testing.assert_allclose(batch.discounts[:, 0], gamma ** batch.steps[:, 0].astype(float), rtol=1e-6)
    np.testing.assert_array_equal(batch.dones[:, 0], [False] * (n_dec - 1) + [True, False])
    assert batch.valid.all()
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
    np.testing.assert_array_equal(batch.actions[0, 0], 2.0 * demo.actions[:h])  # the policy's own action space
    np.testing.assert_array_equal(batch.last_values, [7.0])
    assert batch.instructions == [instruction(TASK)] and batch.tasks == [TASK]
    assert policy.value_calls == [1], "no truncation: only the final bootstrap value is asked for"
    observed = batch.observations(np.array([0, 1]))
    np.testing.assert_array_equal(observed["image"], batch.images[:2, 0])
    assert observed["instruction"] == [instruction(TASK)] * 2

    assert len(finished) == 1
    ep = finished[0]
    assert isinstance(ep, Episode)
    assert (ep.task, ep.success, ep.steps, ep.split, ep.config_index) == (TASK, True, T, "train", 0)
    assert ep.source == "policy" and ep.instruction == instruction(TASK)
    # a success carries its trajectory: the observation at each decision, the env-unit actions sent, step by step
    assert ep.images.shape == (n_dec, IMAGE_SIZE, IMAGE_SIZE, 3) and ep.proprio.shape == (n_dec, 4)
    np.testing.assert_array_equal(ep.images, batch.images[:n_dec, 0])
    np.testing.assert_array_equal(ep.decision_steps, np.arange(n_dec) * h)
    np.testing.assert_array_equal(ep.actions, demo.actions)  # executed actions, in order, never the unexecuted zeros
    # as self-BC samples: one chunk per decision, padded past the success
    targets, pad = chunk_targets(ep.actions, ep.decisions, h)
    executed_per_chunk = batch.steps[:n_dec, 0]
    np.testing.assert_array_equal(pad, np.arange(h)[None] >= executed_per_chunk[:, None])
    np.testing.assert_array_equal(targets[~pad], demo.actions)
    np.testing.assert_array_equal(targets[-1, last_steps:], np.repeat(demo.actions[-1:], h - last_steps, 0))


def test_rollout_returns_an_episode_that_spans_two_collects_whole(dataset):
    demo = read_episodes(dataset)[0]
    T, h = len(demo), 4
    n_dec = -(-T // h)
    assert n_dec > 2
    policy = _ScriptedPolicy(_replay(demo, h))
    with make_pool([SlotSpec(SUITE, TASK, _collected_env(), h)], num_workers=0) as pool:
        rollout = ChunkedRollout(pool, [TASK], 0.9, h, {TASK: 0})
        first_batch, first = rollout.collect(policy, 2)
        second_batch, second = rollout.collect(policy, n_dec - 1)
    assert first == [] and [ep.success for ep in second] == [True]
    (ep,) = second
    assert ep.steps == T and ep.config_index == 0
    np.testing.assert_array_equal(ep.images, np.concatenate([first_batch.images[:, 0], second_batch.images[: n_dec - 2, 0]]))
    np.testing.assert_array_equal(ep.actions, demo.actions)
    np.testing.assert_array_equal(ep.decision_steps, np.arange(n_dec) * h)


def test_rollout_labels_are_the_unclipped_samples_and_the_env_clips_them_alike(tiny_model):
    """Self-BC imitates the chunks as sampled (env units, unclipped); the env runs exactly what the clipped chunk
    would have run, so only the BC targets differ."""
    with torch.no_grad():
        tiny_model.log_std.fill_(tiny_model.config.max_log_std)  # wide noise: many samples beyond the bounds
    sample = tiny_model.act(_obs_batch(4), generator=torch.Generator().manual_seed(3))
    sampled = sample.env_actions
    assert np.abs(sampled).max() > 1.0, "the test needs samples beyond the action bounds"
    env = SUITE.make_env(TASK, EnvConfig(image_size=IMAGE_SIZE, render=False), chunk_len=sampled.shape[1])
    finals = []
    for chunk in (sampled[0], np.clip(sampled[0], -1.0, 1.0)):
        env.reset(options={"split": "train", "index": 0})
        finals.append(env.step(chunk)[0]["proprio"])
    env.close()
    np.testing.assert_array_equal(finals[0], finals[1])

    # the rollout records the chunks it sent, unclipped
    def beyond(observations, k):
        chunk = np.full((1, 5, 4), 1.5 if k == 0 else 0.0, np.float32)
        return chunk, chunk, np.zeros(1, np.float32), np.zeros(1, np.float32)

    with make_pool([SlotSpec(SUITE, TASK, EnvConfig(image_size=IMAGE_SIZE), 5)], num_workers=0) as pool:
        rollout = ChunkedRollout(pool, [TASK], 0.9, 5, {TASK: 0})
        _, finished = rollout.collect(_ScriptedPolicy(beyond), 1)
        assert finished == [] and rollout._trajectories[0].actions[0].max() == 1.5


def test_time_limit_truncation_bootstraps_with_the_discounted_value():
    gamma, h, c = 0.9, 5, 2.5
    short = EnvConfig(image_size=IMAGE_SIZE, max_episode_steps=7)
    long = EnvConfig(image_size=IMAGE_SIZE)

    def act(observations, k):
        zeros = np.zeros((len(observations["proprio"]), h, 4), np.float32)
        n = len(zeros)
        return zeros, zeros, np.zeros(n, np.float32), np.zeros(n, np.float32)

    policy = _ScriptedPolicy(act, lambda obs: np.full(len(obs["proprio"]), c, np.float32))
    with make_pool([SlotSpec(SUITE, TASK, short, h), SlotSpec(SUITE, TASK, long, h)], num_workers=0) as pool:
        rollout = ChunkedRollout(pool, [TASK, TASK], gamma, h, {TASK: 0})
        batch, finished = rollout.collect(policy, 3)

    np.testing.assert_array_equal(batch.steps[:, 0], [5, 2, 5])
    np.testing.assert_array_equal(batch.steps[:, 1], [5, 5, 5])
    np.testing.assert_array_equal(batch.dones[:, 0], [False, True, False])
    assert not batch.dones[:, 1].any()
    np.testing.assert_allclose(batch.discounts[:, 0], [gamma**5, gamma**2, gamma**5], rtol=1e-6)
    # the arm does not move: no success, no reward; a time limit is not an end: bootstrap from the value
    np.testing.assert_allclose(batch.rewards[:, 0], [0.0, gamma**2 * c, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(batch.rewards[:, 1], [0.0, 0.0, 0.0])
    assert policy.value_calls == [1, 2], "one bootstrap for the truncated slot, then the last values of both"
    np.testing.assert_array_equal(batch.last_values, [c, c])
    assert len(finished) == 1
    assert not finished[0].success and finished[0].steps == 7 and finished[0].images is None
    # configurations 0 and 1 at the start with 2 and 3 in reserve; slot 0 took 2 at the time limit, reserving 4
    assert rollout.next_index[TASK] == 5


class _LosingPool:
    """An in-process pool whose slot 0 loses its env worker on the ``lose_at``-th step submitted to it,
    answering as `SubprocessPool` does then: truncated, ``info["lost"]``, the next episode already reset."""

    def __init__(self, slots, lose_at):
        self.inner = make_pool(slots, num_workers=0)
        self.lose_at, self.submitted = lose_at, 0

    def __len__(self):
        return len(self.inner)

    def reset(self, requests):
        return self.inner.reset(requests)

    def groups(self, count):
        return self.inner.groups(count)

    def submit(self, actions, reset_options=None):
        lose = 0 in actions and self.submitted == self.lose_at
        self.submitted += 0 in actions
        if not lose:
            return "inner", self.inner.submit(actions, reset_options)
        rest = {i: a for i, a in actions.items() if i != 0}
        answers = self.inner.wait(self.inner.submit(rest, reset_options)) if rest else {}
        first = self.inner.reset({0: reset_options[0]})[0][0]
        info = {"rewards": np.zeros(0, np.float32), "steps": 0, "success": False, "episode_steps": 0, "lost": True}
        answers[0] = StepResult(first, 0.0, False, True, info, first)
        return "lost", answers

    def wait(self, ticket):
        kind, value = ticket
        return self.inner.wait(value) if kind == "inner" else value

    def close(self):
        self.inner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_a_decision_lost_with_its_env_worker_is_never_learned_from():
    h, value = 5, 3.0

    def act(observations, k):
        zeros = np.zeros((1, h, 4), np.float32)
        return zeros, zeros, np.zeros(1, np.float32), np.full(1, value, np.float32)

    with _LosingPool([SlotSpec(SUITE, TASK, EnvConfig(image_size=IMAGE_SIZE), h)], lose_at=1) as pool:
        rollout = ChunkedRollout(pool, [TASK], 0.9, h, {TASK: 0}, groups=1)
        batch, finished = rollout.collect(_ScriptedPolicy(act), 4)
    np.testing.assert_array_equal(batch.valid[:, 0], [True, False, True, True])
    np.testing.assert_array_equal(batch.dones[:, 0], [False, True, False, False])
    np.testing.assert_array_equal(batch.steps[:, 0], [h, 0, h, h])
    assert batch.rewards[1, 0] == batch.values[1, 0] == value
    advantages, returns = chunk_gae(batch.rewards, batch.values, batch.discounts, batch.dones, batch.last_values, 0.95)
    assert advantages[1, 0] == 0.0 and returns[1, 0] == value, "a lost decision scores exactly what was expected"
    assert rollout.lost_episodes == 1 and finished == [], "the partial episode is dropped, not reported"
    # the slot went on with the configuration it held in reserve (1), and reserved the next one
    assert rollout.next_index[TASK] == 3
    probe = SUITE.make_env(TASK, SUITE.check_env_config(EnvConfig(image_size=IMAGE_SIZE)), chunk_len=h)
    first_of_1 = probe.reset(options={"split": "train", "index": 1})[0]
    probe.close()
    np.testing.assert_array_equal(batch.images[2, 0], first_of_1["image"])


def test_overlapped_groups_collect_exactly_what_lockstep_collects():
    """Stepping two slot groups in turn changes when the policy is asked, not what it sees or gets."""
    tasks = ["reach-v3", "drawer-close-v3", "button-press-topdown-v3", "window-close-v3"]
    h = 3
    env = EnvConfig(image_size=IMAGE_SIZE, max_episode_steps=7)

    def act(observations, k):  # a deterministic function of the observation
        proprio = observations["proprio"]
        chunks = np.tanh(proprio[:, None, :] + np.arange(h)[None, :, None]).astype(np.float32)
        return chunks, chunks, np.zeros(len(proprio), np.float32), proprio[:, 0].astype(np.float32)

    def value(observations):
        return observations["proprio"][:, 1].astype(np.float32)

    batches, starts = {}, {}
    for groups, workers in ((1, 0), (2, 2)):
        with make_pool([SlotSpec(SUITE, t, env, h) for t in tasks], num_workers=workers) as pool:
            rollout = ChunkedRollout(pool, tasks, 0.9, h, groups=groups)
            assert len(rollout.groups) == groups
            batches[groups], finished = rollout.collect(_ScriptedPolicy(act, value), 6)
            starts[groups] = dict(rollout.next_index)
            assert len(finished) == 4 * 2  # every 7-step episode ended twice (after chunks of 3, 3, 1)
    for field in dataclasses.fields(RolloutBatch):
        a, b = getattr(batches[1], field.name), getattr(batches[2], field.name)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=field.name)
    assert starts[1] == starts[2]


def test_pool_answers_overlapping_calls_to_their_own_waiters():
    tasks = ["reach-v3", "drawer-close-v3", "reach-v3", "drawer-close-v3"]
    specs = [SlotSpec(SUITE, t, EnvConfig(image_size=IMAGE_SIZE), 2) for t in tasks]
    chunk = np.full((2, 4), 0.5, np.float32)
    with make_pool(specs, num_workers=2) as pool:
        assert pool.groups(2) == [[0, 1], [2, 3]]  # each group spans both workers
        pool.reset({i: {"split": "train", "index": i} for i in range(4)})
        first = pool.submit({0: chunk, 1: chunk}, {0: {}, 1: {}})
        second = pool.submit({2: chunk, 3: chunk}, {2: {}, 3: {}})
        later = pool.wait(second)  # waiting out of order keeps the first call's answers for it
        earlier = pool.wait(first)
        assert sorted(earlier) == [0, 1] and sorted(later) == [2, 3]
        for results in (earlier, later):
            assert all(isinstance(r, StepResult) and r.info["steps"] == 2 and r.reset_observation is None
                       for r in results.values())
        pool.submit({0: chunk}, {0: {}})  # left unanswered: closing the pool must still work


# =========================================================================== demo buffer and admission
def _demo(length, task=TASK, seed=0, size=8) -> Episode:
    rng = np.random.default_rng(seed)
    rewards = np.zeros(length, np.float32)
    rewards[-1] = 1
    return Episode(
        task=task, instruction=instruction(task), success=True, steps=length, split="train", config_index=seed,
        source="scripted", images=rng.integers(0, 256, (length, size, size, 3), dtype=np.uint8),
        proprio=rng.normal(size=(length, 4)).astype(np.float32),
        actions=rng.uniform(-1, 1, (length, 4)).astype(np.float32), rewards=rewards,
    )


def _self_episode(length, task=TASK, seed=100, h=3, size=8) -> Episode:
    """A chunked policy's success: an observation per decision (every h steps), the actions of every step."""
    rng = np.random.default_rng(seed)
    n = -(-length // h)
    return Episode(
        task=task, instruction=instruction(task), success=True, steps=length, config_index=seed, source="policy",
        images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), proprio=rng.normal(size=(n, 4)).astype(np.float32),
        actions=rng.uniform(-1, 1, (length, 4)).astype(np.float32), decision_steps=np.arange(n) * h,
    )


def _seeded(demos, tasks=(TASK,), capacity=50, h=3) -> DemoBuffer:
    """A buffer seeded as `train_ppo` seeds it."""
    buffer = DemoBuffer(list(tasks), capacity, h)
    for key, demo in enumerate(demos):
        keep_shortest(buffer, demo, demo_key=key)
    return buffer


def _lengths(buffer, task=TASK):
    return sorted(e.length for e in buffer.entries(task))


def test_buffer_stores_each_episode_as_padded_chunk_samples():
    buffer = DemoBuffer([TASK], 4, 3)
    demo = _demo(4)
    buffer.put(demo, demo_key=5)
    (entry,) = buffer.entries(TASK)
    assert entry.is_demo and entry.demo_key == 5 and entry.length == 4 and entry.episode is demo
    assert entry.targets.shape == (4, 3, 4), "a demonstration gives a sample at every step"
    np.testing.assert_array_equal(entry.targets[1], demo.actions[1:4])
    np.testing.assert_array_equal(entry.targets[3], demo.actions[[3, 3, 3]])
    np.testing.assert_array_equal(entry.pad[2], [False, False, True])
    np.testing.assert_array_equal(entry.pad[0], [False, False, False])

    own = _self_episode(7)
    buffer.put(own)
    entry = buffer.entries(TASK)[1]
    assert not entry.is_demo and entry.length == 7
    assert entry.targets.shape == (3, 3, 4), "a chunked policy's episode gives a sample per decision"
    np.testing.assert_array_equal(entry.targets[1], own.actions[3:6])
    np.testing.assert_array_equal(entry.pad, [[False] * 3, [False] * 3, [False, True, True]])
    assert buffer.admitted == 1 and buffer.replaced == 0

    with pytest.raises(ValueError, match="failed"):
        buffer.put(dataclasses.replace(_self_episode(3), success=False))
    with pytest.raises(ValueError, match="push-v3"):
        buffer.put(_self_episode(3, task="push-v3"))
    buffer.put(_self_episode(3, seed=1))
    buffer.put(_self_episode(3, seed=2))
    with pytest.raises(ValueError, match="full"):
        buffer.put(_self_episode(3, seed=3))


def test_seeding_keeps_the_shortest_demos_and_admission_the_shorter_successes():
    demos = [_demo(5, seed=0), _demo(9, seed=1), _demo(7, seed=2), _demo(6, seed=3)]
    buffer = _seeded(demos, capacity=3)
    assert _lengths(buffer) == [5, 6, 7]  # the 9 made room for the 6
    assert [e.demo_key for e in buffer.entries(TASK)] == [0, 3, 2]
    assert buffer.stats()["admitted"] == 0 and buffer.stats()["self_fraction"] == 0

    assert keep_shortest(buffer, _self_episode(4)) is True  # full, shorter than the longest: replaces the 7
    assert _lengths(buffer) == [4, 5, 6] and buffer.admitted == 1 and buffer.replaced == 1
    assert keep_shortest(buffer, _self_episode(6)) is False  # ties with the longest: not shorter
    assert keep_shortest(buffer, _self_episode(50)) is False
    assert _lengths(buffer) == [4, 5, 6] and buffer.admitted == 1
    assert keep_shortest(buffer, _self_episode(2)) is True  # replaces the 6
    assert _lengths(buffer) == [2, 4, 5]
    stats = buffer.stats()
    assert stats["episodes"] == 3 and stats["self_fraction"] == pytest.approx(2 / 3)
    assert stats["mean_length"] == pytest.approx(11 / 3) and stats["admitted"] == 2
    assert set(stats) == {"episodes", "self_fraction", "mean_length", "admitted"}


def test_admission_takes_longer_episodes_while_the_task_has_room():
    buffer = _seeded([_demo(5)], capacity=3)
    assert keep_shortest(buffer, _self_episode(40)) is True
    assert buffer.replaced == 0 and _lengths(buffer) == [5, 40]


def test_buffer_rejects_bad_capacity_and_empty_sampling():
    with pytest.raises(ValueError, match="capacity"):
        DemoBuffer([TASK], 0, 3)
    with pytest.raises(ValueError, match="empty"):
        DemoBuffer([TASK, "push-v3"], 4, 3).sample(4, np.random.default_rng(0))


def test_buffer_samples_only_stored_tasks_with_the_right_shapes():
    buffer = _seeded([_demo(5), _demo(4, "door-open-v3", seed=1)], tasks=(TASK, "push-v3", "door-open-v3"), capacity=4)
    keep_shortest(buffer, _self_episode(60, seed=7))  # long episode: sampling is uniform over tasks, not samples
    out = buffer.sample(400, np.random.default_rng(0))
    assert out["image"].shape == (400, 8, 8, 3) and out["image"].dtype == np.uint8
    assert out["proprio"].shape == (400, 4)
    assert out["actions"].shape == (400, 3, 4) and out["actions"].dtype == torch.float32
    assert out["action_pad"].shape == (400, 3) and out["action_pad"].dtype == torch.bool
    assert set(out["instruction"]) == {instruction(TASK), instruction("door-open-v3")}
    share = out["instruction"].count(instruction(TASK)) / 400
    assert 0.4 < share < 0.6, share
    # every sample is a stored (image, chunk, pad) row
    rows = {
        (e.episode.images[j].tobytes(), e.targets[j].tobytes(), e.pad[j].tobytes())
        for task in buffer.tasks for e in buffer.entries(task) for j in range(len(e.targets))
    }
    for i in range(0, 400, 7):
        key = (out["image"][i].tobytes(), out["actions"][i].numpy().tobytes(), out["action_pad"][i].numpy().tobytes())
        assert key in rows


def test_buffer_state_round_trips_through_safetensors(tmp_path):
    demos = [_demo(5), _demo(7, seed=1), _demo(6, "push-v3", seed=2)]
    buffer = _seeded(demos, tasks=(TASK, "push-v3"), capacity=2)
    keep_shortest(buffer, _self_episode(4, seed=11))  # replaces the 7
    keep_shortest(buffer, _self_episode(5, "push-v3", seed=12))  # room: appended
    tensors, meta = buffer.state()
    assert all(k.startswith("buffer.") for k in tensors) and len(tensors) == 2 * 4, "demos are stored by reference"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "state.safetensors"))
    meta = json.loads(json.dumps(meta))

    restored = DemoBuffer([TASK, "push-v3"], 2, 3)
    restored.load_state(load_file(str(tmp_path / "state.safetensors")), meta, demos)
    assert restored.admitted == buffer.admitted == 2 and restored.replaced == buffer.replaced == 1
    for task in buffer.tasks:
        assert len(restored.entries(task)) == len(buffer.entries(task))
        for a, b in zip(buffer.entries(task), restored.entries(task)):
            assert (a.length, a.is_demo, a.demo_key) == (b.length, b.is_demo, b.demo_key)
            assert (a.episode.task, a.episode.instruction, a.episode.source) == (b.episode.task, b.episode.instruction,
                                                                                 b.episode.source)
            for name in ("targets", "pad"):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
            for name in ("images", "proprio", "actions"):
                np.testing.assert_array_equal(getattr(a.episode, name), getattr(b.episode, name))
                assert getattr(a.episode, name).dtype == getattr(b.episode, name).dtype
    out_a = buffer.sample(16, np.random.default_rng(3))
    out_b = restored.sample(16, np.random.default_rng(3))
    np.testing.assert_array_equal(out_a["image"], out_b["image"])
    assert torch.equal(out_a["actions"], out_b["actions"])
    # the restored order is the saved one: the next admission replaces the same entry
    assert keep_shortest(restored, _self_episode(3, seed=13)) and keep_shortest(buffer, _self_episode(3, seed=13))
    assert [e.length for e in restored.entries(TASK)] == [e.length for e in buffer.entries(TASK)]

    with pytest.raises(ValueError, match="earlier vlapt version"):
        DemoBuffer([TASK, "push-v3"], 2, 3).load_state({}, {**meta, "version": 1}, demos)


def test_removed_admission_rules_and_options_are_refused():
    for rule in ("advantage", "pace", "best"):
        with pytest.raises(ValueError, match="buffer_admission"):
            PPOConfig(tasks=[TASK], buffer_admission=rule).validate()
    PPOConfig(tasks=[TASK], buffer_admission="none").validate()
    for option in ("value_lr=1e-3", "shaping_coef=0.5", "execute_steps=2", "bc_target=reference",
                   "bc_self_actions=executed", "correlated_noise_log_std=-1.0", "normalize_advantages=false",
                   "buffer_admit_self=false", "advantage_norm_decay=0.9", "reward=dense"):
        with pytest.raises(ConfigError, match=option.split("=")[0]):
            load_config(PPOConfig, overrides=[option])


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


# =========================================================================== updates
def _fake_rollout(model, T=2, S=2, seed=0) -> RolloutBatch:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (T, S, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    proprio = rng.normal(size=(T, S, 4)).astype(np.float32)
    tasks = [TASK, "push-v3"][:S]
    instructions = [instruction(t) for t in tasks]
    obs = {"image": images.reshape(T * S, IMAGE_SIZE, IMAGE_SIZE, 3), "proprio": proprio.reshape(T * S, 4),
           "instruction": [instructions[i % S] for i in range(T * S)]}
    sample = model.act(obs, generator=torch.Generator().manual_seed(seed))
    h, a = model.chunk_len, model.action_dim
    return RolloutBatch(
        images=images, proprio=proprio, instructions=instructions, tasks=tasks,
        actions=sample.actions.numpy().reshape(T, S, h, a), log_probs=sample.log_prob.reshape(T, S),
        values=sample.value.reshape(T, S), rewards=rng.normal(size=(T, S)).astype(np.float32),
        discounts=np.full((T, S), 0.9**h, np.float32), dones=np.zeros((T, S), bool), steps=np.full((T, S), h, np.int32),
        last_values=np.zeros(S, np.float32), valid=np.ones((T, S), bool),
    )


def _run_update(model, bc_weight=None, buffer=None, lr=1e-3, optimizer=None, rollout=None, critic_only=False,
                **config_changes):
    config = PPOConfig(**{"tasks": [TASK], "epochs": 2, "minibatch_size": 2, "target_kl": 0.0, "bc_batch_size": 4,
                          **config_changes})
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    stats = _update(
        model, optimizer, rollout or _fake_rollout(model), buffer, bc_weight or BCWeight("none", 0.1, 1.5, 0.1, 1e-3, 10.0),
        config, np.random.default_rng(0), critic_only=critic_only,
    )
    return stats, optimizer


def _bc_buffer(h=5):
    return _seeded([_demo(6, size=IMAGE_SIZE), _demo(4, "push-v3", seed=1, size=IMAGE_SIZE)], tasks=(TASK, "push-v3"), h=h)


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_the_update_rescores_with_the_network_that_sampled_dropout_and_all():
    torch.manual_seed(0)
    config = policy_config_for_size("tiny", image_size=IMAGE_SIZE, chunk_len=5, dropout=0.5,
                                    vocab=Tokenizer.build(SUITE.vocabulary()).vocab)
    model = VLAPolicy(config).eval()
    stats, _ = _run_update(model, lr=0.0, epochs=1)  # weights unchanged: every ratio is exactly 1
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-6) and stats["clipfrac"] == 0.0


def test_update_takes_every_minibatch_when_losses_are_finite(tiny_model):
    before = _params(tiny_model)
    stats, _ = _run_update(tiny_model)
    assert stats["updates"] == 4 and stats["nonfinite"] == 0  # 2 epochs x 2 minibatches of 2
    assert all(math.isfinite(stats[k]) for k in ("policy_loss", "value_loss", "entropy", "approx_kl"))
    assert math.isfinite(stats["explained_variance"]) and stats["action_std"] == pytest.approx(tiny_model.exploration_std())
    assert any(not torch.equal(before[k], v) for k, v in tiny_model.named_parameters())


def test_update_learns_only_from_valid_decisions(tiny_model, monkeypatch):
    rollout = _fake_rollout(tiny_model)
    rollout.valid[0, 1] = False  # lost with its env worker
    seen = []

    def spy(policy, observations, actions, *args):
        seen.append(observations["proprio"].copy())
        return ppo_losses(policy, observations, actions, *args)

    monkeypatch.setattr(ppo_module, "ppo_losses", spy)
    stats, _ = _run_update(tiny_model, rollout=rollout, minibatch_size=8)
    assert stats["updates"] == 2 and [len(p) for p in seen] == [3, 3]
    lost = rollout.proprio[0, 1]
    assert not any((p == lost).all(axis=1).any() for p in seen)


def test_update_normalises_advantages_per_minibatch_unless_asked_not_to(tiny_model, monkeypatch):
    seen = []

    def spy(policy, observations, actions, old_logp, old_values, advantages, *args):
        seen.append(advantages.clone())
        return ppo_losses(policy, observations, actions, old_logp, old_values, advantages, *args)

    monkeypatch.setattr(ppo_module, "ppo_losses", spy)
    _run_update(copy.deepcopy(tiny_model), minibatch_size=4, epochs=1)
    assert seen[0].mean().abs() < 1e-6 and seen[0].std().item() == pytest.approx(1.0, abs=1e-4)
    seen.clear()
    rollout = _fake_rollout(tiny_model)
    _run_update(copy.deepcopy(tiny_model), rollout=rollout, minibatch_size=4, epochs=1, advantage_norm="none")
    advantages, _ = chunk_gae(rollout.rewards, rollout.values, rollout.discounts, rollout.dones, rollout.last_values, 0.95)
    torch.testing.assert_close(seen[0].sort().values, torch.from_numpy(np.sort(advantages.reshape(-1))))
    seen.clear()
    rollout.valid[0, 1] = False  # three rows in minibatches of two: the lone last row joins the one before
    _run_update(copy.deepcopy(tiny_model), rollout=rollout, minibatch_size=2, epochs=1)
    assert [len(a) for a in seen] == [3] and seen[0].mean().abs() < 1e-6
    with pytest.raises(ValueError, match="advantage_norm"):
        PPOConfig(tasks=[TASK], advantage_norm="task").validate()


def test_make_optimizer_has_an_actor_and_a_critic_group_at_the_learning_rate(tiny_model):
    optimizer = make_optimizer(tiny_model, PPOConfig(tasks=[TASK], lr=3e-5))
    assert [g["lr"] for g in optimizer.param_groups] == [3e-5, 3e-5]
    groups = tiny_model.param_groups()
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(groups["actor"]), len(groups["critic"])]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(tiny_model.parameters()))


def test_resuming_an_optimiser_with_other_parameter_groups_names_the_problem(tiny_model):
    from vlapt.algorithms.checkpointing import optimizer_from_flat, optimizer_to_flat

    _, one_group = _run_update(tiny_model)  # a plain one-group Adam
    tensors, meta = optimizer_to_flat(one_group)
    with pytest.raises(CheckpointError, match="parameter groups"):
        optimizer_from_flat(make_optimizer(tiny_model, PPOConfig(tasks=[TASK])), tensors, meta)
    two_groups = make_optimizer(tiny_model, PPOConfig(tasks=[TASK]))
    optimizer_from_flat(two_groups, *optimizer_to_flat(make_optimizer(tiny_model, PPOConfig(tasks=[TASK], lr=1e-3))))
    assert [g["lr"] for g in two_groups.param_groups] == [1e-3, 1e-3]  # the checkpoint's rates come back


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


def test_critic_warm_up_trains_only_the_critic_and_leaves_the_bc_weight_alone(tiny_model):
    before = _params(tiny_model)
    w = BCWeight("lagrangian", 0.1, 1.5, 0.1, 1e-3, 10.0)
    stats, _ = _run_update(tiny_model, w, _bc_buffer(), critic_only=True)
    assert stats["bc_loss"] == 0.0 and w.target is None
    after = _params(tiny_model)
    for name in before:  # the actor's own parameters get no gradient (the shared trunk learns for the critic)
        if name.startswith("action_head") or name == "log_std":
            assert torch.equal(after[name], before[name]), name
    assert all(not torch.equal(after[k], before[k]) for k in before if k.startswith("value_head"))


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
def test_ppo_is_the_algorithm_named_ppo():
    algorithm = get_algorithm("ppo")
    assert algorithm.name == "ppo" and algorithm.config is PPOConfig and algorithm.train is train_ppo
    assert PPOConfig().algorithm == "ppo"
    with pytest.raises(ValueError, match="unknown algorithm 'no_such_algorithm'.*ppo"):
        get_algorithm("no_such_algorithm")


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
            "buffer": {t: [(e.is_demo, e.length, e.demo_key) for e in buffer.entries(t)] for t in buffer.tasks},
            "critic_only": kwargs["critic_only"],
            "steps": int(batch.steps.sum()),
        })
        return original(model, optimizer, batch, buffer, bc_weight, *args, **kwargs)

    mp.setattr(ppo_module, "_update", spy)


class _RecordingEvaluator:
    """An evaluator that scores nothing: it records what it was given (and what the checkpoint held then)."""

    def __init__(self, crash_at: int | None = None):
        self.calls: list[Path] = []
        self.state_json: dict[Path, bytes] = {}
        self.crash_at = crash_at

    def __call__(self, path: Path) -> dict:
        path = Path(path)
        self.calls.append(path)
        if (path / "state.json").is_file():
            self.state_json[path] = (path / "state.json").read_bytes()
        if self.crash_at is not None and path.name == f"step_{self.crash_at:09d}":
            raise _Crash(f"killed while evaluating {path.name}")
        metrics = {"episodes": 1, "success_rate": 0.25, "steps_to_success": 42.0, "steps_failures_as_limit": 100.0}
        return {"agent": str(path), "per_task": {TASK: metrics}, "average": metrics}


# env steps after which the uniform average takes the iterates: each iteration makes at most 20, so the reference run's
# first actor iterate (iteration 2) stays out and its last enters; the resumed run's takes every actor iterate
SWA_START, SWA_START_RESUMED = 40, 1


@pytest.fixture(scope="module")
def reference_run(dataset, sft_policy, tmp_path_factory):
    """An uninterrupted run that evaluates (for real, through `checkpoint_evaluator`) every 3rd iteration and at the end."""
    out = tmp_path_factory.mktemp("ppo_reference")
    records, evaluated = [], []
    real = checkpoint_evaluator([TASK], 1, 0, "mt10", seed=0)

    def evaluator(path):
        evaluated.append(Path(path))
        return real(path)

    with pytest.MonkeyPatch.context() as mp:
        _spy_updates(mp, records)
        final = train_ppo(_ppo_config(dataset, sft_policy, out, eval_every=3, ema_decay=0.5, keep_checkpoints=0,
                                      swa_start_env_steps=SWA_START), progress=False, evaluator=evaluator)
    return SimpleNamespace(out=out, final=final, records=records, evaluated=evaluated)


@pytest.fixture(scope="module")
def resumed_run(dataset, sft_policy, tmp_path_factory):
    """The same run, evaluated every iteration, killed inside iteration 3 and resumed."""
    out = tmp_path_factory.mktemp("ppo_resumed")
    config = _ppo_config(dataset, sft_policy, out, eval_every=1, ema_decay=0.5, swa_start_env_steps=SWA_START_RESUMED)
    before_crash = _RecordingEvaluator()
    with pytest.MonkeyPatch.context() as mp:
        original = ppo_module._update
        calls = []

        def crash_in_third(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise _Crash("killed after the rollout of iteration 3")
            return original(*args, **kwargs)

        mp.setattr(ppo_module, "_update", crash_in_third)
        with pytest.raises(_Crash):
            train_ppo(config, progress=False, evaluator=before_crash)
    checkpoint = latest_checkpoint(out)
    state_file = checkpoint / "state.json"  # a window entry no real episode gives: it must come back on resume
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()),
                                      "recent": json.loads(state_file.read_text())["recent"] + [[True, 1]]}))
    _, tensors, state = load_training_checkpoint(checkpoint)
    weights = load_policy(checkpoint).state_dict()
    records, start_indices, purge_steps = [], [], []
    after_crash = _RecordingEvaluator()

    class RecordingRollout(ChunkedRollout):
        def __init__(self, pool, tasks, gamma, chunk_len, start_index=None, groups=2):
            start_indices.append(dict(start_index))
            super().__init__(pool, tasks, gamma, chunk_len, start_index, groups)

    from torch.utils import tensorboard

    class RecordingWriter(tensorboard.SummaryWriter):
        def __init__(self, *args, purge_step=None, **kwargs):
            purge_steps.append(purge_step)
            super().__init__(*args, purge_step=purge_step, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ppo_module, "ChunkedRollout", RecordingRollout)
        mp.setattr(tensorboard, "SummaryWriter", RecordingWriter)
        _spy_updates(mp, records)
        final = train_ppo(config, progress=False, evaluator=after_crash)
    return SimpleNamespace(out=out, final=final, records=records, checkpoint=checkpoint, state=state, weights=weights,
                           tensors=tensors, start_indices=start_indices, purge_steps=purge_steps,
                           before_crash=before_crash, after_crash=after_crash)


def _history(out):
    return json.loads((out / "history.json").read_text())


def _same(a, b) -> bool:
    """Equality of JSON rows where NaN equals NaN."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_train_ppo_end_to_end(reference_run, sft_policy, dataset):
    out, records = reference_run.out, reference_run.records
    assert reference_run.final == out / "policy"
    policy = vlapt.load_policy(out / "policy")
    assert policy.config.image_size == IMAGE_SIZE and policy.chunk_len == 5
    init = load_policy(sft_policy).state_dict()
    trained = policy.state_dict()
    assert any(not torch.equal(init[k], trained[k]) for k in init)
    assert all(torch.isfinite(v).all() for v in trained.values())
    metadata = json.loads((out / "policy" / "config.json").read_text())["metadata"]
    assert metadata["iterations"] == len(_history(out))
    assert metadata["init_state_sha256"] == state_sha256(load_policy(sft_policy)) != state_sha256(policy)

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
        assert row["updates"] > 0 and row["buffer_episodes"] >= 2 and row["lost_episodes"] == 0
        assert math.isfinite(row["value_loss"]) and math.isfinite(row["policy_loss"])
        assert not any(key.startswith("eval") for key in row), "evaluations live in evals/, not in the history"

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
    # the buffer was seeded with both demonstrations, by reference
    demos = read_episodes(dataset)
    assert records[0]["buffer"][TASK] == [(True, len(d), k) for k, d in enumerate(demos)]

    # checkpoints: every iteration, all kept (keep_checkpoints=0; the resumed run below keeps the default two), the
    # latest holds the final state
    last = out / "checkpoints" / f"step_{n:09d}"
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == [f"step_{i:09d}" for i in range(1, n + 1)]
    assert latest_checkpoint(out) == last
    _, tensors, state = load_training_checkpoint(last)
    assert state["iteration"] == n and state["env_steps"] == steps[-1]
    assert [row["iteration"] for row in state["history"]] == list(range(1, n + 1))
    assert "rng.sample" in tensors and state["next_index"][TASK] >= 1
    assert state["buffer"]["admitted"] == history[-1]["buffer_admitted"]
    assert (out / "config.yaml").is_file() and list((out / "tb").glob("events.out.tfevents.*"))


def test_periodic_evaluation_scores_the_start_and_every_eval_every_th_checkpoint(reference_run, sft_policy):
    out, n = reference_run.out, len(_history(reference_run.out))
    expected = [Path(sft_policy)] + [out / "checkpoints" / f"step_{i:09d}" for i in sorted({3, n})]
    assert reference_run.evaluated == expected
    evals = sorted(p.name for p in (out / "evals").glob("iteration_*.json"))
    assert evals == [f"iteration_{i:06d}.json" for i in sorted({0, 3, n})]
    result = json.loads((out / "evals" / f"iteration_{n:06d}.json").read_text())
    assert result["protocol"]["split"] == "eval" and result["protocol"]["deterministic"] is True
    assert result["protocol"]["tasks"] == [TASK] and result["protocol"]["episodes_per_task"] == 1
    assert 0.0 <= result["average"]["success_rate"] <= 1.0
    # only output_dir/evals: nothing is written into the checkpoints
    for checkpoint in (out / "checkpoints").glob("step_*"):
        assert sorted(p.name for p in checkpoint.iterdir()) == ["config.json", "model.safetensors", "state.json",
                                                                 "state.safetensors"]


def test_train_ppo_without_an_evaluator_evaluates_nothing(dataset, sft_policy, tmp_path):
    train_ppo(_ppo_config(dataset, sft_policy, tmp_path / "run", eval_every=1, total_env_steps=20), progress=False)
    assert not (tmp_path / "run" / "evals").exists()
    evaluator = _RecordingEvaluator()
    train_ppo(_ppo_config(dataset, sft_policy, tmp_path / "off", eval_every=0, total_env_steps=20), progress=False,
              evaluator=evaluator)
    assert evaluator.calls == [] and not (tmp_path / "off" / "evals").exists()


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
    # checkpoints on disk: the newest two by default (the reference run keeps every one: test_train_ppo_end_to_end)
    kept = [f"step_{i:09d}" for i in range(1, len(history) + 1)]
    assert sorted(p.name for p in (resumed_run.out / "checkpoints").glob("step_*")) == kept[-2:]
    # the wall time carries on from the checkpoint's last row instead of restarting at 0
    walls = [row["wall_time_s"] for row in history]
    assert np.all(np.diff(walls) > 0) and walls[2] > walls[1] == ckpt_state["history"][-1]["wall_time_s"]
    # the rows before the crash are the checkpointed ones, and the same as in the uninterrupted run
    for mine, saved in zip(history[:2], ckpt_state["history"]):
        assert _same(mine, saved)
    for mine, ref in zip(history[:2], _history(reference_run.out)[:2]):
        assert _same({k: v for k, v in mine.items() if k not in TIMING_KEYS},
                     {k: v for k, v in ref.items() if k not in TIMING_KEYS})

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

    # the training-success window goes on from the checkpoint's episodes instead of starting empty
    _, _, final_state = load_training_checkpoint(latest_checkpoint(resumed_run.out))
    assert ckpt_state["recent"][-1] == [True, 1] and [True, 1] in final_state["recent"]
    assert history[2]["train_success"] > 0.0  # the planted success counts in the first row after the resume
    # new episodes start on the next unused configuration, not on configuration 0 again
    assert resumed_run.start_indices == [ckpt_state["next_index"]]
    assert ckpt_state["next_index"][TASK] >= 1
    assert final_state["iteration"] == len(history)
    assert final_state["next_index"][TASK] > ckpt_state["next_index"][TASK]
    assert "resumed from" in (resumed_run.out / "train.log").read_text()
    # TensorBoard drops what the crashed run logged after the checkpoint
    assert resumed_run.purge_steps == [ckpt_state["env_steps"] + 1]


def _expected_average(start: dict, iterates: list[dict], decay: float) -> dict:
    average = {k: v.clone().float() for k, v in start.items()}
    for weights in iterates:
        for k in average:
            average[k] = decay * average[k] + (1 - decay) * weights[k].float()
    return average


def test_weight_average_follows_the_iterates_and_survives_a_resume(reference_run, resumed_run):
    """ema_decay: policy_ema/ averages the iterates after the critic warm-up, and a resumed run carries the average on."""
    history = _history(reference_run.out)
    final = load_policy(reference_run.out / "policy").state_dict()
    # records[k] holds the weights iteration k + 1 starts from, i.e. those after iteration k
    iterates = [r["params"] for r in reference_run.records[2:]] + [final]  # after iterations 2..n (1 is the warm-up)
    assert len(iterates) == len(history) - 1 >= 2
    averaged = load_policy(reference_run.out / "policy_ema").state_dict()
    for k, v in _expected_average(iterates[0], iterates[1:], 0.5).items():
        torch.testing.assert_close(averaged[k].float(), v, rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(averaged[k], final[k]) for k in final), "the average is not the last iterate"
    assert json.loads((reference_run.out / "policy_ema" / "config.json").read_text())["metadata"]["ema_decay"] == 0.5

    # the checkpoint of iteration 2 holds the average so far (one iterate: itself), and the resumed run goes on from it
    saved = {k[len("ema.module."):]: v for k, v in resumed_run.tensors.items() if k.startswith("ema.module.")}
    assert saved.keys() == resumed_run.weights.keys()
    for k, v in resumed_run.weights.items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0, msg=k)
    after = [r["params"] for r in resumed_run.records[1:]] + [load_policy(resumed_run.out / "policy").state_dict()]
    resumed = load_policy(resumed_run.out / "policy_ema").state_dict()
    for k, v in _expected_average(saved, after, 0.5).items():
        torch.testing.assert_close(resumed[k].float(), v, rtol=1e-5, atol=1e-6, msg=k)


def test_weight_average_never_feeds_back_into_training(dataset, sft_policy, reference_run, tmp_path):
    """The same run without the average ends on the same weights; a later invocation without it drops the stale one."""
    plain = train_ppo(_ppo_config(dataset, sft_policy, tmp_path / "plain", ema_decay=0.0), progress=False)
    assert not (tmp_path / "plain" / "policy_ema").exists()
    with_average = load_policy(reference_run.final).state_dict()
    for k, v in load_policy(plain).state_dict().items():
        assert torch.equal(v, with_average[k]), k

    stale = tmp_path / "stale"
    shutil.copytree(reference_run.out, stale)
    assert (stale / "policy_ema").is_dir()
    train_ppo(_ppo_config(dataset, sft_policy, stale, ema_decay=0.0, swa_start_env_steps=SWA_START),
              progress=False)  # already finished
    assert (stale / "policy").is_dir() and not (stale / "policy_ema").exists() and (stale / "policy_swa").is_dir()


def test_uniform_average_starts_after_its_env_steps_and_leaves_integer_buffers_to_the_policy():
    from vlapt.algorithms.bookkeeping import WeightAverage

    model = torch.nn.Linear(1, 1, bias=False)
    model.register_buffer("mask", torch.tensor([True]))
    uniform, exponential = WeightAverage.uniform(model, 10), WeightAverage.exponential(model, 0.5)
    for value, env_steps in ((1.0, 10), (3.0, 11), (5.0, 20)):  # made at 10 env steps: not after the start
        with torch.no_grad():
            model.weight.fill_(value)
        model.mask.fill_(value < 4)
        uniform.update(model, env_steps)
        exponential.update(model, env_steps)
    assert int(uniform.average.n_averaged) == 2 and uniform.average.module.weight.item() == 4.0
    assert uniform.average.module.mask.item() is False  # the last iterate's, not an average of booleans
    assert int(exponential.average.n_averaged) == 3  # the moving average takes every update it is given
    assert WeightAverage.uniform(model, 0).average is None


def test_uniform_tail_average_takes_the_iterates_after_its_start_and_survives_a_resume(reference_run, resumed_run):
    """swa_start_env_steps: policy_swa/ is the plain mean of the actor iterates made after that many env steps."""
    history = _history(reference_run.out)
    final = load_policy(reference_run.out / "policy").state_dict()
    # records[k] holds the weights after iteration k; iteration 1 is the critic's warm-up and never enters
    iterates = [r["params"] for r in reference_run.records[2:]] + [final]
    late = [w for w, row in zip(iterates, history[1:]) if row["env_steps"] > SWA_START]
    assert 1 <= len(late) < len(iterates) and late[-1] is final, "the start leaves an actor iterate out, not the last"
    averaged = load_policy(reference_run.out / "policy_swa").state_dict()
    for k in final:
        torch.testing.assert_close(averaged[k].float(), torch.stack([w[k].float() for w in late]).mean(0),
                                   rtol=1e-5, atol=1e-6, msg=k)
    metadata = json.loads((reference_run.out / "policy_swa" / "config.json").read_text())["metadata"]
    assert metadata["swa_start_env_steps"] == SWA_START and metadata["iterates_averaged"] == len(late)

    # the checkpoint of iteration 2 holds the mean so far (iteration 2 alone: the warm-up never enters), and the
    # resumed run goes on from it
    saved = {k[len("swa.module."):]: v for k, v in resumed_run.tensors.items() if k.startswith("swa.module.")}
    count = int(resumed_run.tensors["swa.n_averaged"])
    assert saved.keys() == resumed_run.weights.keys() and count == 1
    for k, v in resumed_run.weights.items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0, msg=k)
    after = [r["params"] for r in resumed_run.records[1:]] + [load_policy(resumed_run.out / "policy").state_dict()]
    resumed = load_policy(resumed_run.out / "policy_swa").state_dict()
    for k in saved:
        expected = (saved[k].float() * count + sum(w[k].float() for w in after)) / (count + len(after))
        torch.testing.assert_close(resumed[k].float(), expected, rtol=1e-5, atol=1e-6, msg=k)


def test_evaluations_start_at_the_initial_policy_and_are_kept_per_iteration(resumed_run, sft_policy):
    history = _history(resumed_run.out)
    evals = sorted(p.name for p in (resumed_run.out / "evals").glob("iteration_*.json"))
    assert evals == [f"iteration_{i:06d}.json" for i in range(len(history) + 1)]
    # the starting (SFT) policy once, before training; the checkpointed iteration 2 is not evaluated again on resume
    checkpoints = resumed_run.out / "checkpoints"
    assert resumed_run.before_crash.calls == [Path(sft_policy), checkpoints / "step_000000001", checkpoints / "step_000000002"]
    assert resumed_run.after_crash.calls == [checkpoints / f"step_{i:09d}" for i in range(3, len(history) + 1)]
    assert json.loads((resumed_run.out / "evals" / "iteration_000002.json").read_text())["agent"] == str(
        checkpoints / "step_000000002")


def test_evaluation_never_modifies_a_published_checkpoint(resumed_run):
    last = latest_checkpoint(resumed_run.out)
    assert last in resumed_run.after_crash.state_json
    assert (last / "state.json").read_bytes() == resumed_run.after_crash.state_json[last]
    assert not (last / "eval.json").exists()
    state = json.loads((last / "state.json").read_text())
    assert not any(key.startswith("eval") for row in state["history"] for key in row)


def test_a_run_killed_during_an_evaluation_evaluates_that_checkpoint_on_resume(dataset, sft_policy, tmp_path):
    config = _ppo_config(dataset, sft_policy, tmp_path / "run", eval_every=2, total_env_steps=50)
    crashing = _RecordingEvaluator(crash_at=2)
    with pytest.raises(_Crash):
        train_ppo(config, progress=False, evaluator=crashing)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000000002"
    assert latest_checkpoint(tmp_path / "run") == checkpoint
    assert not (tmp_path / "run" / "evals" / "iteration_000002.json").exists()
    again = _RecordingEvaluator()
    train_ppo(config, progress=False, evaluator=again)
    assert again.calls[0] == checkpoint, "the interrupted evaluation runs first"
    assert (tmp_path / "run" / "evals" / "iteration_000002.json").is_file()
    assert again.calls.count(checkpoint) == 1


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
        (dict(tasks=["reach-v9"]), "reach-v9"), (dict(rollout_groups=0), "rollout_groups"),
        (dict(ema_decay=1.0), "ema_decay"), (dict(buffer_admission="pace"), "buffer_admission"),
        (dict(advantage_norm="task"), "advantage_norm"), (dict(env_backend="carrier-pigeon"), "backend"),
        (dict(checkpoint_every=0), "checkpoint_every"), (dict(suite="mt99"), "mt99"),
        (dict(swa_start_env_steps=-1), "swa_start_env_steps"), (dict(swa_start_env_steps=60), "swa_start_env_steps"),
    ]
    for change, word in cases:
        with pytest.raises(ValueError, match=word):
            train_ppo(_ppo_config(dataset, sft_policy, tmp_path / "run", **change), progress=False)
    assert not (tmp_path / "run").exists()


def test_train_ppo_refuses_relabelled_demonstrations(dataset, sft_policy, tmp_path):
    relabelled = tmp_path / "relabelled.hdf5"
    with DemoWriter(relabelled, {**env_args(dataset), "relabelled": {"executed_policy": "p"}}) as writer:
        for episode in read_episodes(dataset):
            writer.add(dataclasses.replace(episode, source="relabelled"))
    with pytest.raises(ValueError, match="relabel"):
        train_ppo(_ppo_config(relabelled, sft_policy, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, message", [
    (dict(camera="corner+topview"), r"camera='corner\+topview', init_policy with camera='corner'"),
    (dict(camera_fovy=45.0), "camera_fovy=45.0, init_policy with camera_fovy=30.0"),
    (dict(image_size=64), "image_size=64, init_policy with image_size=32"),
])
def test_train_ppo_refuses_demonstrations_rendered_otherwise_than_the_policy_sees(dataset, sft_policy, tmp_path,
                                                                                 change, message):
    other = tmp_path / "other.hdf5"
    with DemoWriter(other, {**env_args(dataset), "camera_fovy": 30.0, **change}) as writer:
        for episode in read_episodes(dataset):
            writer.add(episode)
    assert load_policy(sft_policy).observation_config().camera_fovy == 30.0
    with pytest.raises(ValueError, match=message + ".*vlapt collect camera=corner camera_fovy=30.0 image_size=32"):
        train_ppo(_ppo_config(other, sft_policy, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_demonstrations_that_do_not_record_their_camera_are_held_to_their_image_size(dataset, tmp_path):
    from vlapt.data.format import check_observed_as

    unknown = tmp_path / "unknown_camera.hdf5"  # as LeRobot's own datasets read: no camera recorded
    with DemoWriter(unknown, {**env_args(dataset), "camera": "", "camera_fovy": 0.0}) as writer:
        for episode in read_episodes(dataset):
            writer.add(episode)
    suite = get_suite("mt10")
    check_observed_as(unknown, EnvConfig(camera="topview", camera_fovy=45.0, image_size=IMAGE_SIZE), suite)
    with pytest.raises(ValueError, match=r"does not record its camera, so its images are one view, and the policy reads 2"):
        check_observed_as(unknown, EnvConfig(camera="corner+topview", image_size=IMAGE_SIZE), suite)
    with pytest.raises(ValueError, match=f"image_size={IMAGE_SIZE}, the policy with image_size=64"):
        check_observed_as(unknown, EnvConfig(image_size=64), suite)


def test_buffer_admission_none_keeps_the_demonstrations_only(dataset, sft_policy, tmp_path, monkeypatch):
    """The policy's successes enter the buffer under buffer_admission=shorter (the default), never under none."""
    original = ChunkedRollout.collect
    rng = np.random.default_rng(0)

    def collect_with_a_success(self, policy, horizon, generator=None):
        batch, finished = original(self, policy, horizon, generator)
        fast = Episode(task=TASK, instruction=instruction(TASK), success=True, steps=3, source="policy",
                       images=rng.integers(0, 256, (1, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
                       proprio=np.zeros((1, 4), np.float32), actions=np.zeros((3, 4), np.float32),
                       decision_steps=np.zeros(1, np.int64))
        return batch, [*finished, fast]

    monkeypatch.setattr(ChunkedRollout, "collect", collect_with_a_success)
    for rule, admitted in (("shorter", True), ("none", False)):
        out = tmp_path / rule
        train_ppo(_ppo_config(dataset, sft_policy, out, buffer_admission=rule, total_env_steps=30), progress=False)
        history = _history(out)
        assert (history[-1]["buffer_admitted"] >= len(history)) is admitted, rule
        assert (history[-1]["buffer_self_fraction"] > 0) is admitted, rule
        assert bool(history[-1]["buffer_mean_length"] < np.mean([len(d) for d in read_episodes(dataset)])) is admitted
        if not admitted:
            assert history[-1]["buffer_admitted"] == 0 and history[-1]["buffer_episodes"] == 2


# -- the learner's device and precision ---------------------------------------------------------------------
def test_update_in_bf16_learns_with_finite_losses(tiny_model):
    before = _params(tiny_model)
    stats, _ = _run_update(tiny_model, lr=1e-3, precision="bf16")
    assert stats["updates"] > 0 and all(math.isfinite(stats[k]) for k in ("policy_loss", "value_loss", "approx_kl"))
    assert any(not torch.equal(before[k], v) for k, v in _params(tiny_model).items())


def test_learner_options_are_checked():
    for bad, message in (({"precision": "fp16"}, "precision must be one of fp32, bf16"),
                         ({"rollout_device": "gpu"}, "rollout_device must be one of cpu, learner"),
                         ({"device": "tpu"}, "unknown device 'tpu'"),
                         ({"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "mps"}, "not available")):
        with pytest.raises(ValueError, match=message):
            PPOConfig(tasks=[TASK], **bad).validate()
    assert PPOConfig(tasks=[TASK], device="auto").validate()


def test_post_training_in_bf16_resumes(dataset, sft_policy, tmp_path):
    out = tmp_path / "ppo"
    config = _ppo_config(dataset, sft_policy, out, precision="bf16", total_env_steps=40)
    final = train_ppo(config, progress=False)
    history = _history(out)
    assert all(math.isfinite(row["approx_kl"]) for row in history[1:]) and load_policy(final).chunk_len == 5
    train_ppo(dataclasses.replace(config, total_env_steps=80), progress=False)
    assert _history(out)[-1]["env_steps"] >= 80
