"""Fingerprint a tiny, fixed-seed run of the whole pipeline: demonstrations, weights, evaluations.

Runs `vlapt pipeline` (collect -> SFT -> post-train -> evaluate) on two tasks with a tiny model
and a few hundred env steps, then hashes what each stage produced: every demonstration array,
every policy's tensors (by name), and every evaluation's episodes (task, configuration, success,
steps). Two commits whose fingerprints match ran the kept behaviour identically, so a change
that should not alter results (a refactor, a new option off by default) can be checked with

    python scripts/fingerprint.py --output before.json        # on the old commit
    python scripts/fingerprint.py --output after.json --compare before.json

It takes about two minutes on two cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

OVERRIDES = [
    "collect.tasks=[reach-v3,drawer-close-v3]", "collect.demos_per_task=2", "collect.image_size=32",
    "sft.steps=30", "sft.batch_size=16", "sft.model.size=tiny", "sft.checkpoint_every=10",
    "ppo.envs_per_task=2", "ppo.horizon=4", "ppo.minibatch_size=16", "ppo.total_env_steps=600",
    "ppo.eval_every=2", "ppo.eval_episodes=2", "ppo.checkpoint_every=2", "ppo.value_warmup_iterations=1",
    "eval.episodes_per_task=3", "eval.max_episode_steps=120",
]


def tensors_digest(path: Path) -> dict[str, str]:
    from safetensors.numpy import load_file

    return {name: hashlib.sha256(array.tobytes()).hexdigest()[:16] for name, array in sorted(load_file(path).items())}


def dataset_digest(path: Path) -> str:
    import h5py

    digest = hashlib.sha256()
    with h5py.File(path, "r") as f:
        names = sorted(f["data"], key=lambda n: int(n.split("_")[1]))
        for name in names:
            group = f["data"][name]
            for key in ("obs/image", "obs/proprio", "obs/state", "actions", "rewards"):
                if key in group:
                    digest.update(group[key][()].tobytes())
    return digest.hexdigest()[:16]


def episodes_digest(path: Path) -> dict:
    result = json.loads(path.read_text())
    episodes = [[e["task"], e["config_index"], bool(e["success"]), int(e["steps"])] for e in result["episodes"]]
    return {"episodes": episodes, "success_rate": result["average"]["success_rate"]}


def fingerprint(run: Path) -> dict:
    out: dict = {"demos": dataset_digest(run / "demos.hdf5")}
    for name in ("sft/policy", "ppo/policy", "ppo/policy_ema", "ppo/policy_swa"):
        weights = run / name / "model.safetensors"
        if weights.is_file():
            out[name] = tensors_digest(weights)
    for path in sorted(run.glob("eval_*.json")):
        out[path.name] = episodes_digest(path)
    for path in sorted((run / "ppo" / "evals").glob("*.json")):
        out[f"ppo/evals/{path.name}"] = episodes_digest(path)
    return out


def compare(a: dict, b: dict) -> list[str]:
    problems = []
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            problems.append(f"{key}: only in {'the new' if key not in a else 'the reference'} fingerprint")
        elif a[key] != b[key]:
            problems.append(f"{key}: differs")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSON file for the fingerprint")
    parser.add_argument("--compare", help="a fingerprint JSON to compare with; exit 1 if they differ")
    parser.add_argument("--vlapt", default=str(Path(sys.executable).with_name("vlapt")), help="the vlapt command")
    parser.add_argument("--keep", help="keep the run in this directory instead of a temporary one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.keep or tmp) / "run"
        subprocess.run([args.vlapt, "pipeline", "--quiet", f"output_dir={run}", *OVERRIDES], check=True,
                       stdout=subprocess.DEVNULL)
        result = fingerprint(run)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"fingerprint of {len(result)} artifacts written to {args.output}")
    if args.compare:
        problems = compare(json.loads(Path(args.compare).read_text()), result)
        print("\n".join(problems) if problems else "identical to " + args.compare)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
