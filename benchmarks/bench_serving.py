"""Cost of serving a policy: loopback latency of a served `predict` against in-process, and throughput by clients.

Starts `vlapt serve` in its own process on 127.0.0.1 (loopback only), then measures

- latency: p50 and p99 of ``predict`` on one observation, in-process and through one client;
- throughput: predictions per second with 1, 4 and 16 clients at once (each its own
  connection, one request in flight each), with their p50/p99 latency under that load.

Every level is bounded in count and in time. Without ``--policy`` a randomly initialised
policy of ``--size`` is served (speed does not depend on the weights).

    python benchmarks/bench_serving.py --size default --image-size 96 --requests 200 --clients 1,4,16 --seconds 5
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

import vlapt  # noqa: F401
from vlapt.envs import get_suite
from vlapt.interfaces import camera_views
from vlapt.policies import load_policy
from vlapt.rundir import machine_description, source_commit
from vlapt.serving import PolicyClient


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", help="checkpoint directory (default: a random policy of --size)")
    parser.add_argument("--size", default="default", help="model size for the random policy")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--requests", type=int, default=200, help="timed requests for each latency figure")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--seconds", type=float, default=5.0, help="time limit of each throughput level")
    parser.add_argument("--max-requests", type=int, default=2000, help="request limit per client per level")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in-process and in the server")
    return parser.parse_args()


def random_policy(size: str, image_size: int, where: Path) -> Path:
    from vlapt.policies.vla import Tokenizer, VLAPolicy, policy_config_for_size

    torch.manual_seed(0)
    vocab = Tokenizer.build(get_suite("mt10").vocabulary()).vocab
    return VLAPolicy(policy_config_for_size(size, image_size=image_size, vocab=vocab)).save(where / "policy")


def observation(image_size: int, seed: int, views: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (image_size, views * image_size, 3), dtype=np.uint8),
            "proprio": rng.normal(size=4).astype(np.float32),
            "instruction": get_suite("mt10").instruction("reach-v3")}


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def timed(call, count: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        call()
    out = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def start_server(policy: Path, threads: int) -> tuple[subprocess.Popen, str]:
    src = Path(vlapt.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen([sys.executable, "-m", "vlapt.cli.main", "serve", str(policy), f"threads={threads}",
                                "--host", "127.0.0.1", "--port", "0", "--quiet"],
                               stdout=subprocess.PIPE, text=True, env=env)
    line = process.stdout.readline()
    found = re.search(r"at (ws://127\.0\.0\.1:\d+)", line)
    if not found:
        process.kill()
        raise RuntimeError(f"vlapt serve did not start: {line!r}")
    return process, found.group(1)


def throughput(url: str, clients: int, image_size: int, seconds: float, max_requests: int, views: int = 1) -> dict:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    connections = [PolicyClient(url) for _ in range(clients)]
    for client in connections:
        client.predict(observation(image_size, 0, views))  # warm
    barrier = threading.Barrier(clients + 1)
    deadline = [0.0]

    def work(k: int) -> None:
        obs = observation(image_size, k, views)
        barrier.wait()
        while time.perf_counter() < deadline[0] and len(latencies[k]) < max_requests:
            start = time.perf_counter()
            connections[k].predict(obs)
            latencies[k].append(time.perf_counter() - start)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    deadline[0] = time.perf_counter() + seconds
    start = time.perf_counter()
    barrier.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    for client in connections:
        client.close()
    every = [s for per_client in latencies for s in per_client]
    p50, p99 = percentiles(every)
    return {"clients": clients, "requests": len(every), "wall_s": wall, "per_s": len(every) / wall, "p50": p50, "p99": p99}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.policy) if args.policy else random_policy(args.size, args.image_size, Path(tmp))
        policy = load_policy(path)
        seen = policy.observation_config()
        image_size, views = seen.image_size, len(camera_views(seen.camera))
        obs = observation(image_size, 0, views)
        local = percentiles(timed(lambda: policy.predict(obs), args.requests))
        process, url = start_server(path, args.threads)
        try:
            with PolicyClient(url) as client:
                np.testing.assert_array_equal(client.predict(obs), policy.predict(obs))
                remote = percentiles(timed(lambda: client.predict(obs), args.requests))
            levels = [throughput(url, int(n), image_size, args.seconds, args.max_requests, views)
                      for n in args.clients.split(",")]
        finally:
            process.terminate()
            process.wait(timeout=30)

    print(f"command: python {' '.join(sys.argv)}")
    print(f"commit: {source_commit()}; machine: {machine_description()}; torch threads: {args.threads}")
    print(f"policy: {args.policy or f'random {args.size}'}, {image_size} px images ({seen.camera or 'default'} camera), chunk {policy.chunk_len}x{policy.action_dim}")
    print()
    print("| predict, one observation | p50 (ms) | p99 (ms) |")
    print("|---|---|---|")
    print(f"| in-process | {local[0]:.2f} | {local[1]:.2f} |")
    print(f"| served (loopback websocket) | {remote[0]:.2f} | {remote[1]:.2f} |")
    print(f"| served minus in-process | {remote[0] - local[0]:.2f} | {remote[1] - local[1]:.2f} |")
    print()
    print("| concurrent clients | requests | predictions/s | p50 latency (ms) | p99 latency (ms) |")
    print("|---|---|---|---|---|")
    for level in levels:
        print(f"| {level['clients']} | {level['requests']} | {level['per_s']:.1f} | {level['p50']:.2f} | {level['p99']:.2f} |")


if __name__ == "__main__":
    main()
