"""Where a policy's hand ends up relative to the goal, on held-out configurations of one task.

    .venv/bin/python scripts/goal_errors.py --policy runs/sft_fovy30/policy --task reach-v3 --episodes 12

Per episode: success, the closest the gripper's centre came to the goal (measured after each
chunk), and its final error split along and across the camera's line of sight to the goal.
Errors mostly along the line of sight point at missing depth; errors across it at imprecise
image localisation.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import vlapt
from vlapt.envs.metaworld_env import MetaWorldVLAEnv
from vlapt.evaluation.agents import env_config_for_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--task", default="reach-v3")
    parser.add_argument("--episodes", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    policy = vlapt.load_policy(args.policy)
    env = MetaWorldVLAEnv(args.task, env_config_for_policy(policy.config), chunk_len=policy.config.chunk_len)
    mw = env._env  # the MetaWorld env underneath: goal and gripper positions
    camera = mw.model.camera(policy.config.camera).id
    print("| episode | success | goal z | closest (m) | final error along line of sight (m) | across (m) |")
    print("|---|---|---|---|---|---|")
    try:
        for index in range(args.episodes):
            observation, _ = env.reset(options={"split": "eval", "index": index})
            goal = np.array(mw._target_pos, dtype=float)
            closest, done, terminated = np.inf, False, False
            while not done:
                observation, _, terminated, truncated, _ = env.step(policy.predict(observation))
                done = terminated or truncated
                closest = min(closest, float(np.linalg.norm(mw.tcp_center - goal)))
            sight = goal - mw.data.cam_xpos[camera]
            sight /= np.linalg.norm(sight)
            error = mw.tcp_center - goal
            along = abs(float(error @ sight))
            across = float(np.linalg.norm(error - (error @ sight) * sight))
            print(f"| {index} | {'yes' if terminated else 'no'} | {goal[2]:.2f} | {closest:.3f} | {along:.3f} | {across:.3f} |")
    finally:
        env.close()


if __name__ == "__main__":
    main()
