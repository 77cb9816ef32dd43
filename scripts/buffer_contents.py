"""What the self-BC buffer of a training checkpoint holds, per task.

    .venv/bin/python scripts/buffer_contents.py RUN/checkpoints/step_NNNNNNNNN [--demos DATASET.hdf5]

For each task: how many entries are self-collected, their mean length and pace (steps relative
to the scripted expert on the same configuration, where the run recorded it:
`buffer_admission=pace`), and the share of their xyz BC targets at or beyond the action bound of
1 (padding past an episode's end excluded). That share tells whether imitating the buffer pulls
a full-speed command back inside the bound (`bc_self_actions`, docs/results.md). With
``--demos`` (the run's dataset) the demonstrations' own share is printed beside it. Reads only
safetensors and JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def at_bound_share(actions: np.ndarray, pad: np.ndarray | None = None) -> float:
    """Share of xyz action entries with |a| >= 1; ``pad`` (N, h) marks chunk steps to leave out."""
    xyz = np.abs(np.asarray(actions)[..., :3]) >= 1.0
    if pad is not None:
        xyz = xyz[~np.asarray(pad, bool)]
    return float(xyz.mean()) if xyz.size else math.nan


def summarise(checkpoint: Path, demos_path: Path | None = None) -> dict[str, dict]:
    try:
        meta = json.loads((checkpoint / "state.json").read_text())["buffer"]
        tensors = load_file(str(checkpoint / "state.safetensors"))
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"{checkpoint} is not a readable training checkpoint ({err}); pass RUN/checkpoints/step_*") from err
    demos = None
    if demos_path is not None:
        from vlapt.data import read_episodes

        demos = read_episodes(str(demos_path), list(meta["layout"]))
    out = {}
    for task, entries in meta["layout"].items():
        own = [e for e in entries if e["source"] == "self"]
        actions = [tensors[f"{e['prefix']}.actions"] for e in own]
        pads = [tensors[f"{e['prefix']}.pad"] for e in own]
        paces = [e["length"] / e["reference_steps"] for e in own if e.get("reference_steps")]
        row = {
            "entries": len(entries),
            "self": len(own),
            "self_mean_length": float(np.mean([e["length"] for e in own])) if own else math.nan,
            "self_mean_pace": float(np.mean(paces)) if paces else math.nan,
            "self_at_bound": at_bound_share(np.concatenate(actions), np.concatenate(pads)) if own else math.nan,
        }
        if demos is not None:
            task_demos = [d for d in demos if d.task == task]
            row["demos_at_bound"] = at_bound_share(np.concatenate([d.actions for d in task_demos])) if task_demos else math.nan
        out[task] = row
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a training checkpoint directory (RUN/checkpoints/step_*)")
    parser.add_argument("--demos", type=Path, help="the run's demonstrations, for their share at the bound")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    try:
        summary = summarise(args.checkpoint, args.demos)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    columns = ["entries", "self", "self_mean_length", "self_mean_pace", "self_at_bound"] + (["demos_at_bound"] if args.demos else [])
    print("| task | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for task, row in summary.items():
        cells = [f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print(f"| {task} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
