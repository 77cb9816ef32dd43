"""Where a policy's failed episodes go wrong: reaching, moving, lifting or placing.

    .venv/bin/python scripts/failure_modes.py --policy runs/pipeline/ppo/policy --episodes 50

Runs the policy (its mean chunk) one episode at a time on the held-out configurations of each task
(the eval split, ``config_seed=0``, episode limit 500, like `vlapt eval`; single-episode batches, so
an episode can differ from its twin in a batched `vlapt eval` run) and, after every chunk, reads
from the simulator where the gripper, the object and the goal are. Each failed episode gets the
first stage it never got past:

- ``not reached``: the gripper's centre never came within ``--reach`` m of the object;
- ``not moved``: reached, but the object never moved ``--moved`` m from where it started;
- ``not lifted`` (tasks whose goal is off the table: pick-place, peg-insert-side): moved, but
  never raised ``--lifted`` m;
- ``missed goal``: it got that far, but the object never came within the task's success
  distance of the goal (the closest it came is reported).

On reach, where nothing is carried, the gripper itself is the "object": a failure is a missed goal,
and the closest the gripper came to it is reported.

A missed goal is also told apart by where the object ended: ``left`` when the episode ended at
least ``--left`` m farther from the goal than the closest it came (it got near and went away
again), else it stopped near its closest approach (``stopped``). Each episode records the env
step of that closest approach (read at the end of each chunk, like every measurement here), the
object's offset from the goal there (x, y, z), the distance at the end and the goal's position.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

import vlapt  # noqa: F401  (before mujoco: headless rendering setup)
from vlapt.envs.metaworld.env import MetaWorldVLAEnv
from vlapt.policies import load_policy

STAGES = ("not reached", "not moved", "not lifted", "missed goal")
LIFTING_TASKS = {"pick-place-v3", "peg-insert-side-v3"}
HAND_TASKS = {"reach-v3"}


def run_episode(policy, env: MetaWorldVLAEnv, task: str, index: int) -> dict:
    observation, _ = env.reset(options={"split": "eval", "index": index})
    mw = env._env  # the MetaWorld env underneath: object, gripper and goal positions

    def carried() -> np.ndarray:
        return np.array(mw.tcp_center if task in HAND_TASKS else mw._get_pos_objects()[:3], dtype=float)

    start, goal = carried(), np.array(mw._target_pos, dtype=float)
    closest_hand, farthest_moved, highest, closest_goal, closest_step, closest_offset = np.inf, 0.0, 0.0, np.inf, 0, None
    done, terminated, steps = False, False, 0
    while not done:
        observation, _, terminated, truncated, info = env.step(policy.predict(observation))  # predict: inference mode
        done, steps = terminated or truncated, info["episode_steps"]
        obj = carried()
        closest_hand = min(closest_hand, float(np.linalg.norm(mw.tcp_center - obj)))
        farthest_moved = max(farthest_moved, float(np.linalg.norm(obj - start)))
        highest = max(highest, float(obj[2] - start[2]))
        if (distance := float(np.linalg.norm(obj - goal))) < closest_goal:
            closest_goal, closest_step, closest_offset = distance, steps, obj - goal
    return {"index": index, "success": bool(terminated), "steps": int(steps), "closest_hand_to_object": closest_hand,
            "object_moved": farthest_moved, "object_lifted": highest, "closest_object_to_goal": closest_goal,
            "closest_step": closest_step, "closest_offset": closest_offset.tolist(), "end_object_to_goal": distance,
            "start_to_goal": float(np.linalg.norm(start - goal)), "goal": goal.tolist()}


def failure_stage(episode: dict, task: str, reach: float, moved: float, lifted: float) -> str | None:
    if episode["success"]:
        return None
    if task in HAND_TASKS:
        return "missed goal"
    if episode["closest_hand_to_object"] > reach:
        return "not reached"
    if episode["object_moved"] < moved:
        return "not moved"
    if task in LIFTING_TASKS and episode["object_lifted"] < lifted:
        return "not lifted"
    return "missed goal"


def left_goal(episode: dict, margin: float) -> bool:
    """A missed goal the object came near and then went away from: it ended ``margin`` m beyond its closest."""
    return episode["end_object_to_goal"] - episode["closest_object_to_goal"] >= margin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="a policy directory (config.json + model.safetensors)")
    parser.add_argument("--tasks", nargs="+", default=["reach-v3", "push-v3", "pick-place-v3", "peg-insert-side-v3"])
    parser.add_argument("--episodes", type=int, default=50, help="held-out configurations per task (0..N-1)")
    parser.add_argument("--reach", type=float, default=0.05)
    parser.add_argument("--moved", type=float, default=0.02)
    parser.add_argument("--lifted", type=float, default=0.02)
    parser.add_argument("--left", type=float, default=0.05,
                        help="a missed goal 'left' when it ended this much farther from the goal than its closest (m)")
    parser.add_argument("--output", help="write every episode's measurements to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    policy = load_policy(args.policy)
    results = {}
    print("| task | episodes | success | " + " | ".join(STAGES) + " | closest object-goal distance when it missed (m, median) "
          "| of those misses, left the goal |")
    print("|---|---|---|" + "---|" * len(STAGES) + "---|---|")
    for task in args.tasks:
        env = MetaWorldVLAEnv(task, policy.observation_config(), chunk_len=policy.chunk_len)
        try:
            episodes = [run_episode(policy, env, task, index)
                        for index in tqdm(range(args.episodes), desc=task, leave=False)]
        finally:
            env.close()
        for episode in episodes:
            episode["failure"] = failure_stage(episode, task, args.reach, args.moved, args.lifted)
        counts = Counter(e["failure"] for e in episodes)
        misses = [e for e in episodes if e["failure"] == "missed goal"]
        missed = [e["closest_object_to_goal"] for e in misses]
        left = sum(left_goal(e, args.left) for e in misses)
        cells = " | ".join("-" if (stage == "not lifted" and task not in LIFTING_TASKS)
                           or (stage != "missed goal" and task in HAND_TASKS) else str(counts.get(stage, 0))
                           for stage in STAGES)
        median = f"{np.median(missed):.3f}" if missed else "-"
        success = np.mean([e["success"] for e in episodes])
        print(f"| {task} | {len(episodes)} | {success:.2f} | {cells} | {median} | {left if misses else '-'} |", flush=True)
        results[task] = episodes
    if args.output:
        with open(args.output, "w") as file:
            json.dump({"policy": args.policy, "thresholds": {"reach": args.reach, "moved": args.moved, "lifted": args.lifted,
                                                                    "left": args.left},
                       "episodes": results}, file, indent=1)


if __name__ == "__main__":
    main()
