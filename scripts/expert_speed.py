"""How fast can MetaWorld's scripted strategies finish MT10? A bound on imitation's steps to success.

    .venv/bin/python scripts/expert_speed.py --gains 1 2 4 --episodes 50

The scripted experts are proportional controllers (action = k * error, clipped to [-1, 1]) that
run through fixed phases (above the object, down, grasp, lift, to the goal). Multiplying their
position commands by a gain keeps each phase but moves at full speed for longer, so the steps
to success of a high gain say how fast these strategies can go at all: a policy that imitates
them, or that RL only nudges, will not be much faster; shorter episodes need other motions.
Held-out configurations, the evaluation protocol of `vlapt eval` (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import vlapt  # noqa: F401  (before mujoco: headless rendering setup)
from vlapt.envs.experts import ScriptedExpert
from vlapt.evaluation import EvalConfig, evaluate


class GainScaledExpert(ScriptedExpert):
    """The scripted expert with its xyz command multiplied by ``gain`` before clipping."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain
        self.name = f"scripted x{gain:g}"

    def act_one(self, state: np.ndarray, task: str) -> np.ndarray:
        action = self.raw_action(state, task)
        action[:3] *= self.gain
        return np.clip(action, -1.0, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gains", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--episodes", type=int, default=50, help="per task, held-out configurations")
    parser.add_argument("--suite", default="mt10")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--output", help="write every gain's evaluation to this JSON file")
    args = parser.parse_args()
    results = {}
    for gain in args.gains:
        result = evaluate(GainScaledExpert(gain), EvalConfig(suite=args.suite, episodes_per_task=args.episodes,
                                                            num_workers=args.num_workers), progress=False)
        results[f"{gain:g}"] = {"average": result["average"], "per_task": result["per_task"]}
        avg = result["average"]
        print(f"gain {gain:g}: success {avg['success_rate']:.3f}, steps to success {avg['steps_to_success']:.1f}")
        for task, row in result["per_task"].items():
            steps = row["steps_to_success"]
            print(f"  {task:<26} {row['success_rate']:.2f}  {'-' if steps is None else f'{steps:.1f}'}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
