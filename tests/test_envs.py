import re
import os
import pickle
import signal
import threading

import numpy as np
import pytest

import vlapt  # noqa: F401  (sets the headless GL backend before mujoco is imported)
from vlapt.envs import get_suite, register_suite, suite_names
from vlapt.envs.metaworld import MetaWorldSuite
from vlapt.envs.metaworld.configurations import make_configuration, make_configurations
from vlapt.envs.metaworld.env import MetaWorldVLAEnv, check_env_config
from vlapt.envs.metaworld.experts import ScriptedExpert
from vlapt.envs.metaworld.tasks import MT10, MT50
from vlapt.envs.pools import check_backend, make_pool
from vlapt.envs.pools.inprocess import InProcessPool
from vlapt.envs.pools.subprocess import SubprocessPool, WorkerError
from vlapt.interfaces import (
    ChunkedEnv,
    EnvConfig,
    EnvPool,
    EnvSuite,
    ObservationSpec,
    SlotSpec,
    StepResult,
    UnknownTaskError,
)

SUITE = get_suite("mt10")


@pytest.fixture(scope="module")
def reach_env():
    env = MetaWorldVLAEnv("reach-v3", EnvConfig(image_size=64, privileged_state=True), chunk_len=5)
    yield env
    env.close()


def _hand_geoms(env):
    model = env._env.model
    hand = model.body("hand").id
    ids = []
    for geom in range(model.ngeom):
        body = model.geom_bodyid[geom]
        while body != 0:
            if body == hand:
                ids.append(geom)
                break
            body = model.body_parentid[body]
    return ids


def _hand_centroid(env):
    rows, cols = np.nonzero(np.isin(env.render_segmentation(), _hand_geoms(env)))
    assert len(rows) > 5, "the gripper should be visible from the default camera"
    return rows.mean(), cols.mean()


def test_every_task_has_its_own_instruction():
    assert len(MT50) == 50 and set(MT10) <= set(MT50)
    instructions = [SUITE.instruction(t) for t in MT50]
    assert len(set(instructions)) == 50
    assert all(len(i.split()) >= 2 for i in instructions)
    # the tokenizer's vocabulary is every instruction of the family, whatever the suite's own task list
    assert SUITE.vocabulary() == get_suite("mt50").vocabulary() == instructions


def test_unknown_names_are_rejected_with_choices():
    with pytest.raises(UnknownTaskError, match="reach-v3"):
        SUITE.resolve_tasks("reach-v4")
    with pytest.raises(UnknownTaskError, match="reach-v3"):
        SUITE.instruction("reach-v4")
    with pytest.raises(UnknownTaskError, match="mt10, mt50"):
        get_suite("mt11")
    with pytest.raises(ValueError, match="valid cameras"):
        check_env_config(EnvConfig(camera="ceiling"))
    with pytest.raises(ValueError, match="valid cameras"):
        SUITE.check_env_config(EnvConfig(camera="ceiling"))
    assert SUITE.resolve_tasks("push-v3, reach-v3") == ("push-v3", "reach-v3")
    assert SUITE.resolve_tasks(["push-v3", "reach-v3"]) == ("push-v3", "reach-v3")
    with pytest.raises(UnknownTaskError, match="duplicates"):
        SUITE.resolve_tasks("push-v3,push-v3")
    assert issubclass(UnknownTaskError, ValueError)


# -- suites ---------------------------------------------------------------------------------------------
def test_get_suite_finds_built_in_suites_and_import_paths():
    assert {"mt10", "mt50"} <= set(suite_names())
    mt10, mt50 = get_suite("mt10"), get_suite("MT50")  # case-insensitive
    assert isinstance(mt10, EnvSuite) and isinstance(mt50, EnvSuite)
    assert (mt10.name, mt10.family, mt10.tasks) == ("mt10", "metaworld", MT10)
    assert (mt50.name, mt50.tasks) == ("mt50", MT50)
    assert mt10.resolve_tasks() == MT10 and mt10.resolve_tasks([]) == MT10
    assert mt10.resolve_tasks("door-lock-v3") == ("door-lock-v3",), "any task of the family, not only the suite's own"
    assert mt10.max_episode_steps == 500 and mt10.expert_names == ("scripted", "scripted-fast")
    # module:attribute names a suite of one's own: a class is built, an instance is used as it is
    assert get_suite("vlapt.envs.metaworld:MT50_SUITE") is mt50
    assert get_suite("vlapt.envs.metaworld:MetaWorldSuite") == MetaWorldSuite()
    with pytest.raises(UnknownTaskError, match="cannot import env suite"):
        get_suite("vlapt.envs.no_such_module:Suite")
    with pytest.raises(UnknownTaskError, match="cannot import env suite"):
        get_suite("vlapt.envs.metaworld:NoSuchSuite")
    with pytest.raises(UnknownTaskError, match="gives a function, not an EnvSuite"):
        get_suite("vlapt.envs.metaworld.tasks:check_task")


def test_register_suite_adds_a_name_and_refuses_to_rebind_one(monkeypatch):
    import vlapt.envs

    monkeypatch.setattr(vlapt.envs, "_SUITES", dict(vlapt.envs._SUITES))  # the registration ends with the test
    custom = MetaWorldSuite("pair", ("reach-v3", "push-v3"))

    def factory():
        return custom

    register_suite("test-pair", factory)
    register_suite("test-pair", factory)  # the same factory again is fine
    assert get_suite("test-pair") is custom and "test-pair" in suite_names()
    with pytest.raises(ValueError, match="already registered"):
        register_suite("test-pair", lambda: custom)
    with pytest.raises(ValueError, match="already registered"):
        register_suite("mt10", lambda: custom)
    register_suite("Test-Mixed", factory)  # names are case-insensitive, as get_suite looks them up
    assert get_suite("Test-Mixed") is custom and get_suite("test-mixed") is custom
    with pytest.raises(ValueError, match="already registered"):
        register_suite("MT10", lambda: custom)


def test_a_suite_declared_as_an_entry_point_is_found_by_name(monkeypatch):
    import importlib.metadata as metadata

    with pytest.raises(UnknownTaskError, match="'vlapt.env_suites' entry-point group"):
        get_suite("pair-ep")

    def declared(group=None, name=None):  # as if an installed package declared the suite in its metadata
        points = [metadata.EntryPoint("Pair-EP", "vlapt.envs.metaworld:MT10_SUITE", "vlapt.env_suites"),
                  metadata.EntryPoint("class-ep", "vlapt.envs.metaworld:MetaWorldSuite", "vlapt.env_suites"),
                  metadata.EntryPoint("broken-ep", "no_such_module_xyz:Suite", "vlapt.env_suites")]
        return metadata.EntryPoints(p for p in points if p.group == group and name in (None, p.name))

    monkeypatch.setattr(metadata, "entry_points", declared)
    assert get_suite("pair-ep").tasks == get_suite("mt10").tasks and "pair-ep" in suite_names()
    assert get_suite("class-ep") == MetaWorldSuite(), "a declared class is built without arguments"
    with pytest.raises(UnknownTaskError, match="entry point, which cannot be loaded.*no_such_module_xyz"):
        get_suite("broken-ep")


def test_suite_fills_in_env_config_defaults_and_describes_observations():
    config = EnvConfig(image_size=32)
    filled = SUITE.check_env_config(config)
    assert filled.camera == "corner" and config.camera == "", "a filled-in copy; the given config is left as it was"
    assert check_env_config(EnvConfig(camera="topview")).camera == "topview"
    for bad, match in [(EnvConfig(image_size=4), "image_size"), (EnvConfig(max_episode_steps=501), "max_episode_steps"),
                       (EnvConfig(max_episode_steps=0), "max_episode_steps")]:
        with pytest.raises(ValueError, match=match):
            SUITE.check_env_config(bad)
    spec = SUITE.observation_spec(EnvConfig(image_size=32, camera_fovy=30.0))
    assert spec == ObservationSpec(camera="corner", image_size=32, camera_fovy=30.0,
                                   proprio_fields=("hand_x", "hand_y", "hand_z", "gripper"), action_dim=4,
                                   state_dim=39, aux_targets=(4, 5, 6, 36, 37, 38))


def test_several_views_render_side_by_side_each_as_alone():
    views = ("corner", "topview")
    two = MetaWorldVLAEnv("reach-v3", EnvConfig(camera="+".join(views), image_size=32, camera_fovy=30.0,
                                                 video_size=48), chunk_len=2)
    singles = [MetaWorldVLAEnv("reach-v3", EnvConfig(camera=v, image_size=32, camera_fovy=30.0)) for v in views]
    try:
        assert two.observation_space["image"].shape == (32, 64, 3)
        observation, _ = two.reset(options={"split": "eval", "index": 3})
        assert observation["image"].shape == (32, 64, 3) and two.observation_space["image"].contains(observation["image"])
        for k, single in enumerate(singles):  # each half is that camera's own image, upright, at the same zoom
            alone, _ = single.reset(options={"split": "eval", "index": 3})
            np.testing.assert_array_equal(observation["image"][:, 32 * k:32 * (k + 1)], alone["image"])
        assert not np.array_equal(observation["image"][:, :32], observation["image"][:, 32:])
        _, _, _, _, info = two.step(np.zeros((2, 4), np.float32))
        assert info["frames"].shape == (2, 48, 96, 3), "video frames show every view too"
    finally:
        for env in (two, *singles):
            env.close()
    assert SUITE.observation_spec(EnvConfig(camera="corner+topview")).camera == "corner+topview"
    with pytest.raises(ValueError, match="unknown camera 'ceiling' in camera='corner\\+ceiling'"):
        check_env_config(EnvConfig(camera="corner+ceiling"))
    with pytest.raises(ValueError, match="names a view twice"):
        check_env_config(EnvConfig(camera="corner+corner"))


def test_suite_builds_envs_configurations_and_experts():
    env = SUITE.make_env("push-v3", EnvConfig(render=False), chunk_len=3, config_seed=2)
    try:
        assert isinstance(env, ChunkedEnv) and isinstance(env, MetaWorldVLAEnv)
        assert (env.task, env.chunk_len, env.config_seed) == ("push-v3", 3, 2)
        assert env.instruction == SUITE.instruction("push-v3")
        _, info = env.reset(options={"split": "eval", "index": 4})
    finally:
        env.close()
    configuration = SUITE.configuration("push-v3", "eval", 4, seed=2)
    assert info["configuration"] == configuration == make_configuration("push-v3", "eval", 4, 2).as_dict()
    assert (configuration["task"], configuration["split"], configuration["index"], configuration["seed"]) == (
        "push-v3", "eval", 4, 2)
    assert SUITE.configuration("push-v3", "eval", 4, seed=0) != configuration
    with pytest.raises(ValueError, match="split"):
        SUITE.configuration("push-v3", "test", 0)
    with pytest.raises(UnknownTaskError):
        SUITE.make_env("push-v4", EnvConfig(render=False))
    experts = {name: SUITE.make_expert(name) for name in SUITE.expert_names}
    with pytest.raises(UnknownTaskError, match="push-v4"):
        experts["scripted"].expert("push-v4")
    assert [e.name for e in experts.values()] == ["scripted", "scripted-fast"]
    assert all(e.chunk_len == 1 and e.observation_config().privileged_state for e in experts.values())
    with pytest.raises(ValueError, match="valid experts"):
        SUITE.make_expert("oracle")


def test_observation_has_image_proprio_instruction(reach_env):
    obs, info = reach_env.reset(options={"split": "eval", "index": 0})
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    assert obs["proprio"].shape == (4,) and obs["proprio"].dtype == np.float32
    assert obs["state"].shape == (39,)
    np.testing.assert_allclose(obs["proprio"], obs["state"][:4])
    assert obs["instruction"] == SUITE.instruction("reach-v3")
    assert reach_env.observation_space.contains({k: v for k, v in obs.items()})


def test_image_is_upright_and_not_mirrored(reach_env):
    """Moving the hand up moves it up in the image; moving it to the camera's right moves it right."""
    reach_env.reset(options={"split": "eval", "index": 0})
    row0, col0 = _hand_centroid(reach_env)
    for _ in range(3):
        reach_env.step(np.tile([0.0, 0.0, 1.0, 0.0], (4, 1)))
    row1, col1 = _hand_centroid(reach_env)
    assert row1 < row0 - 2, "world up must be image up"
    cam = reach_env._env.model.camera(reach_env.config.camera).id
    cam_right = -reach_env._env.data.cam_xmat[cam].reshape(3, 3)[:, 0]  # camera x, turned 180 degrees
    cam_right[2] = 0.0
    cam_right /= np.abs(cam_right).max()
    for _ in range(3):
        reach_env.step(np.tile([cam_right[0], cam_right[1], 0.0, 0.0], (4, 1)))
    row2, col2 = _hand_centroid(reach_env)
    assert col2 > col1 + 2, "the image must not be mirrored"


def test_chunk_step_runs_all_actions_and_renders_once(reach_env, monkeypatch):
    reach_env.reset(options={"split": "eval", "index": 1})
    calls = []
    original = reach_env.render
    monkeypatch.setattr(reach_env, "render", lambda: calls.append(1) or original())
    obs, reward, terminated, truncated, info = reach_env.step(np.zeros((5, 4)))
    assert info["steps"] == 5 and info["rewards"].shape == (5,) and reward == 0.0
    assert not terminated and not truncated and info["episode_steps"] == 5
    assert len(calls) == 1


def test_chunk_stops_at_first_success_with_sparse_reward():
    env = MetaWorldVLAEnv("reach-v3", EnvConfig(render=False, privileged_state=True), chunk_len=8)
    expert = ScriptedExpert()
    obs, _ = env.reset(options={"split": "eval", "index": 0})
    # find how many expert steps reach success, then replay the same actions in chunks of 8
    actions = []
    probe = MetaWorldVLAEnv("reach-v3", EnvConfig(render=False, privileged_state=True))
    o, _ = probe.reset(options={"split": "eval", "index": 0})
    while True:
        a = expert.act_one(o["state"], "reach-v3")
        actions.append(a)
        o, _, term, trunc, _ = probe.step(a)
        if term or trunc:
            break
    assert term, "the expert solves this configuration"
    n = len(actions)
    actions += [np.zeros(4, np.float32)] * 8  # extra actions after success must not run
    executed, rewards = 0, []
    for k in range(0, len(actions), 8):
        obs, reward, terminated, truncated, info = env.step(np.stack(actions[k : k + 8]))
        executed += info["steps"]
        rewards.extend(info["rewards"].tolist())
        if terminated:
            break
    assert terminated and not truncated and info["success"]
    assert executed == n == info["episode_steps"]
    assert rewards == [0.0] * (n - 1) + [1.0]
    assert info["steps"] == (n - 1) % 8 + 1
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros((1, 4)))
    env.close()
    probe.close()


def test_step_limit_truncates_mid_chunk():
    env = MetaWorldVLAEnv("push-v3", EnvConfig(render=False, max_episode_steps=12), chunk_len=5)
    env.reset(options={"split": "train", "index": 0})
    steps = [env.step(np.zeros((5, 4)))[4]["steps"] for _ in range(2)]
    obs, reward, terminated, truncated, info = env.step(np.zeros((5, 4)))
    assert steps + [info["steps"]] == [5, 5, 2]
    assert truncated and not terminated and info["episode_steps"] == 12


def test_bad_chunk_shape_is_rejected(reach_env):
    reach_env.reset(options={"split": "eval", "index": 0})
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        reach_env.step(np.zeros((5, 3)))


def test_configurations_are_deterministic_and_splits_disjoint():
    for task in ("pick-place-v3", "door-open-v3"):
        train = make_configurations(task, "train", 60, seed=0)
        evals = make_configurations(task, "eval", 60, seed=0)
        again = make_configurations(task, "eval", 60, seed=0)
        assert [c.rand_vec for c in evals] == [c.rand_vec for c in again]
        train_vecs = np.array([c.rand_vec for c in train])
        eval_vecs = np.array([c.rand_vec for c in evals])
        distance = np.linalg.norm(train_vecs[:, None] - eval_vecs[None], axis=-1)
        assert distance.min() > 1e-6, "no evaluation configuration may equal a training one"
        assert len(np.unique(train_vecs, axis=0)) == 60 and len(np.unique(eval_vecs, axis=0)) == 60
        assert make_configurations(task, "eval", 60, seed=1)[0].rand_vec != evals[0].rand_vec
    # a configuration does not depend on how many were drawn before it
    assert make_configuration("pick-place-v3", "eval", 7).rand_vec == evals_for_pick_place_index_7()


def evals_for_pick_place_index_7():
    return make_configurations("pick-place-v3", "eval", 8)[7].rand_vec


def test_env_reset_draws_the_same_configuration_as_make_configuration(reach_env):
    _, info = reach_env.reset(options={"split": "eval", "index": 3})
    assert tuple(info["configuration"]["rand_vec"]) == make_configuration("reach-v3", "eval", 3).rand_vec
    obs_a, _ = reach_env.reset(options={"configuration": make_configuration("reach-v3", "eval", 3)})
    obs_b, _ = reach_env.reset(options={"split": "eval", "index": 3})
    np.testing.assert_array_equal(obs_a["state"], obs_b["state"])
    np.testing.assert_array_equal(obs_a["image"], obs_b["image"])
    # a configuration as info and results files record it (a dict) replays the same scene
    obs_c, _ = reach_env.reset(options={"configuration": info["configuration"]})
    np.testing.assert_array_equal(obs_c["state"], obs_b["state"])
    for bad in ({**info["configuration"], "rand_vec": [0.0, 0.0]}, {**info["configuration"], "rand_vec": [9.0] * 6}):
        with pytest.raises(ValueError, match="is not a reach-v3 configuration"):
            reach_env.reset(options={"configuration": bad})
    with pytest.raises(ValueError, match=r"config_seed must be in \[0, 2\*\*32\)"):
        make_configuration("reach-v3", "eval", 3, seed=-1)
    with pytest.raises(UnknownTaskError, match="names no task"):
        SUITE.resolve_tasks(" , ")


# -- pools ---------------------------------------------------------------------------------------------
POOL_TASKS = ["reach-v3", "push-v3", "window-close-v3"]


def _slots(config, chunk_len=2, short_steps=3):
    """The pool slots of these tests: the last one has a step limit of ``short_steps``."""
    import dataclasses

    slots = [SlotSpec(SUITE, t, config, chunk_len) for t in POOL_TASKS]
    slots[-1] = SlotSpec(SUITE, POOL_TASKS[-1], dataclasses.replace(config, max_episode_steps=short_steps), chunk_len)
    return slots


def _drive(pool):
    """The same calls on any pool: a reset, a step of one slot, two steps in flight at once (answered out of
    order), and an episode that ends at its step limit and is reset in the same call."""
    reset = pool.reset({i: {"split": "eval", "index": 2} for i in range(3)})
    stepped = pool.wait(pool.submit({1: np.full((2, 4), 0.5)}))
    first = pool.submit({0: np.full((2, 4), 0.3), 2: np.full((2, 4), -0.2)})
    second = pool.submit({0: np.full((2, 4), 0.1), 1: np.full((2, 4), -0.4)})  # slot 0 again, in the same worker
    later, earlier = pool.wait(second), pool.wait(first)
    ended = pool.wait(pool.submit({0: np.zeros((2, 4)), 2: np.zeros((2, 4))},
                                  reset_options={0: {"split": "eval", "index": 5}, 2: {"split": "eval", "index": 5}}))
    return reset, stepped, earlier, later, ended


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def test_pool_matches_single_env_and_reports_worker_errors():
    config = EnvConfig(image_size=32)
    with make_pool(_slots(config), num_workers=2, timeout_s=30) as pool:  # "local" with workers: subprocesses
        assert isinstance(pool, SubprocessPool) and isinstance(pool, EnvPool) and len(pool) == 3
        reset = pool.reset({i: {"split": "eval", "index": 2} for i in range(3)})
        stepped = pool.wait(pool.submit({1: np.full((2, 4), 0.5)}))
        assert list(stepped) == [1] and isinstance(stepped[1], StepResult)
        assert stepped[1].reset_observation is None
        with pytest.raises(WorkerError, match="action chunk must have shape"):
            pool.wait(pool.submit({0: np.zeros((2, 7))}))
        with pytest.raises(WorkerError, match="action chunk must have shape"):  # one worker fails, the other answers
            pool.wait(pool.submit({0: np.zeros((2, 7)), 1: np.zeros((2, 4))}))
        pool.wait(pool.submit({1: np.zeros((1, 4))}))
        assert not pool._arrived, "the answer of the worker that did not fail was collected, not left behind"
        with pytest.raises(WorkerError, match="non-finite values"):
            pool.wait(pool.submit({0: np.array([[0.0, 0.0, 0.0, 0.0], [np.nan, 0.0, 0.0, 0.0]])}))
        # the worker that reported the error goes on answering (at once, not after a timeout)
        after = pool.wait(pool.submit({0: np.zeros((2, 4))}))
        assert after[0].info["steps"] == 2 and pool.lost_episodes == 0
        # a request that cannot be sent is forgotten: the next one gets its own answer, and no worker is replaced
        with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
            pool.submit({0: np.zeros((2, 4))}, reset_options={0: {"split": "eval", "index": lambda: 2}})
        after = pool.wait(pool.submit({0: np.zeros((1, 4))}))
        assert after[0].info["steps"] == 1 and after[0].info["episode_steps"] == 3 and pool.lost_episodes == 0
        with pytest.raises(IndexError, match="no env slots"):
            pool.submit({3: np.zeros((2, 4))})
    single = MetaWorldVLAEnv("push-v3", config, 2)
    obs, _ = single.reset(options={"split": "eval", "index": 2})
    np.testing.assert_array_equal(obs["image"], reset[1][0]["image"])
    obs, *_ = single.step(np.full((2, 4), 0.5))
    np.testing.assert_array_equal(obs["image"], stepped[1].observation["image"])
    single.close()


def test_inprocess_and_subprocess_pools_give_the_same_results():
    config = EnvConfig(image_size=32)
    with make_pool(_slots(config), num_workers=0) as local:
        assert isinstance(local, InProcessPool) and isinstance(local, EnvPool)
        in_process = _drive(local)
        with pytest.raises(ValueError, match="action chunk must have shape"):
            local.wait(local.submit({0: np.zeros((2, 7))}))
        with pytest.raises(IndexError, match="no env slots"):
            local.reset({3: {}})
    with make_pool(_slots(config), num_workers=2, backend="subprocess") as pool:
        in_workers = _drive(pool)
    _assert_same(in_process, in_workers)
    reset, stepped, earlier, later, ended = in_process
    assert list(earlier) == [0, 2] and list(later) == [0, 1]
    assert later[0].info["episode_steps"] == 4, "slot 0's two steps ran in the order they were submitted"
    # slot 2 (step limit 3) ran 2 + 1 steps: truncated mid-chunk, then reset to the configuration asked for
    assert [earlier[2].info["steps"], ended[2].info["steps"]] == [2, 1]
    assert ended[2].truncated and not ended[2].terminated and ended[2].info["episode_steps"] == 3
    assert ended[0].reset_observation is None and not ended[0].truncated, "slot 0's episode goes on: no reset"
    fresh = MetaWorldVLAEnv("window-close-v3", config, 2)
    obs, _ = fresh.reset(options={"split": "eval", "index": 5})
    fresh.close()
    np.testing.assert_array_equal(ended[2].reset_observation["image"], obs["image"])
    np.testing.assert_array_equal(ended[2].reset_observation["proprio"], obs["proprio"])
    assert not np.array_equal(ended[2].reset_observation["image"], ended[2].observation["image"])


def test_pool_groups_spread_over_workers():
    slots = [SlotSpec(SUITE, "reach-v3", EnvConfig(render=False)) for _ in range(5)]
    with make_pool(slots, num_workers=2, backend="subprocess") as pool:
        # slot i lives in worker i % 2; each group takes slots from both workers
        assert pool.groups(2) == [[0, 1, 4], [2, 3]]
        assert pool.groups(1) == [[0, 1, 2, 3, 4]]
        assert pool.groups(9) == [[0, 1], [2, 3], [4]], "empty groups are dropped"
    with make_pool(slots, num_workers=0) as pool:
        assert pool.groups(2) == [[0, 2, 4], [1, 3]]
        with pytest.raises(ValueError, match="count"):
            pool.groups(0)


def test_make_pool_rejects_bad_arguments(monkeypatch):
    import sys

    slot = SlotSpec(SUITE, "reach-v3", EnvConfig(render=False))
    with pytest.raises(ValueError, match="valid backends: local, subprocess, inprocess, ray"):
        make_pool([slot], backend="threads")
    with pytest.raises(ValueError, match="at least one slot"):
        make_pool([], num_workers=0)
    with pytest.raises(ValueError, match="num_workers"):
        make_pool([slot], num_workers=-1)
    with pytest.raises(ValueError, match="num_workers >= 1"):
        make_pool([slot], num_workers=0, backend="subprocess")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the optional extra were not installed
    monkeypatch.delitem(sys.modules, "vlapt.envs.pools.ray", raising=False)
    with pytest.raises(ValueError, match=r"backend 'ray' cannot be imported.*pip install 'vlapt\[ray\]'"):
        make_pool([slot], num_workers=1, backend="ray")  # an optional backend that is not installed says so
    with pytest.raises(ValueError, match="ray is not installed"):
        check_backend("ray")  # what configs validate with: refused before a run writes anything
    with make_pool([slot], num_workers=0, backend="vlapt.envs.pools.inprocess:InProcessPool") as pool:
        assert isinstance(pool, InProcessPool)  # a backend of one's own, by module:Class


def test_a_backend_declared_by_an_installed_package_is_named_like_a_built_in_one(monkeypatch):
    import importlib.metadata as metadata

    from vlapt.envs.pools import backend_names

    points = [metadata.EntryPoint("in-place", "vlapt.envs.pools.inprocess:InProcessPool", "vlapt.env_pools"),
              metadata.EntryPoint("gone", "no_such_module_xyz:Pool", "vlapt.env_pools"),
              metadata.EntryPoint("not-a-pool", "json:dumps", "vlapt.env_pools"),
              metadata.EntryPoint("subprocess", "json:dumps", "vlapt.env_pools")]  # shadows a built-in name
    monkeypatch.setattr(metadata, "entry_points", lambda group=None, name=None: metadata.EntryPoints(
        p for p in points if p.group == group and name in (None, p.name)))  # as if a package declared these
    slot = SlotSpec(SUITE, "reach-v3", EnvConfig(render=False))
    assert backend_names() == ["local", "subprocess", "inprocess", "ray", "gone", "in-place", "not-a-pool"]
    with make_pool([slot], num_workers=0, backend="in-place") as pool:
        assert isinstance(pool, InProcessPool)
    with make_pool([slot], num_workers=1, backend="subprocess") as pool:  # the built-in wins over the declaration
        assert isinstance(pool, SubprocessPool)
    with pytest.raises(ValueError, match="'gone' is declared by an installed package's vlapt.env_pools entry point"):
        check_backend("gone")
    with pytest.raises(ValueError, match="'not-a-pool' gives <function dumps.*>, not an EnvPool class"):
        check_backend("not-a-pool")
    with pytest.raises(ValueError, match="valid backends: local, subprocess, inprocess, ray, gone, in-place, not-a-pool"):
        check_backend("threads")


class PoolWithoutWith:  # EnvPool's methods, but no context manager's: every caller says `with make_pool(...)`
    def __init__(self, slots, num_workers=0): self.slots = slots
    def __len__(self): return len(self.slots)
    def reset(self, requests): return {}
    def submit(self, actions, reset_options=None): return 0
    def wait(self, ticket): return {}
    def groups(self, count): return [list(range(len(self.slots)))]
    def close(self): pass


class Outer:
    Pool = InProcessPool


def test_a_module_class_backend_is_checked_when_a_config_is():
    # refused up front, before a run writes anything, with the reason: a missing module, a missing class, or
    # something that is not an EnvPool class
    for name, reason in (("no_such_module_xyz:Pool", "No module named 'no_such_module_xyz'"),
                         ("vlapt.envs.pools.inprocess:NoSuchPool", "has no attribute 'NoSuchPool'"),
                         (":Pool", "Empty module name"),
                         (".relative:Pool", "cannot be imported"),
                         ("vlapt.envs.pools:spread_groups", "not an EnvPool class"),
                         ("test_envs:PoolWithoutWith", "not an EnvPool class.*__enter__")):
        with pytest.raises(ValueError, match=f"env pool backend {re.escape(repr(name))}.*{reason}"):
            check_backend(name)
    assert check_backend("test_envs:Outer.Pool") == "test_envs:Outer.Pool"  # a nested class, as entry points allow
    with make_pool([SlotSpec(SUITE, "reach-v3", EnvConfig(render=False))], num_workers=0,
                   backend="test_envs:Outer.Pool") as pool:
        assert isinstance(pool, InProcessPool)


def test_a_worker_that_dies_or_hangs_is_replaced_and_its_episode_reported_lost():
    slot = SlotSpec(SUITE, "reach-v3", EnvConfig(render=False, privileged_state=True), 2)
    with make_pool([slot], num_workers=1, backend="subprocess", max_restarts=2) as pool:
        first, _ = pool.reset({0: {"split": "eval", "index": 1}})[0]
        pool.wait(pool.submit({0: np.zeros((2, 4))}))
        pool.timeout_s = 3  # only now: a slow start on a loaded machine is no hang
        for stop in (signal.SIGKILL, signal.SIGSTOP):  # dead, then hung
            os.kill(pool.worker_pid(0), stop)
            lost = pool.wait(pool.submit({0: np.zeros((2, 4))}, reset_options={0: {"split": "eval", "index": 1}}))[0]
            assert lost.truncated and not lost.terminated and lost.reward == 0.0
            assert lost.info["lost"] and lost.info["steps"] == 0
            # the new worker's env starts the next episode: the one the reset options asked for
            np.testing.assert_array_equal(lost.reset_observation["state"], first["state"])
        assert pool.lost_episodes == 2 and pool.restarts_left == 0
        going_on = pool.wait(pool.submit({0: np.zeros((2, 4))}))[0]
        assert going_on.info["steps"] == 2 and going_on.info["episode_steps"] == 2 and "lost" not in going_on.info
        os.kill(pool.worker_pid(0), signal.SIGKILL)
        with pytest.raises(WorkerError, match="reach-v3.*no restarts left"):
            pool.wait(pool.submit({0: np.zeros((2, 4))}))
        with pytest.raises(WorkerError, match="no restarts left.*can run no more episodes"):  # and says so ever after
            pool.submit({0: np.zeros((2, 4))})


def test_an_interrupt_while_a_worker_is_replaced_leaves_its_requests_answered_later():
    spec = SlotSpec(SUITE, "reach-v3", EnvConfig(render=False, privileged_state=True), 2)
    with make_pool([spec], num_workers=1, backend="subprocess", max_restarts=1) as pool:
        pool.reset({0: {"split": "eval", "index": 1}})
        os.kill(pool.worker_pid(0), signal.SIGKILL)
        ticket = pool.submit({0: np.zeros((2, 4))}, reset_options={0: {"split": "eval", "index": 1}})

        def interrupted(w):  # Ctrl-C while the replacement starts
            del pool._await_ready
            raise KeyboardInterrupt

        pool._await_ready = interrupted
        with pytest.raises(KeyboardInterrupt):
            pool.wait(ticket)
        lost = pool.wait(ticket)[0]  # going on: the request is answered (lost), not forgotten
        assert lost.info["lost"] and pool.restarts_left == 0, "one death, one restart: the interrupt is not charged"
        going_on = pool.wait(pool.submit({0: np.zeros((2, 4))}))[0]
        assert going_on.info["steps"] == 2 and "lost" not in going_on.info


def test_a_replaced_workers_idle_slots_answer_lost_until_they_are_reset():
    spec = SlotSpec(SUITE, "reach-v3", EnvConfig(render=False, privileged_state=True), 2)
    reset = {"split": "eval", "index": 1}
    with make_pool([spec, spec], num_workers=1, backend="subprocess") as pool:
        pool.reset({0: reset, 1: reset})
        os.kill(pool.worker_pid(0), signal.SIGKILL)
        in_flight = pool.wait(pool.submit({0: np.zeros((2, 4))}, reset_options={0: reset}))[0]
        assert in_flight.info["lost"] and in_flight.reset_observation is not None
        # slot 1 had no step in flight, but its episode died with the worker too
        idle = pool.wait(pool.submit({1: np.zeros((2, 4))}))[1]
        assert idle.info["lost"] and idle.truncated and idle.reset_observation is None
        assert pool.wait(pool.submit({1: np.zeros((2, 4))}))[1].info["lost"]  # until it is reset
        pool.reset({1: reset})
        assert pool.wait(pool.submit({1: np.zeros((2, 4))}))[1].info["steps"] == 2
        assert pool.wait(pool.submit({0: np.zeros((2, 4))}))[0].info["steps"] == 2  # reset by its own options
        assert pool.lost_episodes == 3


class _InterruptedMidMessage:
    """A pipe end whose next receive reads a few bytes of the message and is then interrupted, as Ctrl-C can."""

    def __init__(self, conn):
        self.conn, self.interrupted, self.read_on = conn, False, 0

    def recv(self):
        if self.interrupted:  # what follows is the torn message's rest, taken for a message of its own
            self.read_on += 1
            return self.conn.recv()
        self.interrupted = True
        os.read(self.conn.fileno(), 6)
        raise KeyboardInterrupt

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_an_answer_interrupted_mid_message_is_not_read_on_and_close_ends():
    spec = SlotSpec(SUITE, "reach-v3", EnvConfig(render=False, privileged_state=True), 2)
    reset = {"split": "eval", "index": 1}
    pool = make_pool([spec], num_workers=1, backend="subprocess", max_restarts=0)  # an interrupt is not a failure
    try:
        pool.reset({0: reset})
        torn = pool._conns[0] = _InterruptedMidMessage(pool._conns[0])
        with pytest.raises(KeyboardInterrupt):
            pool.wait(pool.submit({0: np.zeros((2, 4))}))
        # going on: the worker whose answer was torn is replaced, its episode reported lost
        assert pool.wait(pool.submit({0: np.zeros((2, 4))}, reset_options={0: reset}))[0].info["lost"]
        assert pool.wait(pool.submit({0: np.zeros((2, 4))}))[0].info["steps"] == 2
        assert torn.read_on == 0 and pool.restarts_left == 0
        torn = pool._conns[0] = _InterruptedMidMessage(pool._conns[0])
        with pytest.raises(KeyboardInterrupt):
            pool.wait(pool.submit({0: np.zeros((2, 4))}))
        pool.submit({0: np.zeros((2, 4))})  # left unanswered: close would read its answer after the torn one
        worker = pool._procs[0]
    finally:
        closing = threading.Thread(target=pool.close, daemon=True)
        closing.start()
        closing.join(timeout=60)
    assert not closing.is_alive() and torn.read_on == 0, "close read on from the middle of a message"
    assert not worker.is_alive()


def test_a_close_interrupted_mid_message_can_be_called_again():
    spec = SlotSpec(SUITE, "reach-v3", EnvConfig(render=False, privileged_state=True), 2)
    pool = make_pool([spec], num_workers=1, backend="subprocess")
    pool.reset({0: {"split": "eval", "index": 1}})
    pool.submit({0: np.zeros((2, 4))})  # unanswered: close drains it, and is interrupted doing so
    torn = pool._conns[0] = _InterruptedMidMessage(pool._conns[0])
    worker = pool._procs[0]
    with pytest.raises(KeyboardInterrupt):
        pool.close()
    pool.close()
    assert torn.read_on == 0 and not worker.is_alive()


def test_narrower_field_of_view_makes_objects_larger():
    pixels = {}
    for fovy in (0.0, 30.0):
        env = MetaWorldVLAEnv("reach-v3", EnvConfig(image_size=64, camera_fovy=fovy))
        env.reset(options={"split": "eval", "index": 0})
        pixels[fovy] = np.isin(env.render_segmentation(), _hand_geoms(env)).sum()
        env.close()
    assert pixels[30.0] > 1.5 * pixels[0.0]
    with pytest.raises(ValueError, match="camera_fovy"):
        check_env_config(EnvConfig(camera_fovy=200))


def test_steps_floor_counts_travel_to_the_touch_and_the_carry(load_script):
    floor = load_script("steps_floor")
    states = np.zeros((12, 39), np.float32)
    states[:, 4:7] = [0.30, 0.0, 0.0]
    states[2:, 4] = 0.304  # the object settles 4 mm in its first steps: not a touch
    for t in range(1, 12):  # the hand heads along x; it reaches the object at step 6, then pushes it 3 cm
        states[t, 0] = min(0.05 * t, 0.30) if t <= 6 else 0.30 + 0.01 * (t - 6)
    states[7:, 4] = 0.304 + 0.01 * np.arange(1, 6)
    states[:, 1] = np.linspace(0, 0.02, 12)  # a smaller move on y never decides the distance
    row = floor.floor_of_episode("push-v3", list(states))
    assert row["touch_step"] == 6  # the hand's last step before the object moves
    assert row["approach"] == 30  # 30 cm along x at 1 cm per step, however fast the states say it went
    assert row["carry"] == 1 + 4  # displacement up to the step before success, then that step
    reach = np.zeros((3, 39), np.float32)
    reach[0, 36:39] = [0.0, 0.12, -0.2]
    assert floor.floor_of_episode("reach-v3", list(reach))["floor"] == 15  # 20 cm less the 5 cm success radius


def test_steps_floor_compares_against_the_start_on_configurations_all_three_solved(load_script):
    floor = load_script("steps_floor")
    floors = {"config_seed": 0, "per_task": {"push-v3": {"per_episode": [
        {"index": 0, "expert_steps": 60, "floor": 30}, {"index": 1, "expert_steps": 70, "floor": 40},
        {"index": 2, "expert_steps": 80, "floor": 50}]}}}

    def result(steps, split="eval"):
        return {"protocol": {"split": split, "config_seed": 0},
                "episodes": [{"task": "push-v3", "config_index": i, "success": s is not None, "steps": s or 500}
                             for i, s in enumerate(steps)]}

    sft, post = result([60, None, 90]), result([45, 50, 70])
    row = floor.compare(floors, post, start=sft)["push-v3"]
    # configuration 1 is left out: the start failed it, so its 50 steps have no start to compare with
    assert row["configurations"] == 2 and row["steps"] == 57.5 and row["start_steps"] == 75 and row["floor"] == 40
    assert row["closed"] == pytest.approx((75 - 57.5) / (75 - 40))
    assert floor.compare(floors, post)["push-v3"]["configurations"] == 3  # without a start, every success counts
    assert np.isnan(floor.headroom_closed(40, 40, 40))  # no headroom: NaN, not 0
    with pytest.raises(ValueError, match="split"):
        floor.compare(floors, post, start=result([60, 60, 60], split="train"))
