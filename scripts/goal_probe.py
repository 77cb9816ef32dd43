"""Does a policy see where the goal (or the object) is? A linear probe from its features, read on held-out first frames.

    .venv/bin/python scripts/goal_probe.py --policies runs/pipeline/sft/policy runs/pipeline/ppo/policy \
        --tasks reach-v3 --output probe.json [--against eval_policy.json ...]

For each task, renders the first frame of ``--train`` training configurations and of the
``--eval`` held-out configurations of the evaluation protocol (the eval split, ``config_seed=0``,
indices 0..eval-1: the configurations `vlapt eval` runs), with the simulator's goal position (or,
with ``--target object``, the first object's). A
ridge probe from the features the policy's action head reads (the VLA's action readout) to that position
is fitted on the training frames and read on the held-out ones. On a first frame the arm stands in
the same pose every time, so only the image can say where the goal or object is: the probe's error
says how precisely the policy's encoder places it. Guessing the training positions' mean is the floor
to beat.

``--against`` takes `vlapt eval` results of the same policies (one per policy, in order) and splits
the held-out configurations of each task by the episode's outcome: is the probe's error larger where
the policy failed?

Each error is also split into its part along the camera's line of sight to the true position
(``probe_cm_along_view``: what one image can show only through the target's apparent size) and
its part across it (``probe_cm_across_view``: what moves the target in the image); with several
views, along and across the first view's line of sight, which the other views see from the side.
``sight_in_box_cm`` is how far that line runs, on average, through the box the training positions
span: how much one view of a target leaves open.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

import vlapt  # noqa: F401  (before mujoco: headless rendering setup)
from vlapt.envs import get_suite
from vlapt.envs.metaworld.env import AUX_TARGETS
from vlapt.envs.pools import make_pool
from vlapt.interfaces import SlotSpec, camera_views, stack_observations
from vlapt.policies import load_policy

TARGETS = {"goal": list(AUX_TARGETS[-3:]),  # the goal's xyz in MetaWorld's state: the last of the env's auxiliary targets
           "object": list(AUX_TARGETS[:3])}  # the first object's xyz: the first of them


def first_frames(policy, suite, task: str, split: str, count: int, target: str = "goal") -> tuple[list[dict], np.ndarray]:
    """The first observation of configurations 0..count-1 of ``split``, and each one's ``target`` position ``(count, 3)``."""
    config = suite.check_env_config(dataclasses.replace(policy.observation_config(), privileged_state=True))
    observations = []
    with make_pool([SlotSpec(suite, task, config, policy.chunk_len)], num_workers=0) as pool:
        for index in range(count):
            observation, _ = pool.reset({0: {"split": split, "index": index}})[0]
            observations.append(observation)
    positions = np.stack([o.pop("state")[TARGETS[target]] for o in observations]).astype(np.float64)
    return observations, positions


def lines_of_sight(positions: np.ndarray, camera: np.ndarray) -> np.ndarray:
    """Unit vectors from ``camera`` towards each position."""
    sight = positions - camera
    return sight / np.linalg.norm(sight, axis=1, keepdims=True)


def sight_in_box(positions: np.ndarray, camera: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Length of the line from ``camera`` through each position that lies inside the box ``[low, high]``."""
    sight = lines_of_sight(positions, camera)
    with np.errstate(divide="ignore", invalid="ignore"):
        ends = np.stack([(low - positions) / sight, (high - positions) / sight])  # (2, N, 3): where each face is met
    crosses = np.isfinite(ends).all(0)  # a line parallel to a pair of faces is bounded by the others
    enter = np.where(crosses, ends.min(0), -np.inf).max(1)
    leave = np.where(crosses, ends.max(0), np.inf).min(1)
    outside = (~crosses & ((positions < low) | (positions > high))).any(1)  # parallel to a slab it is not in
    return np.where(outside, 0.0, np.maximum(leave - enter, 0.0))


def camera_position(policy, suite, task: str) -> np.ndarray:
    """Where the policy's (first) camera sits in the world (MetaWorld's cameras are fixed in the scene)."""
    import mujoco

    from vlapt.envs.metaworld.env import MetaWorldVLAEnv

    config = suite.check_env_config(policy.observation_config())
    env = MetaWorldVLAEnv(task, dataclasses.replace(config, render=False))
    try:
        env.reset(options={"split": "eval", "index": 0})
        raw, view = env._env.unwrapped, camera_views(config.camera)[0]
        return np.array(raw.data.cam_xpos[mujoco.mj_name2id(raw.model, mujoco.mjtObj.mjOBJ_CAMERA, view)])
    finally:
        env.close()


def readout_features(policy, observations: list[dict], batch_size: int = 64) -> np.ndarray:
    """What the policy's action head reads, per observation ``(N, F)``."""
    if not hasattr(policy, "make_batch"):
        raise SystemExit(f"{type(policy).__name__} does not expose its action readout; the probe reads VLA policies")
    policy.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(observations), batch_size):
            batch = stack_observations(observations[start:start + batch_size])
            out.append(policy(policy.make_batch(batch)).features.float().numpy())
    return np.concatenate(out).astype(np.float64)


def fit_probe(features: np.ndarray, targets: np.ndarray, ridge: float):
    """Ridge regression on standardised features; returns a function features -> predicted targets."""
    mean, std = features.mean(0), features.std(0) + 1e-6

    def design(x: np.ndarray) -> np.ndarray:
        return np.c_[(x - mean) / std, np.ones(len(x))]

    x = design(features)
    weights = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ targets)
    return lambda f: design(f) @ weights


def probe(policy, suite, task: str, train: int, held_out: int, ridge: float, target: str = "goal") -> dict:
    train_obs, train_positions = first_frames(policy, suite, task, "train", train, target)
    eval_obs, eval_positions = first_frames(policy, suite, task, "eval", held_out, target)
    predict = fit_probe(readout_features(policy, train_obs), train_positions, ridge)
    offsets = predict(readout_features(policy, eval_obs)) - eval_positions
    errors = np.linalg.norm(offsets, axis=1) * 100
    camera = camera_position(policy, suite, task)
    sight = lines_of_sight(eval_positions, camera)
    along = np.abs((offsets * sight).sum(1)) * 100
    in_box = sight_in_box(eval_positions, camera, train_positions.min(0), train_positions.max(0)) * 100
    guess = np.linalg.norm(train_positions.mean(0) - eval_positions, axis=1) * 100
    return {"probe_cm_mean": float(errors.mean()), "probe_cm_median": float(np.median(errors)),
            "probe_cm_along_view": float(along.mean()),
            "probe_cm_across_view": float(np.sqrt(np.maximum(errors ** 2 - along ** 2, 0)).mean()),
            "sight_in_box_cm": float(in_box.mean()),
            "share_over_5cm": float((errors > 5).mean()), "mean_guess_cm": float(guess.mean()),
            "per_configuration_cm": [round(float(e), 3) for e in errors]}


def by_outcome(errors: list[float], result: dict, task: str) -> dict:
    """The probe's errors split by the evaluated episode's outcome on the same configuration."""
    success = {e["config_index"]: e["success"] for e in result["episodes"] if e["task"] == task}
    if not success:
        raise SystemExit(f"the evaluation result has no episode of {task}")
    split = {True: [], False: []}
    for index, error in enumerate(errors):
        if index in success:
            split[success[index]].append(error)
    over = [success[i] for i, e in enumerate(errors) if e > 5 and i in success]
    under = [success[i] for i, e in enumerate(errors) if e <= 5 and i in success]
    return {"failures": len(split[False]), "probe_cm_failures": float(np.mean(split[False])) if split[False] else None,
            "probe_cm_successes": float(np.mean(split[True])) if split[True] else None,
            "failure_rate_probe_over_5cm": 1 - float(np.mean(over)) if over else None,
            "failure_rate_probe_within_5cm": 1 - float(np.mean(under)) if under else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", nargs="+", required=True, help="saved VLA policy directories")
    parser.add_argument("--tasks", default="reach-v3,push-v3,pick-place-v3", help="comma-separated MT10 tasks")
    parser.add_argument("--train", type=int, default=400, help="training configurations to fit the probe on")
    parser.add_argument("--eval", type=int, default=50, help="held-out configurations to read it on")
    parser.add_argument("--ridge", type=float, default=1.0)
    parser.add_argument("--target", choices=sorted(TARGETS), default="goal", help="what the probe places")
    parser.add_argument("--against", nargs="*", default=[], help="`vlapt eval` results, one per policy")
    parser.add_argument("--output", default="", help="JSON file for every figure (and per-configuration errors)")
    args = parser.parse_args(argv)
    if args.train < 2 or args.eval < 1:
        parser.error("--train must be >= 2 and --eval >= 1")
    if args.against and len(args.against) != len(args.policies):
        parser.error(f"--against takes one evaluation result per policy ({len(args.policies)}), got {len(args.against)}")
    torch.set_num_threads(1)
    suite = get_suite("mt10")
    tasks = suite.resolve_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
    results = {}
    for k, path in enumerate(args.policies):
        policy = load_policy(path)
        evaluation = json.loads(Path(args.against[k]).read_text()) if args.against else None
        for task in tasks:
            figures = probe(policy, suite, task, args.train, args.eval, args.ridge, args.target)
            if evaluation is not None:
                figures["by_outcome"] = by_outcome(figures["per_configuration_cm"], evaluation, task)
            results.setdefault(path, {})[task] = figures
            shown = {name: (round(value, 3) if isinstance(value, float) else value)
                     for name, value in figures.items() if name != "per_configuration_cm"}
            print(f"{path} {task} {json.dumps(shown)}", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"command": " ".join(sys.argv), "train": args.train, "eval": args.eval,
                                                 "ridge": args.ridge, "target": args.target, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
