import numpy as np
import pytest

import vlapt  # noqa: F401  (sets the headless GL backend before mujoco is imported)
from vlapt.envs import (
    MT10,
    MT50,
    EnvConfig,
    EnvPool,
    MetaWorldVLAEnv,
    ScriptedExpert,
    SlotSpec,
    UnknownTaskError,
    instruction_for,
    make_configuration,
    make_configurations,
    resolve_tasks,
)


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
    instructions = [instruction_for(t) for t in MT50]
    assert len(set(instructions)) == 50
    assert all(len(i.split()) >= 2 for i in instructions)


def test_unknown_names_are_rejected_with_choices():
    with pytest.raises(UnknownTaskError, match="reach-v3"):
        resolve_tasks(tasks="reach-v4")
    with pytest.raises(UnknownTaskError, match="mt10, mt50"):
        resolve_tasks(suite="mt11")
    with pytest.raises(ValueError, match="valid cameras"):
        EnvConfig(camera="ceiling").validate()
    assert resolve_tasks(tasks="push-v3, reach-v3") == ("push-v3", "reach-v3")


def test_observation_has_image_proprio_instruction(reach_env):
    obs, info = reach_env.reset(options={"split": "eval", "index": 0})
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    assert obs["proprio"].shape == (4,) and obs["proprio"].dtype == np.float32
    assert obs["state"].shape == (39,)
    np.testing.assert_allclose(obs["proprio"], obs["state"][:4])
    assert obs["instruction"] == instruction_for("reach-v3")
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


def test_dense_reward_option():
    env = MetaWorldVLAEnv("reach-v3", EnvConfig(render=False, reward="dense"), chunk_len=3)
    env.reset(options={"split": "eval", "index": 0})
    _, reward, _, _, info = env.step(np.zeros((3, 4)))
    assert info["rewards"].shape == (3,) and np.all(info["rewards"] > 0)
    assert reward == pytest.approx(float(info["rewards"].sum()), rel=1e-5)
    env.close()


def test_shaping_potentials_chain_across_chunks_and_end_at_zero_on_success():
    """phi = dense reward / 10: the end of one chunk is the start of the next; a solved task is terminal (phi = 0)."""
    dense = MetaWorldVLAEnv("reach-v3", EnvConfig(render=False, reward="dense", privileged_state=True), chunk_len=4)
    obs, reset_info = dense.reset(options={"split": "eval", "index": 0})
    assert 0.0 < reset_info["potential"] <= 1.0
    expert, previous_end, terminated = ScriptedExpert(), reset_info["potential"], False
    while not terminated:
        chunk = np.stack([expert.act_one(obs["state"], "reach-v3")] * 4)
        obs, _, terminated, truncated, info = dense.step(chunk)
        assert not truncated
        assert info["potential_start"] == previous_end
        if not terminated:
            assert info["potential_end"] == pytest.approx(float(info["rewards"][-1]) / 10.0, rel=1e-5)
            assert 0.0 <= info["potential_end"] <= 1.0
        previous_end = info["potential_end"]
    assert info["success"] and info["potential_end"] == 0.0
    assert info["potential_start"] > reset_info["potential"], "the expert's last chunk starts nearer the goal"
    dense.close()


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


def test_pool_matches_single_env_and_reports_worker_errors():
    config = EnvConfig(image_size=32)
    tasks = ["reach-v3", "push-v3", "window-close-v3"]
    with EnvPool([SlotSpec(t, config, 2) for t in tasks], num_workers=2) as pool:
        reset = pool.reset({i: {"split": "eval", "index": 2} for i in range(3)})
        stepped = pool.step({1: np.full((2, 4), 0.5)})
        assert list(stepped) == [1]
        with pytest.raises(Exception, match="action chunk must have shape"):
            pool.step({0: np.zeros((2, 7))})
    single = MetaWorldVLAEnv("push-v3", config, 2)
    obs, _ = single.reset(options={"split": "eval", "index": 2})
    np.testing.assert_array_equal(obs["image"], reset[1][0]["image"])
    obs, *_ = single.step(np.full((2, 4), 0.5))
    np.testing.assert_array_equal(obs["image"], stepped[1].observation["image"])
    single.close()


def test_narrower_field_of_view_makes_objects_larger():
    pixels = {}
    for fovy in (0.0, 30.0):
        env = MetaWorldVLAEnv("reach-v3", EnvConfig(image_size=64, camera_fovy=fovy))
        env.reset(options={"split": "eval", "index": 0})
        pixels[fovy] = np.isin(env.render_segmentation(), _hand_geoms(env)).sum()
        env.close()
    assert pixels[30.0] > 1.5 * pixels[0.0]
    with pytest.raises(ValueError, match="camera_fovy"):
        EnvConfig(camera_fovy=200).validate()


@pytest.mark.parametrize("task", ["pick-place-v3", "drawer-open-v3"])
def test_lookahead_leaves_the_episode_exactly_as_it_was(task):
    """The expert's simulated plan must not perturb the real episode: the same actions give the
    same states and images, bit for bit, with and without lookaheads in between (pick-place makes
    contacts, whose solver warmstart a sloppy restore changes; drawer-open's reward keeps state)."""
    expert = ScriptedExpert()
    config = EnvConfig(image_size=24, privileged_state=True)
    planned, plain = MetaWorldVLAEnv(task, config), MetaWorldVLAEnv(task, config)
    a, _ = planned.reset(options={"split": "eval", "index": 3})
    b, _ = plain.reset(options={"split": "eval", "index": 3})
    act = lambda state: expert.act_one(np.float32(state), task)  # noqa: E731
    plans = []
    for t in range(40):
        if t % 6 == 0:
            plans.append(planned.lookahead(act, 8))
        action = expert.act_one(a["state"], task)[None]
        a, *_, info_a = planned.step(action)
        b, *_, info_b = plain.step(action)
        np.testing.assert_array_equal(a["state"], b["state"])
        np.testing.assert_array_equal(a["image"], b["image"])
        assert (info_a["success"], info_a["episode_steps"]) == (info_b["success"], info_b["episode_steps"])
    assert planned.episode_steps == plain.episode_steps == 40
    assert all(p.shape == (8, 4) for p in plans)
    # the plan is what the expert then does: the first plan's actions are the first 8 executed
    c, _ = plain.reset(options={"split": "eval", "index": 3})
    executed = []
    for _ in range(8):
        executed.append(expert.act_one(c["state"], task))
        c, *_ = plain.step(executed[-1][None])
    np.testing.assert_allclose(plans[0], np.stack(executed), atol=1e-6)
    planned.close(), plain.close()


def test_expert_reference_reports_the_experts_own_steps_and_leaves_the_episode_as_it_was():
    """With ``expert_reference`` every step reports the steps the scripted expert needs on this
    configuration, and the episode itself is the one an env without it runs, bit for bit."""
    expert = ScriptedExpert()
    task = "drawer-close-v3"
    measured = MetaWorldVLAEnv(task, EnvConfig(image_size=24, privileged_state=True, expert_reference=True))
    plain = MetaWorldVLAEnv(task, EnvConfig(image_size=24, privileged_state=True))
    for index in (0, 1):
        a, info = measured.reset(options={"split": "train", "index": index})
        b, _ = plain.reset(options={"split": "train", "index": index})
        np.testing.assert_array_equal(a["image"], b["image"])
        steps, done = 0, False
        while not done:
            action = expert.act_one(b["state"], task)[None]
            a, _, term_a, trunc_a, info_a = measured.step(action)
            b, _, term_b, trunc_b, info_b = plain.step(action)
            np.testing.assert_array_equal(a["state"], b["state"])
            assert (term_a, trunc_a) == (term_b, trunc_b)
            assert info_a["reference_steps"] == info["reference_steps"] and "reference_steps" not in info_b
            steps, done = steps + 1, term_b or trunc_b
        assert term_b and info["reference_steps"] == steps, "the reference is the expert's episode on this configuration"
    measured.close(), plain.close()


def test_lookahead_stops_at_success_and_refuses_a_finished_episode():
    expert = ScriptedExpert()
    env = MetaWorldVLAEnv("reach-v3", EnvConfig(render=False, privileged_state=True))
    obs, _ = env.reset(options={"split": "eval", "index": 0})
    plan = env.lookahead(lambda s: expert.act_one(np.float32(s), "reach-v3"), 500)
    assert 1 <= len(plan) < 200, "the expert reaches the goal and the plan ends there"
    _, _, terminated, _, _ = env.step(plan)
    assert terminated, "executing the plan open-loop reproduces the success"
    with pytest.raises(RuntimeError, match="reset"):
        env.lookahead(lambda s: expert.act_one(np.float32(s), "reach-v3"), 5)
    env.close()


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
