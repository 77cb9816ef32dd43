"""The Ray env-pool backend on a local Ray with 2 CPUs: the same batch as the local backend, and actors that die
or hang replaced with their episodes reported lost."""

from __future__ import annotations

import dataclasses
import os
import signal

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

import vlapt  # noqa: E402,F401  (sets the headless GL backend before mujoco is imported)
from vlapt.envs import get_suite  # noqa: E402
from vlapt.envs.pools import WorkerError, make_pool  # noqa: E402
from vlapt.envs.pools.ray import RayPool, connect  # noqa: E402
from vlapt.envs.pools.subprocess import SubprocessPool  # noqa: E402
from vlapt.interfaces import EnvConfig, EnvPool, SlotSpec, StepResult  # noqa: E402
from vlapt.policies.vla import Tokenizer, VLAPolicy, policy_config_for_size  # noqa: E402
from vlapt.rollout.chunked import ChunkedRollout  # noqa: E402

SUITE = get_suite("mt10")
TASK = "reach-v3"
H = 5  # chunk length
CONFIG = EnvConfig(image_size=32, max_episode_steps=12)  # episodes end (mid-chunk) within a short rollout


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    connect("local", num_cpus=2)  # as a pool starts its own Ray; never a cluster `ray start` left running
    yield
    ray.shutdown()


def _slots(n=2):
    return [SlotSpec(SUITE, TASK, CONFIG, H) for _ in range(n)]


def _collect(pool, policy, iterations=2, horizon=4):
    rollout = ChunkedRollout(pool, [TASK] * len(pool), 0.99, H, {TASK: 0})
    generator = torch.Generator().manual_seed(7)
    return [rollout.collect(policy, horizon, generator) for _ in range(iterations)], rollout


def _assert_same(a, b):
    if dataclasses.is_dataclass(a):
        _assert_same(dataclasses.asdict(a), dataclasses.asdict(b))
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def test_ray_pool_collects_exactly_the_batch_the_local_pool_collects():
    torch.manual_seed(0)
    policy = VLAPolicy(policy_config_for_size("tiny", image_size=32, chunk_len=H,
                                              vocab=Tokenizer.build(SUITE.vocabulary()).vocab)).eval()
    with make_pool(_slots(), num_workers=2, backend="local") as local:
        assert isinstance(local, SubprocessPool)
        expected, _ = _collect(local, policy)
    with make_pool(_slots(), num_workers=2, backend="ray") as pool:
        assert isinstance(pool, RayPool) and isinstance(pool, EnvPool)
        assert pool.groups(2) == local.groups(2) and len({pool.actor_pid(w) for w in range(2)}) == 2
        got, rollout = _collect(pool, policy)
        assert rollout.lost_episodes == 0 and pool.lost_episodes == 0
        _assert_same(expected, got)
        batches = [batch for batch, _ in got]
        assert sum(len(finished) for _, finished in got) >= 2, "episodes ended and were reset within the rollout"
        assert all(b.valid.all() for b in batches)

        # an actor killed between iterations: its slot's decision is lost, never learned from or reported as an episode
        ray.kill(pool.actor(0))
        batch, finished = rollout.collect(policy, 4, torch.Generator().manual_seed(8))
        assert not batch.valid[0, 0] and batch.valid[:, 1].all() and batch.valid[1:, 0].all()
        assert batch.steps[0, 0] == 0 and batch.dones[0, 0]
        assert rollout.lost_episodes == 1 and pool.lost_episodes == 1
        assert len(finished) == int((batch.dones & batch.valid).sum()), "the lost episode is not reported as finished"


def test_an_env_error_is_reported_and_the_actor_goes_on():
    with make_pool(_slots(1), num_workers=1, backend="ray") as pool:
        pool.reset({0: {"split": "eval", "index": 1}})
        with pytest.raises(WorkerError, match="(?s)env actor 0 .*ValueError: action chunk must have shape"):
            pool.wait(pool.submit({0: np.zeros((H, 7))}))
        after = pool.wait(pool.submit({0: np.zeros((H, 4))}))[0]
        assert isinstance(after, StepResult) and after.info["steps"] == H and pool.lost_episodes == 0
        assert after.observation["image"].flags.writeable, "arrays come back writable, as from a local pool"
        with pytest.raises(IndexError, match="no env slots"):
            pool.submit({1: np.zeros((H, 4))})


def test_a_killed_or_hung_actor_is_replaced_and_its_episodes_reported_lost(monkeypatch):
    monkeypatch.setenv("VLAPT_RAY_MAX_RESTARTS", "3")  # options also come from the environment
    options = [{"split": "eval", "index": 1}, {"split": "eval", "index": 2}]
    with make_pool(_slots(2), num_workers=1, backend="ray") as pool:
        assert pool.restarts_left == 3
        first = {i: obs for i, (obs, _) in pool.reset({0: options[0], 1: options[1]}).items()}
        pool.wait(pool.submit({0: np.zeros((H, 4)), 1: np.zeros((H, 4))}))
        pool.timeout_s = 3  # only now: a slow start on a loaded machine is no hang

        def step(slots, reset=True):
            return pool.wait(pool.submit({i: np.zeros((H, 4)) for i in slots},
                                         {i: options[i] for i in slots} if reset else None))

        def assert_lost(result, slot):
            assert result.truncated and not result.terminated and result.reward == 0.0
            assert result.info["lost"] and result.info["steps"] == 0 and result.info["episode_steps"] == 0
            # the new actor's env starts the next episode: the one the reset options asked for
            np.testing.assert_array_equal(result.reset_observation["image"], first[slot]["image"])
            np.testing.assert_array_equal(result.reset_observation["proprio"], first[slot]["proprio"])

        ray.kill(pool.actor(0))
        assert_lost(step([0])[0], 0)
        assert_lost(step([1])[1], 1)  # slot 1 had no step in flight when its actor died: its episode is lost too
        assert pool.lost_episodes == 2 and pool.restarts_left == 2
        going_on = step([0, 1], reset=False)
        assert all(r.info["steps"] == H and r.info["episode_steps"] == H and "lost" not in r.info
                   for r in going_on.values())

        os.kill(pool.actor_pid(0), signal.SIGKILL)
        lost = step([0, 1])
        assert_lost(lost[0], 0), assert_lost(lost[1], 1)
        os.kill(pool.actor_pid(0), signal.SIGSTOP)  # hung: replaced after timeout_s
        assert_lost(step([0])[0], 0)
        assert pool.lost_episodes == 5 and pool.restarts_left == 0
        os.kill(pool.actor_pid(0), signal.SIGKILL)
        with pytest.raises(WorkerError, match="(?s)env actor 0 .*reach-v3.*no restarts left"):
            step([0])


def test_bad_ray_options_name_the_problem(monkeypatch):
    with pytest.raises(ValueError, match="num_workers >= 1"):
        make_pool(_slots(1), num_workers=0, backend="ray")
    with pytest.raises(ValueError, match="need 6 CPUs, but the Ray cluster has 2"):
        make_pool(_slots(3), num_workers=3, backend="ray", actor_cpus=2)
    monkeypatch.setenv("VLAPT_RAY_ACTOR_CPUS", "one")
    with pytest.raises(ValueError, match="VLAPT_RAY_ACTOR_CPUS='one'"):
        make_pool(_slots(1), num_workers=1, backend="ray")
