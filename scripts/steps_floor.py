"""How few env steps can a policy need on MT10? A floor under steps to success, from geometry.

    .venv/bin/python scripts/steps_floor.py --episodes 50 --output docs/results/steps_floor_mt10.json
    .venv/bin/python scripts/steps_floor.py --floors docs/results/steps_floor_mt10.json --compare RESULT.json ...
    .venv/bin/python scripts/steps_floor.py --floors docs/results/steps_floor_mt10.json --start SFT.json --compare RESULT.json

MetaWorld moves the hand's mocap target by ``action * action_scale`` per env step, with actions clipped to
[-1, 1] and ``action_scale`` 1/100: at most 1 cm per axis per step, whatever the policy. So any motion
that carries the hand by ``d`` (largest per-axis component) takes at least ``d / 1 cm`` steps. On each
held-out configuration of the evaluation protocol (docs/evaluation.md) the scripted expert is run to
success, unrendered, and its episode gives two points: where the hand was when the object (or
handle, button) first moved after settling, and how far the object had moved by the step of success. The floor is

    steps >= ceil(|hand_start -> hand_at_touch|_inf / 1 cm)
             + ceil(min(|hand|, |object| displacement from touch to the step before success)_inf / 1 cm) + 1

which counts straight lines at full speed to the expert's touch point, then the shorter of the hand's and
the object's displacement until the step before success, then that step, and nothing for turning, grasping, lifting, or the hand
lagging its target (the hand can jump more than 1 cm in a step when it catches up with a target it was
held back from; the target itself cannot). For reach,
where nothing is moved, it is the distance to the goal less the 5 cm success radius. A policy may touch
elsewhere or move the object less, so this is the floor of the experts' contacts, not of every
strategy; it says how much of a step count is travel that cannot be cut. ``--compare`` sets `vlapt eval`
results (same protocol) against it, configuration by configuration. With ``--start`` (the evaluation of the
policy post-training began from) the comparison keeps the configurations that policy solved too, and gives
the share of its headroom each result closed: (start - steps) / (start - floor), 1 at the floor, 0 at the
start's pace. floor / start is the lowest ratio to the start that the experts' contacts allow.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

import vlapt  # noqa: F401  (before mujoco: headless rendering setup)
from vlapt.envs import get_suite
from vlapt.envs.metaworld.env import MetaWorldVLAEnv
from vlapt.envs.metaworld.experts import ScriptedExpert

STEP = 0.01  # MetaWorld's action_scale: the most the mocap target moves per axis per env step (m)
TOUCH = 0.0015  # the object counts as touched at the first step it moves this far (m), after it settles
SETTLE = 5  # steps after reset in which objects may still drop or roll into place
REACH_RADIUS = 0.05  # reach-v3 succeeds within 5 cm of the goal


def chebyshev(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def cells(distance: float) -> int:
    return math.ceil(max(distance, 0.0) / STEP - 1e-4)  # float32 states: a micrometre of slack


def floor_of_episode(task: str, states: list[np.ndarray]) -> dict:
    """The floor and its two legs from one successful expert episode (states[0] is the reset state)."""
    hand = np.stack([s[0:3] for s in states])
    obj = np.stack([s[4:7] for s in states])
    goal = states[0][36:39]
    if task == "reach-v3":
        approach = cells(chebyshev(hand[0], goal) - REACH_RADIUS)
        return {"floor": approach, "approach": approach, "carry": 0, "touch_step": None}
    moving = np.zeros(len(states), dtype=bool)
    moving[1:] = np.max(np.abs(np.diff(obj, axis=0)), axis=1) > TOUCH
    moving[:SETTLE] = False
    touch = int(np.argmax(moving)) - 1 if moving.any() else len(states) - 1  # the hand's last step before the push
    approach = cells(chebyshev(hand[0], hand[touch]))
    # Up to the step before success (some tasks report a jumped object position on the step of success), then that
    # step; the shorter of the hand's and the object's displacement, since a handle on a lever can outrun the hand.
    carry = 1 + cells(min(chebyshev(hand[touch], hand[-2]), chebyshev(obj[touch], obj[-2])))
    return {"floor": approach + carry, "approach": approach, "carry": carry, "touch_step": touch}


def run_task(task: str, episodes: int, config_seed: int) -> dict:
    expert = ScriptedExpert()
    env = MetaWorldVLAEnv(task, expert.observation_config(), chunk_len=1, config_seed=config_seed)
    rows, max_hand_step, max_object_step = [], 0.0, 0.0
    for index in range(episodes):
        obs, _ = env.reset(options={"split": "eval", "index": index})
        states, success = [obs["state"]], False
        while True:
            obs, _, terminated, truncated, info = env.step(expert.act_one(obs["state"], task)[None])
            states.append(obs["state"])
            max_hand_step = max(max_hand_step, chebyshev(states[-1][0:3], states[-2][0:3]))
            if len(states) > SETTLE:
                max_object_step = max(max_object_step, chebyshev(states[-1][4:7], states[-2][4:7]))
            if terminated or truncated:
                success = bool(info["success"])
                break
        if success:
            rows.append({"index": index, "expert_steps": len(states) - 1, **floor_of_episode(task, states)})
    env.close()
    mean = (lambda key: float(np.mean([r[key] for r in rows])) if rows else None)
    return {"episodes": episodes, "expert_successes": len(rows), "expert_steps": mean("expert_steps"),
            "floor": mean("floor"), "approach": mean("approach"), "carry": mean("carry"),
            "max_hand_step_m": max_hand_step, "max_object_step_m": max_object_step, "per_episode": rows}


def solved_steps(floors: dict, result: dict) -> dict[tuple[str, int], int]:
    """(task, configuration) -> steps of each success of a `vlapt eval` result run under the floors' protocol."""
    protocol = result["protocol"]
    if protocol["split"] != "eval" or protocol["config_seed"] != floors["config_seed"]:
        raise ValueError(f"the result ran on split {protocol['split']!r}, config_seed {protocol['config_seed']}; "
                         f"the floors on 'eval', config_seed {floors['config_seed']}")
    return {(e["task"], e["config_index"]): e["steps"] for e in result["episodes"] if e["success"]}


def compare(floors: dict, result: dict, start: dict | None = None) -> dict:
    """Per task, a policy's mean steps and the floor's on the configurations it and the expert both solved.

    With ``start`` (the evaluation of the policy post-training began from), only the configurations that
    policy solved as well, with its mean steps there and the share of its headroom to the floor closed.
    """
    mine = solved_steps(floors, result)
    before = solved_steps(floors, start) if start is not None else None
    rows = {}
    for task, row in floors["per_task"].items():
        floor_of = {r["index"]: r for r in row["per_episode"] if r.get("floor") is not None}
        keys = [k for k in mine if k[0] == task and k[1] in floor_of and (before is None or k in before)]
        if not keys:
            continue
        rows[task] = {"configurations": len(keys), "steps": float(np.mean([mine[k] for k in keys])),
                      "expert_steps": float(np.mean([floor_of[k[1]]["expert_steps"] for k in keys])),
                      "floor": float(np.mean([floor_of[k[1]]["floor"] for k in keys]))}
        if before is not None:
            rows[task]["start_steps"] = float(np.mean([before[k] for k in keys]))
            rows[task]["closed"] = headroom_closed(rows[task]["start_steps"], rows[task]["steps"], rows[task]["floor"])
    return rows


def headroom_closed(start: float, steps: float, floor: float) -> float:
    """The share of the start's steps above the floor that a policy cut: 0 at the start's pace, 1 at the floor."""
    return (start - steps) / (start - floor) if start > floor else float("nan")


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from None


def print_floors(per_task: dict) -> None:
    print(f"{'task':<24} {'expert':>7} {'floor':>6} {'approach':>9} {'carry':>6}  fastest step of hand, object")
    for task, row in per_task.items():
        print(f"{task:<24} {row['expert_steps']:7.1f} {row['floor']:6.1f} {row['approach']:9.1f} {row['carry']:6.1f}"
              f"  {100 * row['max_hand_step_m']:.2f} cm, {100 * row['max_object_step_m']:.2f} cm")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=50, help="per task, held-out configurations")
    parser.add_argument("--suite", default="mt10")
    parser.add_argument("--config-seed", type=int, default=0, help="the evaluation protocol's configurations")
    parser.add_argument("--output", type=Path, help="write per-task and per-episode floors to this JSON file")
    parser.add_argument("--floors", type=Path, help="read the floors from a file --output wrote instead of measuring")
    parser.add_argument("--compare", type=Path, nargs="+", default=[], help="vlapt eval results to set against the floor")
    parser.add_argument("--start", type=Path, help="vlapt eval result of the policy post-training started from: "
                        "compare on the configurations it solved too, and give the share of its headroom closed")
    args = parser.parse_args()
    try:  # every file is read before the floors are measured, which takes minutes
        floors = read_json(args.floors, "floors from") if args.floors else None
        start = read_json(args.start, "--start") if args.start else None
        results = [(path, read_json(path, "--compare")) for path in args.compare]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if floors is None:
        per_task = {task: run_task(task, args.episodes, args.config_seed)
                    for task in tqdm(get_suite(args.suite).resolve_tasks(), desc="tasks", unit="task")}
        solved = [row for row in per_task.values() if row["floor"] is not None]
        average = {key: float(np.mean([row[key] for row in solved]))
                   for key in ("expert_steps", "floor", "approach", "carry")}
        floors = {"suite": args.suite, "episodes_per_task": args.episodes, "config_seed": args.config_seed,
                  "step_m": STEP, "touch_m": TOUCH, "average": average, "per_task": per_task}
        if args.output:
            args.output.write_text(json.dumps(floors, indent=1) + "\n")
    print_floors(floors["per_task"])
    average = floors["average"]
    print(f"{'average over tasks':<24} {average['expert_steps']:7.1f} {average['floor']:6.1f} "
          f"{average['approach']:9.1f} {average['carry']:6.1f}")
    for path, result in results:
        try:
            rows = compare(floors, result, start)
        except (ValueError, KeyError) as err:
            print(f"error: {path}: {err}", file=sys.stderr)
            return 2
        if not rows:
            print(f"\n{path}: no configuration solved by it, the expert{' and the start' if start else ''}")
            continue
        keys = ("steps", "expert_steps", "floor") + (("start_steps",) if start is not None else ())
        mean = {key: float(np.mean([row[key] for row in rows.values()])) for key in keys}
        mean["configurations"] = sum(row["configurations"] for row in rows.values())
        if start is None:
            print(f"\n{path}: mean steps on the configurations it and the expert solved, against the floor there")
            print(f"{'task':<24} {'n':>3} {'policy':>7} {'expert':>7} {'floor':>6} {'policy/floor':>13}")
            for task, row in [*rows.items(), ("average over tasks", mean)]:
                print(f"{task:<24} {row['configurations']:3d} {row['steps']:7.1f} {row['expert_steps']:7.1f} {row['floor']:6.1f} "
                      f"{row['steps'] / row['floor']:13.2f}")
            continue
        print(f"\n{path}: mean steps on the configurations it, the expert and {args.start} solved, "
              "against the start's and the floor there")
        print(f"{'task':<24} {'n':>3} {'start':>6} {'policy':>7} {'floor':>6} {'policy/start':>13} {'floor/start':>12} "
              f"{'closed':>7}")
        mean["closed"] = headroom_closed(mean["start_steps"], mean["steps"], mean["floor"])
        for task, row in [*rows.items(), ("average over tasks", mean)]:
            print(f"{task:<24} {row['configurations']:3d} {row['start_steps']:6.1f} {row['steps']:7.1f} {row['floor']:6.1f} "
                  f"{row['steps'] / row['start_steps']:13.2f} {row['floor'] / row['start_steps']:12.2f} {row['closed']:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
