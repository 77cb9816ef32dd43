"""Env steps/s of the Ray pool backend against the local (subprocess) one, and against the number of env actors.

The same work on every pool: ``--slots`` env slots step random chunks for ``--decisions``
decisions each, in two slot groups kept in flight as the chunked rollout keeps them (while one
group's chunks run, the other's are submitted), and a slot whose episode ends is reset to its
next training configuration in the same call. No policy: this is the pool's own speed.

1. local vs ray at equal workers (``--workers``), both pools open and measured in turn:
   ``ratio`` = ray / local (target >= 0.9).
2. ray with 1, 2, 4 ... actors (``--actors``): where steps/s stops growing, the cores are saturated.

The Ray pools run on a local Ray started here as a pool starts one (workers at normal priority),
with ``max(--actors)`` logical CPUs, so every actor count gets one CPU per actor even past the
physical cores (the point is to see the saturation).
Startup (processes, actors, env construction) is not timed. Not a test: numbers depend on the
machine and its load; the script prints both with the figures.

    .venv/bin/python benchmarks/bench_ray_pool.py --slots 8 --decisions 30 --workers 2 --actors 1 2 4
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import ray

import vlapt  # noqa: F401  (sets the headless GL backend before mujoco is imported)
from vlapt.envs import get_suite
from vlapt.envs.pools import make_pool
from vlapt.envs.pools.ray import connect
from vlapt.interfaces import EnvConfig, SlotSpec


def steps_per_s(pool, slots: list[SlotSpec], decisions: int, chunk_len: int, seed: int) -> float:
    """Env steps/s of ``decisions`` random chunks per slot, two slot groups in flight."""
    rng = np.random.default_rng(seed)
    next_index = {i: len(slots) + i for i in range(len(slots))}
    pool.reset({i: {"split": "train", "index": i} for i in range(len(slots))})
    groups = pool.groups(2)

    def submit(group):
        reserved = {i: {"split": "train", "index": next_index[i]} for i in group}
        return pool.submit({i: rng.uniform(-1, 1, (chunk_len, 4)) for i in group}, reserved)

    steps, start = 0, time.perf_counter()
    pending = [submit(g) for g in groups]
    for t in range(decisions):
        for g, group in enumerate(groups):
            results = pool.wait(pending[g])
            steps += sum(int(r.info["steps"]) for r in results.values())
            for i, r in results.items():
                if r.terminated or r.truncated:
                    next_index[i] += len(slots)
            if t + 1 < decisions:
                pending[g] = submit(group)
    return steps / (time.perf_counter() - start)


def measure(backend: str, workers: int, slots, args) -> tuple[float, list[float]]:
    """Median steps/s of ``--repeats`` runs on one pool, and the runs."""
    with make_pool(slots, num_workers=workers, backend=backend) as pool:
        steps_per_s(pool, slots, 2, args.chunk_len, args.seed)  # warm-up: first renders, caches
        runs = [steps_per_s(pool, slots, args.decisions, args.chunk_len, args.seed + k) for k in range(args.repeats)]
    return statistics.median(runs), runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="mt10")
    parser.add_argument("--tasks", default="reach-v3,push-v3,pick-place-v3,door-open-v3",
                        help="comma-separated tasks; slots take them in turn")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--decisions", type=int, default=30, help="timed decisions per slot and measurement")
    parser.add_argument("--chunk-len", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--workers", type=int, default=2, help="workers of both backends in the comparison")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4], help="Ray actor counts to scale over")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per setting (the median is printed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    suite = get_suite(args.suite)
    tasks = suite.resolve_tasks(args.tasks.split(","))
    config = suite.check_env_config(EnvConfig(image_size=args.image_size))
    slots = [SlotSpec(suite, tasks[i % len(tasks)], config, args.chunk_len) for i in range(args.slots)]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, ray {ray.__version__}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{args.slots} slots ({', '.join(tasks)}), {args.image_size} px, chunks of {args.chunk_len}, "
          f"{args.decisions} decisions per slot, median of {args.repeats}")
    started = time.perf_counter()
    connect("local", num_cpus=max([*args.actors, args.workers]))  # as a pool starts a local Ray, with more CPUs

    # both pools open at once and measured in turn, so a change in the machine's load hits both alike
    with make_pool(slots, num_workers=args.workers, backend="local") as local_pool, \
            make_pool(slots, num_workers=args.workers, backend="ray") as ray_pool:
        runs: dict[str, list[float]] = {"local": [], "ray": []}
        for pool in (local_pool, ray_pool):
            steps_per_s(pool, slots, 2, args.chunk_len, args.seed)  # warm-up
        for k in range(args.repeats):
            for name, pool in (("local", local_pool), ("ray", ray_pool)):
                runs[name].append(steps_per_s(pool, slots, args.decisions, args.chunk_len, args.seed + k))
    local, on_ray = statistics.median(runs["local"]), statistics.median(runs["ray"])
    print(f"\nequal workers ({args.workers}): local {local:.0f} steps/s, ray {on_ray:.0f} steps/s, "
          f"ratio {on_ray / local:.2f}   (runs: local {', '.join(f'{x:.0f}' for x in runs['local'])}; "
          f"ray {', '.join(f'{x:.0f}' for x in runs['ray'])})")

    print(f"\nray actors  steps/s  per actor  vs {args.actors[0]} actor(s)  runs")
    base = None
    for n in args.actors:
        rate, measured = measure("ray", n, slots, args)
        base = base or rate
        print(f"{n:>10}  {rate:7.0f}  {rate / n:9.0f}  {rate / base:14.2f}x  {', '.join(f'{x:.0f}' for x in measured)}")
    ray.shutdown()
    print(f"\nwall time {time.perf_counter() - started:.0f} s; load average now "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
