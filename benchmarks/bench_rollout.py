"""Rollout-loop throughput against the raw environment, and the PPO learner's samples/s.

Prints env steps/s of (a) the raw env pool stepping random chunks on the same workers and
image size (rendering once per chunk, as the policy sees it; the mean of a run before and
one after the loops) and (b) the chunked rollout loop with batched policy inference, in
lockstep (1 group) and overlapped (2 groups), and their ratio (target >= 0.8); then the
learner's PPO-update samples/s. Not a test: numbers depend on the machine and its load.

    .venv/bin/python benchmarks/bench_rollout.py --policy runs/sft_large/policy --decisions 30
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import vlapt  # noqa: F401
from vlapt.envs import MT10, EnvPool, SlotSpec
from vlapt.algorithms.ppo_sbc import ppo_losses, rollout_functions
from vlapt.evaluation.agents import env_config_for_policy
from vlapt.models import Tokenizer, VLAPolicy, load_pretrained, make_batch, policy_config_for_size
from vlapt.rollout.chunked import ChunkedRollout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", help="checkpoint dir (default: a fresh 'default'-size policy)")
    parser.add_argument("--envs-per-task", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--decisions", type=int, default=30, help="decisions per slot to time")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the learner")
    parser.add_argument("--rollout-threads", type=int, default=1,
                        help="torch threads for inference in the rollout loop (PPOConfig.rollout_threads)")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2],
                        help="rollout slot groups to time (1: lockstep; 2: inference overlaps env steps)")
    parser.add_argument("--minibatch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.policy:
        model = load_pretrained(args.policy)
    else:
        torch.manual_seed(0)
        model = VLAPolicy(policy_config_for_size("default", vocab=Tokenizer.build(["a"]).vocab))
    config = model.config
    tokenizer = Tokenizer(config.vocab)
    h = config.chunk_len
    env_config = env_config_for_policy(config)
    slots = [SlotSpec(t, env_config, h) for t in MT10 for _ in range(args.envs_per_task)]
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)

    act, value = rollout_functions(model, tokenizer, generator)

    with EnvPool(slots, num_workers=args.workers) as pool:

        def raw_steps_per_s() -> float:
            """Random chunks on the same slots, no policy: what the workers alone can do."""
            pool.reset({i: {"split": "train", "index": i} for i in range(len(slots))})
            steps, start = 0, time.perf_counter()
            for _ in range(args.decisions):
                results = pool.step({i: rng.uniform(-1, 1, (h, 4)) for i in range(len(slots))})
                steps += sum(r.info["steps"] for r in results.values())
                ended = [i for i, r in results.items() if r.terminated or r.truncated]
                if ended:
                    pool.reset({i: {"split": "train", "index": 1000 + i} for i in ended})
            return steps / (time.perf_counter() - start)

        raw_runs = [raw_steps_per_s()]
        loops = {}
        torch.set_num_threads(args.rollout_threads)
        for groups in args.groups:
            rollout = ChunkedRollout(pool, [s.task for s in slots], 0.99, h, groups=groups)
            start = time.perf_counter()
            batch, _ = rollout.collect(act, value, args.decisions)
            loops[groups] = batch.steps.sum() / (time.perf_counter() - start)
        torch.set_num_threads(args.threads)
        raw_runs.append(raw_steps_per_s())  # before and after: the machine's speed drifts
        raw = float(np.mean(raw_runs))

    n = batch.actions.shape[0] * batch.actions.shape[1]
    flat_images = batch.images.reshape(n, *batch.images.shape[2:])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    model.train()
    start, seen = time.perf_counter(), 0
    for k in range(0, n - args.minibatch + 1, args.minibatch):
        idx = np.arange(k, k + args.minibatch)
        mb = make_batch({"image": flat_images[idx], "proprio": batch.proprio.reshape(n, -1)[idx],
                         "instruction": "pick up the puck and place it at the goal"}, tokenizer, config)
        acts = torch.from_numpy(batch.actions.reshape(n, h, 4)[idx])
        zeros = torch.zeros(len(idx))
        pl, vl, *_ = ppo_losses(model, mb, acts, zeros, zeros, zeros + 1, zeros, 0.2, 0.2)
        optimizer.zero_grad()
        (pl + vl).backward()
        optimizer.step()
        seen += len(idx)
    learner = seen / (time.perf_counter() - start)

    print("| slots | image | chunk | rollout groups | raw env steps/s | rollout loop steps/s | ratio | learner samples/s |")
    print("|---|---|---|---|---|---|---|---|")
    for groups, loop in loops.items():
        print(f"| {len(slots)} | {config.image_size} | {h} | {groups} | {raw:.0f} | {loop:.0f} | {loop / raw:.2f} | {learner:.0f} |")


if __name__ == "__main__":
    main()
