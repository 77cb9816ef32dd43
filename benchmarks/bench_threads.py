"""How the learner's speed degrades when something else runs on the machine: torch threads and OpenMP waiting.

For each setting a fresh process times SFT steps of the default VLA (batch 64, 96 px) for
``--seconds``, alone and beside ``--hogs`` busy-looping processes (a stand-in for another job,
or for env workers that are busy at the same time). OpenMP's wait policy must be set before the
runtime starts, so every measurement is its own process. Not a test: figures depend on the
machine and what else runs on it.

    .venv/bin/python benchmarks/bench_threads.py --threads 1 2 --hogs 0 1 --seconds 15
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

MEASURE = r"""
import sys, time, numpy as np, torch
import vlapt
from vlapt.envs import get_suite
from vlapt.policies.vla import Tokenizer, VLAPolicy, policy_config_for_size
torch.set_num_threads(int(sys.argv[1]))
suite = get_suite("mt10")
config = policy_config_for_size("default", image_size=96, vocab=Tokenizer.build(suite.vocabulary()).vocab,
                                proprio_dim=4, action_dim=4)
torch.manual_seed(0)
policy = VLAPolicy(config)
rng = np.random.default_rng(0)
batch = {"image": rng.integers(0, 256, (64, 96, 96, 3), dtype=np.uint8), "proprio": rng.normal(size=(64, 4)).astype(np.float32),
         "instruction": [suite.instruction(suite.tasks[i % 10]) for i in range(64)]}
actions, pad = torch.randn(64, 10, 4), torch.zeros(64, 10, dtype=torch.bool)
optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
def step():
    loss = policy.bc_loss(batch, actions, pad).loss
    optimizer.zero_grad(); loss.backward(); optimizer.step()
step()
start, n = time.perf_counter(), 0
while time.perf_counter() - start < float(sys.argv[2]):
    step(); n += 1
print(n / (time.perf_counter() - start))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--hogs", type=int, nargs="+", default=[0, 1], help="busy processes beside the learner")
    parser.add_argument("--wait-policies", nargs="+", default=["ACTIVE", "PASSIVE"], help="OMP_WAIT_POLICY values")
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; SFT steps/s of the default VLA, batch 64, 96 px, {args.seconds:g} s each\n")
    print("| other busy processes | OMP_WAIT_POLICY | torch threads | SFT steps/s |")
    print("|---|---|---|---|")
    for hogs in args.hogs:
        for policy in args.wait_policies:
            for threads in args.threads:
                busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
                try:
                    out = subprocess.run([sys.executable, "-c", MEASURE, str(threads), str(args.seconds)], check=True,
                                         capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": policy})
                finally:
                    for process in busy:
                        process.kill()
                        process.wait()
                print(f"| {hogs} | {policy} | {threads} | {float(out.stdout.strip().splitlines()[-1]):.2f} |", flush=True)


if __name__ == "__main__":
    main()
