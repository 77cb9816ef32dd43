"""How often do demonstrations already command full-speed travel?

    .venv/bin/python scripts/action_saturation.py DEMOS.hdf5 [--threshold 0.99]

MetaWorld moves the hand's target by at most 1 cm per axis per env step (actions clipped to
[-1, 1]). A step whose largest translation command (max |dx|, |dy|, |dz|) reaches the bound
already travels as fast as the env allows along its fastest axis; a policy that learns these
motions can only get faster on the other steps, or by taking another path. Prints, per task,
the share of the demonstrations' steps at the bound. Reads the actions of a `vlapt collect`
HDF5 dataset (no images are loaded).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import h5py
import numpy as np


def saturation(path: Path, threshold: float) -> dict[str, tuple[int, int, int]]:
    """Per task: (episodes, steps, steps whose largest translation command is at least ``threshold``)."""
    episodes, steps, saturated = Counter(), Counter(), Counter()
    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise ValueError(f"{path} is not a vlapt HDF5 dataset (it has no 'data' group); pass `vlapt collect`'s output")
        for group in f["data"].values():
            task = group.attrs["task"]
            translation = np.abs(group["actions"][:, :3]).max(axis=1)
            episodes[task] += 1
            steps[task] += len(translation)
            saturated[task] += int((translation >= threshold).sum())
    return {task: (episodes[task], steps[task], saturated[task]) for task in sorted(steps)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path, help="a `vlapt collect` HDF5 dataset")
    parser.add_argument("--threshold", type=float, default=0.99, help="the command counted as full speed (default 0.99)")
    args = parser.parse_args(argv)
    try:
        rows = saturation(args.dataset, args.threshold)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"| task | episodes | steps | share of steps at full speed (max translation >= {args.threshold}) |")
    print("|---|---|---|---|")
    for task, (n, total, fast) in rows.items():
        print(f"| {task} | {n} | {total} | {fast / total:.2f} |")
    n, total, fast = (sum(column) for column in zip(*rows.values()))
    print(f"| all | {n} | {total} | {fast / total:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
