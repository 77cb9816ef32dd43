"""Where a policy's hand ends up relative to the goal, on held-out configurations of one task.

    .venv/bin/python scripts/goal_errors.py --policy runs/sft_fovy30/policy --task reach-v3 --episodes 12

Per episode: success, the closest the gripper's centre came to the goal (measured after each
chunk), and its final error split along and across the camera's line of sight to the goal.
Errors mostly along the line of sight point at missing depth; errors across it at imprecise
image localisation.

With ``--probe DATASET`` it also asks whether the policy *sees* the goal: a linear (ridge)
probe from the action readout's features to the goal position is fitted on the task's
demonstrations in DATASET (10 held out to report its error there), then read on the frames the
policy visits itself. A probe that is accurate on demonstration frames but not on the policy's
own points at perception drifting off the demonstrated states.
"""

from __future__ import annotations

import argparse

import h5py
import numpy as np
import torch

import vlapt
from vlapt.envs.metaworld_env import MetaWorldVLAEnv
from vlapt.evaluation.agents import env_config_for_policy


def readout_features(policy, observations: dict) -> np.ndarray:
    """The action readout token's trunk features, what the action head reads: ``(B, d_model)``."""
    captured = {}
    hook = policy.model.trunk.register_forward_hook(lambda module, inputs, output: captured.update(out=output))
    try:
        with torch.no_grad():
            policy.model.eval()(policy.make_batch(observations))
    finally:
        hook.remove()
    return captured["out"][:, -2].numpy()


def fit_goal_probe(policy, dataset: str, task: str, held_out: int = 10, ridge: float = 1.0):
    """Ridge probe readout features -> goal xyz on the task's demos; returns (predict, held-out error in m)."""
    features, goals, episode = [], [], []
    with h5py.File(dataset, "r") as file:
        demos = [group for group in file["data"].values() if group.attrs["task"] == task]
        for number, demo in enumerate(demos):
            frames = {"image": demo["obs/image"][:], "proprio": demo["obs/proprio"][:],
                      "instruction": str(demo.attrs["instruction"])}
            features.append(readout_features(policy, frames))
            goals.append(demo["obs/state"][:, -3:])  # MetaWorld's state ends with the goal position
            episode.append(np.full(len(frames["image"]), number))
    x, y, episode = np.concatenate(features), np.concatenate(goals), np.concatenate(episode)
    test = episode >= len(demos) - held_out

    def fit(rows):
        mean, std = x[rows].mean(0), x[rows].std(0) + 1e-6
        design = np.hstack([(x[rows] - mean) / std, np.ones((rows.sum(), 1))])
        weights = np.linalg.solve(design.T @ design + ridge * np.eye(design.shape[1]), design.T @ y[rows])
        return lambda f: np.hstack([(f - mean) / std, np.ones((len(f), 1))]) @ weights

    held_out_error = float(np.linalg.norm(fit(~test)(x[test]) - y[test], axis=1).mean())
    return fit(np.ones(len(x), dtype=bool)), held_out_error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--task", default="reach-v3")
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--probe", metavar="DATASET", help="also probe the goal from the policy's features (see above)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    policy = vlapt.load_policy(args.policy)
    env = MetaWorldVLAEnv(args.task, env_config_for_policy(policy.config), chunk_len=policy.config.chunk_len)
    mw = env._env  # the MetaWorld env underneath: goal and gripper positions
    camera = mw.model.camera(policy.config.camera).id
    probe = None
    if args.probe:
        probe, demo_error = fit_goal_probe(policy, args.probe, args.task)
        print(f"goal probe error on 10 held-out demonstrations: {demo_error:.3f} m\n")
    extra = " probe error, first frame (m) | probe error, mean over the episode (m) |" if probe else ""
    print("| episode | success | goal z | closest (m) | final error along line of sight (m) | across (m) |" + extra)
    print("|---|---|---|---|---|---|" + ("---|---|" if probe else ""))
    try:
        for index in range(args.episodes):
            observation, _ = env.reset(options={"split": "eval", "index": index})
            goal = np.array(mw._target_pos, dtype=float)
            closest, done, terminated, probe_errors = np.inf, False, False, []
            while not done:
                if probe:
                    frame = {key: observation[key] for key in ("image", "proprio", "instruction")}
                    guess = probe(readout_features(policy, frame))[0]
                    probe_errors.append(float(np.linalg.norm(guess - goal)))
                observation, _, terminated, truncated, _ = env.step(policy.predict(observation))
                done = terminated or truncated
                closest = min(closest, float(np.linalg.norm(mw.tcp_center - goal)))
            sight = goal - mw.data.cam_xpos[camera]
            sight /= np.linalg.norm(sight)
            error = mw.tcp_center - goal
            along = abs(float(error @ sight))
            across = float(np.linalg.norm(error - (error @ sight) * sight))
            cells = f" {probe_errors[0]:.3f} | {np.mean(probe_errors):.3f} |" if probe else ""
            print(f"| {index} | {'yes' if terminated else 'no'} | {goal[2]:.2f} | {closest:.3f} | {along:.3f} | {across:.3f} |" + cells)
    finally:
        env.close()


if __name__ == "__main__":
    main()
