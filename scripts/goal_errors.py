"""Where a policy's hand ends up relative to the goal, on held-out configurations of one task.

    .venv/bin/python scripts/goal_errors.py --policy runs/sft_fovy30/policy --task reach-v3 --episodes 12

Per episode (held-out configurations unless ``--split train``): success, the closest the
gripper's centre came to the goal (measured after each chunk), and its final error split along
and across the camera's line of sight to the goal.
Errors mostly along the line of sight point at missing depth; errors across it at imprecise
image localisation.

With ``--probe DATASET`` it also asks whether the policy *sees* the goal: a linear (ridge)
probe from the action readout's features to the goal position is fitted on the task's
demonstrations in DATASET (10 held out to report its error there), then read on the frames the
policy visits itself. Later frames give the goal away through the hand (an expert's hand heads
for the goal, and proprioception says where the hand is); on a first frame the arm is always in
the same pose, so only the image can tell where the goal is: read the first-frame columns.
"""

from __future__ import annotations

import argparse
import contextlib

import h5py
import numpy as np
import torch

import vlapt
from vlapt.envs.metaworld_env import MetaWorldVLAEnv
from vlapt.evaluation.agents import env_config_for_policy


@contextlib.contextmanager
def captured_readout(policy):
    """Inside, every forward of the policy leaves the action readout's trunk features, what the
    action head reads, ``(B, d_model)``, in the yielded dict under "features"."""
    captured = {}
    hook = policy.model.register_forward_hook(
        lambda module, inputs, output: captured.update(features=output.features.detach().numpy()))
    try:
        yield captured
    finally:
        hook.remove()


def readout_features(policy, observations: dict) -> np.ndarray:
    with torch.no_grad():
        return policy.model.eval()(policy.make_batch(observations)).features.numpy()


def split_by_sight(error: np.ndarray, goal: np.ndarray, camera_position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lengths of ``error`` (N, 3) along and across the camera's line of sight to ``goal`` (N, 3)."""
    sight = goal - camera_position
    sight /= np.linalg.norm(sight, axis=-1, keepdims=True)
    along = (error * sight).sum(-1, keepdims=True)
    return np.abs(along[:, 0]), np.linalg.norm(error - along * sight, axis=-1)


def fit_goal_probe(policy, dataset: str, task: str, camera_position: np.ndarray, held_out: int = 10, ridge: float = 1.0):
    """Ridge probe readout features -> goal xyz on the task's demos.

    Returns the probe fitted on all demos and a line on how the one fitted without the last
    ``held_out`` demos does on them.
    """
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

    error = fit(~test)(x[test]) - y[test]
    first = np.r_[True, episode[1:] != episode[:-1]][test]
    along, across = split_by_sight(error[first], y[test][first], camera_position)
    guess_the_mean = np.linalg.norm(y[~test].mean(0) - y[test][first], axis=1).mean()
    report = (f"goal probe error on {held_out} held-out demonstrations: {np.linalg.norm(error, axis=1).mean():.3f} m "
              f"over all frames; on their first frames {np.linalg.norm(error[first], axis=1).mean():.3f} m "
              f"({along.mean():.3f} along the line of sight, {across.mean():.3f} across it; "
              f"always guessing the mean goal: {guess_the_mean:.3f} m)")
    return fit(np.ones(len(x), dtype=bool)), report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--task", default="reach-v3")
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--split", default="eval", choices=["eval", "train"],
                        help="configurations to replay; 'train' holds those the demonstrations were collected on")
    parser.add_argument("--probe", metavar="DATASET", help="also probe the goal from the policy's features (see above)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    policy = vlapt.load_policy(args.policy)
    env = MetaWorldVLAEnv(args.task, env_config_for_policy(policy.config), chunk_len=policy.config.chunk_len)
    mw = env._env  # the MetaWorld env underneath: goal and gripper positions
    camera = mw.model.camera(policy.config.camera).id
    probe = None
    if args.probe:
        probe, report = fit_goal_probe(policy, args.probe, args.task, mw.data.cam_xpos[camera].copy())
        print(report + "\n")
    extra = " probe error, first frame (m) | probe error, mean over the episode (m) |" if probe else ""
    print("| episode | success | goal z | closest (m) | final error along line of sight (m) | across (m) |" + extra)
    print("|---|---|---|---|---|---|" + ("---|---|" if probe else ""))
    try:
        for index in range(args.episodes):
            observation, _ = env.reset(options={"split": args.split, "index": index})
            goal = np.array(mw._target_pos, dtype=float)
            closest, done, terminated, probe_errors = np.inf, False, False, []
            while not done:
                with captured_readout(policy) as captured:  # the probe reads the forward that acts
                    chunk = policy.predict(observation)
                if probe:
                    probe_errors.append(float(np.linalg.norm(probe(captured["features"])[0] - goal)))
                observation, _, terminated, truncated, _ = env.step(chunk)
                done = terminated or truncated
                closest = min(closest, float(np.linalg.norm(mw.tcp_center - goal)))
            along, across = (float(v[0]) for v in split_by_sight((mw.tcp_center - goal)[None], goal[None], mw.data.cam_xpos[camera]))
            cells = f" {probe_errors[0]:.3f} | {np.mean(probe_errors):.3f} |" if probe else ""
            print(f"| {index} | {'yes' if terminated else 'no'} | {goal[2]:.2f} | {closest:.3f} | {along:.3f} | {across:.3f} |" + cells)
    finally:
        env.close()


if __name__ == "__main__":
    main()
