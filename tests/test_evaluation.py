"""Evaluation: metrics, the protocol's results, determinism, and the held-out split."""

import json
import math

import numpy as np
import pytest

import vlapt  # noqa: F401  (sets the headless GL backend before mujoco is imported)
from vlapt.envs.metaworld.env import MetaWorldVLAEnv
from vlapt.envs.metaworld.experts import FastScriptedExpert, ScriptedExpert
from vlapt.envs.pools.inprocess import InProcessPool
from vlapt.evaluation import EvalConfig, evaluate, format_table, summarize, task_metrics
from vlapt.interfaces import EnvConfig, Episode

TASKS = ["reach-v3", "drawer-close-v3"]
EPISODES = 3


# -- metrics ------------------------------------------------------------------------------------------
def _episode(task, index, success, steps):
    return Episode(task=task, instruction=f"do {task}", success=success, steps=steps, split="eval", config_index=index)


def _records():
    return [
        _episode("a", 0, True, 10),
        _episode("a", 1, True, 30),
        _episode("a", 2, False, 100),  # failures end at the limit anyway
        _episode("a", 3, False, 100),
        _episode("b", 0, False, 100),
        _episode("b", 1, False, 100),
    ]


def test_task_metrics():
    m = task_metrics([r for r in _records() if r.task == "a"], max_episode_steps=100)
    assert m.episodes == 4
    assert m.success_rate == pytest.approx(0.5)
    assert m.steps_to_success == pytest.approx(20.0)  # over successes only
    assert m.steps_failures_as_limit == pytest.approx((10 + 30 + 100 + 100) / 4)
    none = task_metrics([r for r in _records() if r.task == "b"], max_episode_steps=100)
    assert none.success_rate == 0.0 and none.steps_to_success is None
    assert none.steps_failures_as_limit == pytest.approx(100.0)
    with pytest.raises(ValueError):
        task_metrics([], 100)


def test_failures_count_as_the_limit_not_their_own_steps():
    # a failure recorded with fewer steps than the limit still counts as the limit
    m = task_metrics([_episode("a", 0, True, 20), _episode("a", 1, False, 7)], max_episode_steps=50)
    assert m.steps_failures_as_limit == pytest.approx((20 + 50) / 2)
    assert m.steps_to_success == pytest.approx(20.0)


def test_summarize_averages_over_tasks():
    records = _records() + [_episode("c", 0, True, 40)]
    summary = summarize(records, ["a", "b", "c"], max_episode_steps=100)
    assert list(summary["per_task"]) == ["a", "b", "c"]
    assert summary["per_task"]["c"]["success_rate"] == 1.0
    avg = summary["average"]
    assert avg["episodes"] == 7
    # task-averaged (each task weighs the same), not episode-averaged (3/7)
    assert avg["success_rate"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    # only tasks with a success enter the steps-to-success average
    assert avg["steps_to_success"] == pytest.approx((20.0 + 40.0) / 2)
    assert avg["steps_failures_as_limit"] == pytest.approx((60.0 + 100.0 + 40.0) / 3)


def test_summarize_without_any_success():
    summary = summarize([_episode("b", 0, False, 100)], ["b"], max_episode_steps=100)
    assert summary["average"]["steps_to_success"] is None
    assert summary["average"]["success_rate"] == 0.0
    assert not math.isnan(summary["average"]["steps_failures_as_limit"])
    assert summary["average"]["success_within"] == {"100": 0.0}, "an episode cut at 100 steps says nothing of 400"


def test_success_within_counts_successes_up_to_each_step_limit():
    episodes = [_episode("a", 0, True, 60), _episode("a", 1, True, 100),  # within 100: the limit itself counts
                _episode("a", 2, True, 101), _episode("a", 3, True, 400), _episode("a", 4, True, 450),
                _episode("a", 5, False, 90), _episode("a", 6, False, 500),  # failures never count, however short
                _episode("a", 7, False, 500)]
    m = task_metrics(episodes, max_episode_steps=500)
    assert m.success_within == {"100": 2 / 8, "400": 4 / 8}
    assert m.success_rate == 5 / 8, "the rate within the whole limit is the success rate"
    assert task_metrics(episodes, 500, success_within=(50, 450)).success_within == {"50": 0.0, "450": 5 / 8}
    summary = summarize(episodes + [_episode("b", 0, True, 80), _episode("b", 1, True, 300)], ["a", "b"], 500)
    assert summary["per_task"]["a"]["success_within"] == {"100": 0.25, "400": 0.5}
    assert summary["per_task"]["b"]["success_within"] == {"100": 0.5, "400": 1.0}
    # averaged over tasks, like the success rate
    assert summary["average"]["success_within"] == {"100": pytest.approx((0.25 + 0.5) / 2), "400": pytest.approx(0.75)}


def test_episode_summary_is_what_a_result_keeps_per_episode():
    episode = Episode(task="a", instruction="do a", success=np.bool_(True), steps=np.int64(42), split="eval",
                      config_index=7, images=np.zeros((3, 8, 8, 3), np.uint8), actions=np.zeros((42, 4), np.float32))
    summary = episode.summary()
    assert summary == {"task": "a", "config_index": 7, "success": True, "steps": 42}
    assert type(summary["success"]) is bool and type(summary["steps"]) is int, "JSON-ready, not numpy scalars"
    assert len(episode) == 42
    np.testing.assert_array_equal(episode.decisions, np.arange(42))  # per step unless decision_steps says otherwise
    episode.decision_steps = np.array([0, 10, 20])
    np.testing.assert_array_equal(episode.decisions, [0, 10, 20])


def test_format_table():
    summary = summarize(_records(), ["a", "b"], max_episode_steps=100)
    table = format_table(summary, title="my title")
    lines = table.splitlines()
    assert lines[0] == "**my title**"
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| task")]
    assert [r.split("|")[1].strip() for r in rows] == ["a", "b", "**average**"]
    assert lines[2] == ("| task | episodes | success | steps to success | steps (failures = limit) |"
                        " success within 100 |")  # within 400: beyond these 100-step episodes
    assert "| a | 4 | 0.500 | 20.0 | 60.0 | 0.500 |" in lines
    assert "| b | 2 | 0.000 | - | 100.0 | 0.000 |" in lines
    assert "| **average** | 6 | 0.250 | 20.0 | 80.0 | 0.250 |" in lines
    assert "my title" not in format_table(summary)


# -- the protocol with the scripted expert ---------------------------------------------------------------
@pytest.fixture(scope="module")
def serial_result():
    return evaluate(ScriptedExpert(), EvalConfig(tasks=TASKS, episodes_per_task=EPISODES, num_workers=0), progress=False)


def test_fast_expert_cuts_the_experts_steps_and_leaves_other_tasks_to_them(serial_result):
    fast = evaluate(FastScriptedExpert(), EvalConfig(tasks=TASKS + ["door-open-v3"], episodes_per_task=EPISODES,
                                                     num_workers=0), progress=False)
    assert fast["agent"] == "scripted-fast"
    expert_steps = {(e["task"], e["config_index"]): e["steps"] for e in serial_result["episodes"]}
    for e in fast["episodes"]:
        if e["task"] in TASKS:  # the same configurations, solved, and at least 20% sooner on every one
            assert e["success"] and e["steps"] <= 0.8 * expert_steps[e["task"], e["config_index"]], e
    state = np.linspace(-0.3, 0.3, 39)  # copies: MetaWorld's door-open expert edits the state it reads
    np.testing.assert_array_equal(FastScriptedExpert().act_one(state.copy(), "door-open-v3"),
                                  ScriptedExpert().act_one(state.copy(), "door-open-v3"))


def test_scripted_expert_solves_easy_tasks(serial_result):
    r = serial_result
    assert r["agent"] == "scripted"
    assert r["protocol"]["split"] == "eval" and r["protocol"]["tasks"] == TASKS
    assert r["protocol"]["suite"] == "mt10" and r["protocol"]["max_episode_steps"] == 500
    assert r["protocol"]["camera"] is None, "the scripted expert renders nothing"
    assert r["protocol"]["episodes_per_task"] == EPISODES
    assert list(r["per_task"]) == TASKS
    for task in TASKS:
        assert r["per_task"][task]["episodes"] == EPISODES
        assert r["per_task"][task]["success_rate"] == 1.0
    assert r["average"]["success_rate"] == 1.0
    episodes = r["episodes"]
    assert [(e["task"], e["config_index"]) for e in episodes] == [(t, i) for t in TASKS for i in range(EPISODES)]
    assert all(e["success"] and 0 < e["steps"] < 500 for e in episodes)
    for task in TASKS:  # success within N steps, from the same episodes
        steps = [e["steps"] for e in episodes if e["task"] == task]
        assert r["per_task"][task]["success_within"] == {n: sum(s <= int(n) for s in steps) / EPISODES
                                                          for n in ("100", "400")}
    assert r["env_steps"] == sum(e["steps"] for e in episodes)
    # configurations differ, so episode lengths are not all the same
    assert len({e["steps"] for e in episodes if e["task"] == "reach-v3"}) > 1


def test_on_episode_callback_sees_every_episode():
    seen = []
    result = evaluate(ScriptedExpert(), EvalConfig(tasks=["reach-v3"], episodes_per_task=2, num_workers=0),
                      progress=False, on_episode=seen.append)
    assert all(isinstance(r, Episode) for r in seen)
    assert sorted((r.task, r.config_index) for r in seen) == [("reach-v3", 0), ("reach-v3", 1)]
    assert [r.steps for r in sorted(seen, key=lambda r: r.config_index)] == [e["steps"] for e in result["episodes"]]
    ordered = sorted(seen, key=lambda r: r.config_index)
    assert [r.summary() for r in ordered] == result["episodes"]
    assert all(r.split == "eval" and r.instruction == "reach the goal position with the gripper" for r in seen)
    assert all(r.images is None and r.actions is None for r in seen), "evaluation records outcomes, not trajectories"


@pytest.mark.parametrize("workers,envs_per_task,backend", [(0, 1, "local"), (2, 2, "local"), (1, 2, "subprocess"),
                                                            (2, 1, "inprocess")])
def test_evaluation_is_deterministic_and_independent_of_parallelism(serial_result, workers, envs_per_task, backend):
    config = EvalConfig(tasks=TASKS, episodes_per_task=EPISODES, num_workers=workers, envs_per_task=envs_per_task,
                        env_backend=backend)
    again = evaluate(ScriptedExpert(), config, progress=False)
    assert again["episodes"] == serial_result["episodes"]
    assert again["per_task"] == serial_result["per_task"]
    assert again["env_steps"] == serial_result["env_steps"]
    assert again["protocol"]["envs_per_task"] == min(envs_per_task, EPISODES)


class LosingPool(InProcessPool):
    """An in-process pool whose slot 0 loses its episode once, at its third step, as if its env worker had died."""

    def __init__(self, slots, num_workers=0):
        super().__init__(slots, num_workers)
        self.steps_of_slot_0, self.lost = 0, 0

    def submit(self, actions, reset_options=None):
        ticket = super().submit(actions, reset_options)
        if 0 in actions:
            self.steps_of_slot_0 += 1
            if self.steps_of_slot_0 == 3:
                info = {"rewards": np.zeros(0, np.float32), "steps": 0, "success": False, "episode_steps": 0, "lost": True}
                self._answers[ticket][0] = self._answers[ticket][0]._replace(truncated=True, info=info)
                self.lost += 1
        return ticket


def test_an_episode_lost_with_its_worker_is_run_again_from_its_start(serial_result):
    seen = []
    result = evaluate(ScriptedExpert(), EvalConfig(tasks=TASKS, episodes_per_task=EPISODES, num_workers=0,
                                                   env_backend="test_evaluation:LosingPool"),
                      progress=False, on_episode=seen.append)
    assert result["episodes"] == serial_result["episodes"], "the lost configuration ran again, in full"
    # the env steps executed: the lost attempt's first two steps were run, its lost step reports none
    assert result["env_steps"] == serial_result["env_steps"] + 2
    assert len(seen) == len(TASKS) * EPISODES, "no episode reported for the lost attempt"


class HoldingExpert(ScriptedExpert):
    """The scripted expert's action held for a chunk of 4 steps: open-loop, it slows the expert down."""

    chunk_len = 4

    def __init__(self):
        super().__init__()
        self.decisions = 0

    def act(self, observations, tasks):
        self.decisions += len(observations)
        return [np.repeat(chunk, self.chunk_len, axis=0) for chunk in super().act(observations, tasks)]


def test_receding_horizon_executes_the_first_steps_of_each_chunk_then_decides_again(serial_result):
    config = EvalConfig(tasks=TASKS, episodes_per_task=EPISODES, num_workers=0)
    open_loop = HoldingExpert()
    held = evaluate(open_loop, config, progress=False)
    assert held["protocol"]["chunk_len"] == 4 and held["protocol"]["execute_steps"] == 4
    closed = HoldingExpert()
    replanned = evaluate(closed, EvalConfig(tasks=TASKS, episodes_per_task=EPISODES, num_workers=0, execute_steps=1),
                         progress=False)
    # executing the first action of every chunk is the scripted expert itself, step for step
    assert replanned["episodes"] == serial_result["episodes"]
    assert replanned["protocol"]["chunk_len"] == 4 and replanned["protocol"]["execute_steps"] == 1
    assert "first 1 of each 4-step chunk" in replanned["agent"]
    assert closed.decisions == replanned["env_steps"] > open_loop.decisions
    assert held["episodes"] != serial_result["episodes"]
    with pytest.raises(ValueError, match="execute_steps"):
        evaluate(HoldingExpert(), EvalConfig(tasks=TASKS, episodes_per_task=1, execute_steps=5), progress=False)
    with pytest.raises(ValueError, match="execute_steps"):
        EvalConfig(execute_steps=-1).validate()


def test_invalid_eval_config():
    with pytest.raises(ValueError, match="episodes_per_task"):
        evaluate(ScriptedExpert(), EvalConfig(tasks=["reach-v3"], episodes_per_task=0), progress=False)
    with pytest.raises(ValueError, match="split"):
        evaluate(ScriptedExpert(), EvalConfig(tasks=["reach-v3"], split="test"), progress=False)
    with pytest.raises(ValueError, match="reach-v3"):
        evaluate(ScriptedExpert(), EvalConfig(tasks=["reach-v4"]), progress=False)
    with pytest.raises(ValueError, match="valid backends"):
        evaluate(ScriptedExpert(), EvalConfig(tasks=["reach-v3"], env_backend="threads"), progress=False)
    with pytest.raises(ValueError, match="max_episode_steps"):
        EvalConfig(tasks=["reach-v3"], max_episode_steps=501).validate()
    with pytest.raises(ValueError, match="mt11"):
        EvalConfig(suite="mt11").validate()


# -- the held-out split ------------------------------------------------------------------------------------
class RecordingExpert(ScriptedExpert):
    """The scripted expert, remembering every privileged state it was shown."""

    def __init__(self):
        super().__init__()
        self.states: dict[str, list[np.ndarray]] = {}

    def act(self, observations, tasks):
        for obs, task in zip(observations, tasks):
            self.states.setdefault(task, []).append(np.array(obs["state"]))
        return super().act(observations, tasks)


def _reset_state(task, split, index):
    env = MetaWorldVLAEnv(task, EnvConfig(render=False, privileged_state=True))
    try:
        obs, info = env.reset(options={"split": split, "index": index})
        assert info["configuration"]["split"] == split
        return obs["state"]
    finally:
        env.close()


def _seen(states, target):
    return any(np.array_equal(s, target) for s in states)


@pytest.mark.parametrize("split", ["eval", "train"])
def test_evaluation_runs_the_configured_split(split):
    task, n = "reach-v3", 2
    agent = RecordingExpert()
    result = evaluate(agent, EvalConfig(tasks=[task], episodes_per_task=n, num_workers=0, split=split), progress=False)
    assert result["protocol"]["split"] == split
    other = "train" if split == "eval" else "eval"
    for i in range(n):
        # the first observation of episode i is the reset state of configuration (split, i) ...
        assert _seen(agent.states[task], _reset_state(task, split, i)), f"{split} configuration {i} was not run"
        # ... and never one of the other split
        assert not _seen(agent.states[task], _reset_state(task, other, i)), f"{other} configuration {i} leaked in"


def test_default_protocol_is_held_out():
    assert EvalConfig().split == "eval"


# =========================================================================== paired pace
def _result(episodes, tasks=("reach-v3", "push-v3"), **protocol):
    base = {"tasks": list(tasks), "split": "eval", "config_seed": 0, "max_episode_steps": 500}
    base.update(protocol)
    return {"protocol": base, "episodes": [
        {"task": t, "config_index": i, "success": steps is not None, "steps": steps or 500} for t, i, steps in episodes]}


def test_paired_pace_compares_only_configurations_both_solved():
    from vlapt.evaluation.metrics import format_pace_table, paired_pace

    expert = _result([("reach-v3", 0, 40), ("reach-v3", 1, 80), ("reach-v3", 2, 60), ("push-v3", 0, 50)])
    # the policy fails the long configuration 1: its own mean (45) looks faster than the expert's (60) ...
    policy = _result([("reach-v3", 0, 44), ("reach-v3", 1, None), ("reach-v3", 2, 66), ("push-v3", 0, None)])
    pace = paired_pace(expert, policy)
    reach = pace["per_task"]["reach-v3"]
    # ... but on the configurations both solved it is 10% slower on each
    assert reach["configurations"] == 2 and reach["reference_steps"] == 50 and reach["steps"] == 55
    assert reach["median_ratio"] == pytest.approx(1.1) and reach["min_ratio"] == reach["max_ratio"] == pytest.approx(1.1)
    assert reach["correlation"] == pytest.approx(1.0)
    assert pace["per_task"]["push-v3"] == {"configurations": 0}
    assert pace["average"]["configurations"] == 2 and pace["average"]["median_ratio"] == pytest.approx(1.1)
    table = format_pace_table(pace, "scripted")
    assert "| push-v3 | 0 | - |" in table and "1.10 (1.10-1.10)" in table and "scripted steps" in table


def test_paired_pace_refuses_results_from_different_protocols():
    from vlapt.evaluation.metrics import paired_pace

    with pytest.raises(ValueError, match="config_seed"):
        paired_pace(_result([("reach-v3", 0, 40)]), _result([("reach-v3", 0, 40)], config_seed=1))
    with pytest.raises(ValueError, match="no task"):
        paired_pace(_result([], tasks=["reach-v3"]), _result([], tasks=["push-v3"]))


def test_paired_pace_script_names_a_file_that_is_not_an_eval_result(load_script, tmp_path, capsys):
    script = load_script("paired_pace")
    good, bad = tmp_path / "eval.json", tmp_path / "probe.json"
    good.write_text(json.dumps(_result([("reach-v3", 0, 40)])))
    bad.write_text(json.dumps({"policies": {}}))
    assert script.main([str(good), str(good)]) == 0
    assert script.main([str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "vlapt eval" in err


def test_failure_modes_names_the_first_stage_a_failed_episode_never_passed(load_script, tiny_policy_dir):
    from vlapt.envs.metaworld.env import MetaWorldVLAEnv
    from vlapt.policies import load_policy

    fm = load_script("failure_modes")
    far = dict(success=False, closest_hand_to_object=0.01, object_moved=0.1, object_lifted=0.1)

    def stage(task, **changes):
        return fm.failure_stage({**far, **changes}, task, reach=0.05, moved=0.02, lifted=0.02)

    assert stage("push-v3", success=True) is None
    assert stage("push-v3", closest_hand_to_object=0.2, object_moved=0.0) == "not reached"  # the first stage wins
    assert stage("push-v3", object_moved=0.01) == "not moved"
    assert stage("pick-place-v3", object_lifted=0.0) == "not lifted"
    assert stage("push-v3", object_lifted=0.0) == "missed goal"  # push's goal is on the table
    assert stage("reach-v3", closest_hand_to_object=0.2, object_moved=0.0) == "missed goal"  # nothing to carry
    # a miss that came within 6 cm and ended 30 cm away left the goal; one that ended 2 cm beyond its closest stopped
    assert fm.left_goal({"closest_object_to_goal": 0.06, "end_object_to_goal": 0.30}, margin=0.05)
    assert not fm.left_goal({"closest_object_to_goal": 0.06, "end_object_to_goal": 0.08}, margin=0.05)

    # one held-out reach episode of an untrained policy, measured from the simulator after every chunk
    policy = load_policy(tiny_policy_dir)
    env = MetaWorldVLAEnv("reach-v3", policy.observation_config(), chunk_len=policy.chunk_len)
    try:
        episode = fm.run_episode(policy, env, "reach-v3", 0)
        goal = np.array(env._env._target_pos, dtype=float)
        end = float(np.linalg.norm(np.array(env._env.tcp_center, dtype=float) - goal))  # where the episode left it
    finally:
        env.close()
    assert episode["goal"] == pytest.approx(goal.tolist()) and episode["end_object_to_goal"] == pytest.approx(end)
    assert episode["index"] == 0 and 1 <= episode["steps"] <= 500 and episode["start_to_goal"] > 0
    assert 1 <= episode["closest_step"] <= episode["steps"]
    assert episode["end_object_to_goal"] >= episode["closest_object_to_goal"]
    assert np.linalg.norm(episode["closest_offset"]) == pytest.approx(episode["closest_object_to_goal"])
    if not episode["success"]:  # success is judged at every step: a failure never came within 5 cm
        assert episode["steps"] == 500 and episode["closest_object_to_goal"] > 0.05


def test_goal_probe_reads_the_goal_off_held_out_first_frames(load_script, tiny_policy_dir, tmp_path):
    from vlapt.envs import get_suite
    from vlapt.envs.metaworld.configurations import make_configuration
    from vlapt.policies import load_policy

    gp = load_script("goal_probe")
    # the probe is ridge regression: a linear map of the features comes back, up to the ridge's shrinkage
    rng = np.random.default_rng(0)
    features, weights = rng.normal(size=(200, 6)), rng.normal(size=(6, 3))
    predict = gp.fit_probe(features, features @ weights + 0.5, ridge=1e-6)
    np.testing.assert_allclose(predict(features[:5]), features[:5] @ weights + 0.5, atol=1e-6)
    # how far a line of sight runs through the box: a unit cube seen from above, from the side, along a diagonal
    low, high, centre = np.zeros(3), np.ones(3), np.full((1, 3), 0.5)
    for camera, length in [((0.5, 0.5, 10.0), 1.0), ((-10.0, 0.5, 0.5), 1.0), ((10.5, 10.5, 0.5), np.sqrt(2))]:
        np.testing.assert_allclose(gp.sight_in_box(centre, np.array(camera), low, high), [length], rtol=1e-9)
    beside = np.array([[0.5, 0.5, 2.0]])  # above the cube, on a horizontal line that never enters it
    np.testing.assert_allclose(gp.sight_in_box(beside, np.array([-10.0, 0.5, 2.0]), low, high), [0.0])
    # errors split by the episode's outcome on the same configuration
    result = {"episodes": [{"task": "reach-v3", "config_index": i, "success": i != 1} for i in range(3)]}
    split = gp.by_outcome([1.0, 7.0, 3.0], result, "reach-v3")
    assert split["failures"] == 1 and split["probe_cm_failures"] == 7.0 and split["probe_cm_successes"] == 2.0
    assert split["failure_rate_probe_over_5cm"] == 1.0 and split["failure_rate_probe_within_5cm"] == 0.0

    # end to end on a tiny policy: the held-out goals are the eval split's, the guess is the floor
    output = tmp_path / "probe.json"
    assert gp.main(["--policies", str(tiny_policy_dir), "--tasks", "reach-v3", "--train", "6", "--eval", "3",
                    "--output", str(output)]) == 0
    figures = json.loads(output.read_text())["results"][str(tiny_policy_dir)]["reach-v3"]
    assert len(figures["per_configuration_cm"]) == 3 and figures["mean_guess_cm"] > 0
    policy, suite = load_policy(tiny_policy_dir), get_suite("mt10")
    # the error's parts along and across the line of sight of the corner camera, which sits where MetaWorld puts it
    assert 0 <= figures["probe_cm_along_view"] <= figures["probe_cm_mean"] + 1e-9
    assert 0 <= figures["probe_cm_across_view"] <= figures["probe_cm_mean"] + 1e-9
    assert figures["probe_cm_along_view"] + figures["probe_cm_across_view"] >= figures["probe_cm_mean"] - 1e-9
    np.testing.assert_allclose(gp.camera_position(policy, suite, "reach-v3"), [-1.1, -0.4, 0.6], atol=1e-6)
    _, goals = gp.first_frames(policy, suite, "reach-v3", "eval", 2)
    assert goals.shape == (2, 3) and not np.allclose(goals[0], goals[1])
    assert np.allclose(goals[0], make_configuration("reach-v3", "eval", 0).rand_vec[-3:], atol=1e-6)
    # --target object: the first object's position, which push's configuration places (x, y) on the table
    _, objects = gp.first_frames(policy, suite, "push-v3", "eval", 2, target="object")
    assert objects.shape == (2, 3) and not np.allclose(objects[0], objects[1])
    assert np.allclose(objects[0, :2], make_configuration("push-v3", "eval", 0).rand_vec[:2], atol=1e-3)
    with pytest.raises(SystemExit):
        gp.main(["--policies", str(tiny_policy_dir), "--against", "a.json", "b.json"])
