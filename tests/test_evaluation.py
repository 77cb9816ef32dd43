"""Evaluation: metrics, the protocol's results, determinism, and the held-out split."""

import math

import numpy as np
import pytest

import vlapt  # noqa: F401  (sets the headless GL backend before mujoco is imported)
from vlapt.envs import EnvConfig, MetaWorldVLAEnv
from vlapt.evaluation import EpisodeRecord, EvalConfig, ScriptedExpert, evaluate, format_table, summarize, task_metrics

TASKS = ["reach-v3", "drawer-close-v3"]
EPISODES = 3


# -- metrics ------------------------------------------------------------------------------------------
def _records():
    return [
        EpisodeRecord("a", 0, True, 10),
        EpisodeRecord("a", 1, True, 30),
        EpisodeRecord("a", 2, False, 100),  # failures end at the limit anyway
        EpisodeRecord("a", 3, False, 100),
        EpisodeRecord("b", 0, False, 100),
        EpisodeRecord("b", 1, False, 100),
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
    m = task_metrics([EpisodeRecord("a", 0, True, 20), EpisodeRecord("a", 1, False, 7)], max_episode_steps=50)
    assert m.steps_failures_as_limit == pytest.approx((20 + 50) / 2)
    assert m.steps_to_success == pytest.approx(20.0)


def test_summarize_averages_over_tasks():
    records = _records() + [EpisodeRecord("c", 0, True, 40)]
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
    summary = summarize([EpisodeRecord("b", 0, False, 100)], ["b"], max_episode_steps=100)
    assert summary["average"]["steps_to_success"] is None
    assert summary["average"]["success_rate"] == 0.0
    assert not math.isnan(summary["average"]["steps_failures_as_limit"])


def test_format_table():
    summary = summarize(_records(), ["a", "b"], max_episode_steps=100)
    table = format_table(summary, title="my title")
    lines = table.splitlines()
    assert lines[0] == "**my title**"
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| task")]
    assert [r.split("|")[1].strip() for r in rows] == ["a", "b", "**average**"]
    assert "| a | 4 | 0.500 | 20.0 | 60.0 |" in lines
    assert "| b | 2 | 0.000 | - | 100.0 |" in lines
    assert "| **average** | 6 | 0.250 | 20.0 | 80.0 |" in lines
    assert "my title" not in format_table(summary)


# -- the protocol with the scripted expert ---------------------------------------------------------------
@pytest.fixture(scope="module")
def serial_result():
    return evaluate(ScriptedExpert(), EvalConfig(tasks=TASKS, episodes_per_task=EPISODES, num_workers=0), progress=False)


def test_fast_expert_cuts_the_experts_steps_and_leaves_other_tasks_to_them(serial_result):
    from vlapt.envs.experts import FastScriptedExpert

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
    assert r["protocol"]["episodes_per_task"] == EPISODES
    assert list(r["per_task"]) == TASKS
    for task in TASKS:
        assert r["per_task"][task]["episodes"] == EPISODES
        assert r["per_task"][task]["success_rate"] == 1.0
    assert r["average"]["success_rate"] == 1.0
    episodes = r["episodes"]
    assert [(e["task"], e["config_index"]) for e in episodes] == [(t, i) for t in TASKS for i in range(EPISODES)]
    assert all(e["success"] and 0 < e["steps"] < 500 for e in episodes)
    assert r["env_steps"] == sum(e["steps"] for e in episodes)
    # configurations differ, so episode lengths are not all the same
    assert len({e["steps"] for e in episodes if e["task"] == "reach-v3"}) > 1


def test_on_episode_callback_sees_every_episode():
    seen = []
    result = evaluate(ScriptedExpert(), EvalConfig(tasks=["reach-v3"], episodes_per_task=2, num_workers=0),
                      progress=False, on_episode=seen.append)
    assert sorted((r.task, r.config_index) for r in seen) == [("reach-v3", 0), ("reach-v3", 1)]
    assert [r.steps for r in sorted(seen, key=lambda r: r.config_index)] == [e["steps"] for e in result["episodes"]]


@pytest.mark.parametrize("workers,envs_per_task", [(0, 1), (2, 2)])
def test_evaluation_is_deterministic_and_independent_of_parallelism(serial_result, workers, envs_per_task):
    config = EvalConfig(tasks=TASKS, episodes_per_task=EPISODES, num_workers=workers, envs_per_task=envs_per_task)
    again = evaluate(ScriptedExpert(), config, progress=False)
    assert again["episodes"] == serial_result["episodes"]
    assert again["per_task"] == serial_result["per_task"]
    assert again["env_steps"] == serial_result["env_steps"]


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
