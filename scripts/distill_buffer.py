#!/usr/bin/env python
"""Behaviour-clone a post-training run's final self-BC buffer into its policy (an experiment's tool).

Loads the run's latest training checkpoint (policy and buffer: the policy's own fastest successes
and the demonstrations still kept), then takes ``--steps`` BC steps on buffer samples, the BC
term alone, and writes the policy to ``--output``. Evaluate it with ``vlapt eval``.

    scripts/distill_buffer.py runs/exp/grpo2m_mixed --output runs/exp/distill/seed0 --steps 2000
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vlapt.algorithms.checkpointing import latest_checkpoint, load_training_checkpoint
from vlapt.algorithms.sft import random_shift
from vlapt.data.buffer import DemoBuffer
from vlapt.data.format import read_episodes
from vlapt.envs import get_suite

import yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a vlapt train output_dir (ppo or grpo)")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--augment-shift", type=int, default=4)
    parser.add_argument("--own-only", action="store_true", help="leave the buffer's demonstrations out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = yaml.safe_load((args.run / "config.yaml").read_text())
    checkpoint = latest_checkpoint(args.run)
    if checkpoint is None:
        sys.exit(f"{args.run} has no training checkpoint")
    tasks = get_suite(config["suite"]).resolve_tasks(config["tasks"])
    demos = read_episodes(config["demos"], tasks, config["demos_per_task"] or None)
    policy, tensors, state = load_training_checkpoint(checkpoint)
    buffer = DemoBuffer(tasks, config["buffer_capacity"], policy.chunk_len)
    buffer.load_state(tensors, state["buffer"], demos)
    if args.own_only:
        for task in tasks:
            buffer.entries(task)[:] = [e for e in buffer.entries(task) if not e.is_demo]
    print(json.dumps({"checkpoint": str(checkpoint), **buffer.stats()}))
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    aug = torch.Generator().manual_seed(args.seed + 1)
    optimizer = torch.optim.AdamW(policy.param_groups()["actor"], lr=args.lr, weight_decay=1e-4)
    policy.train()
    losses = []
    start = time.perf_counter()
    for step in tqdm(range(args.steps), desc="distil", unit="step"):
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = buffer.sample(args.batch_size, rng)
        batch["image"] = random_shift(torch.from_numpy(batch["image"]), args.augment_shift, aug).numpy()
        loss = policy.bc_loss(batch, batch["actions"], batch["action_pad"]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss))
        if (step + 1) % 200 == 0:
            print(f"step {step + 1} loss {np.mean(losses[-200:]):.4f}", flush=True)
    policy.eval()
    policy.save(args.output, metadata={"trained_by": "scripts/distill_buffer.py", "run": str(args.run),
                                       "checkpoint": str(checkpoint), "args": {k: str(v) for k, v in vars(args).items()},
                                       "wall_time_s": time.perf_counter() - start})
    print(f"wrote {args.output} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
