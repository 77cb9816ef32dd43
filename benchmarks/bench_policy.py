"""Speed of the VLA policy per named size: inference latency, batched throughput, training rate.

Answers "which size can I afford on this machine?": the single-observation
latency bounds the control rate of a real-time rollout, batched throughput
bounds vectorised rollout collection, and training samples/s bounds SFT/PPO
updates. Inputs are random; only speed is measured.

    python benchmarks/bench_policy.py --sizes tiny,default,large --batch 64 --iters 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np
import torch

from vlapt.policies.vla import MODEL_SIZES, Tokenizer, VLAPolicy, policy_config_for_size

INSTRUCTIONS = [
    "pick up the puck and place it at the goal",
    "open the drawer",
    "press the button from the top",
    "push the puck to the goal",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,default,large", help="comma-separated names from MODEL_SIZES")
    parser.add_argument("--batch", type=int, default=64, help="batch size for batched inference and training")
    parser.add_argument("--iters", type=int, default=5,
                        help="timed iterations for batched inference and training (single-observation "
                             "latency uses 4x as many, it is cheap)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations before each measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--precision", choices=["fp32", "bf16"], nargs="+", default=["fp32"],
                        help="the training step's forward precision (bf16: autocast, as precision=bf16 in sft/train)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def median_seconds(step: Callable[[], object], iters: int, warmup: int, device: torch.device) -> float:
    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        run()
    return statistics.median(run() for _ in range(max(iters, 1)))


def random_observations(batch: int, image_size: int, proprio_dim: int, rng: np.random.Generator) -> dict:
    return {
        "image": rng.integers(0, 256, size=(batch, image_size, image_size, 3), dtype=np.uint8),
        "proprio": rng.normal(size=(batch, proprio_dim)).astype(np.float32),
        "instruction": [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch)],
    }


def bench_size(size: str, args: argparse.Namespace, tokenizer: Tokenizer, device: torch.device, precision: str) -> dict:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    config = policy_config_for_size(size, image_size=args.image_size, vocab=tokenizer.vocab)
    model = VLAPolicy(config).to(device)
    policy = model

    batch_obs = random_observations(args.batch, config.image_size, config.proprio_dim, rng)
    single_obs = {key: value[0] for key, value in batch_obs.items()}
    latency = median_seconds(lambda: policy.predict(single_obs), 4 * args.iters, 2 * args.warmup, device)
    batched = median_seconds(lambda: policy.predict_batch(batch_obs), args.iters, args.warmup, device)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    actions = torch.randn(args.batch, config.chunk_len, config.action_dim, device=device)
    returns = torch.randn(args.batch, device=device)

    def train_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            log_prob, _, value = model.evaluate(batch_obs, actions)
            loss = -log_prob.mean() + 0.5 * (value - returns).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    train = median_seconds(train_step, args.iters, args.warmup, device)
    return {
        "size": size,
        "precision": precision,
        "params": model.num_parameters(),
        "latency_ms": 1000 * latency,
        "infer_sps": args.batch / batched,
        "train_sps": args.batch / train,
    }


def main() -> None:
    args = parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in MODEL_SIZES]
    if unknown:
        raise SystemExit(f"unknown size(s) {unknown}; choose from {sorted(MODEL_SIZES)}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tokenizer = Tokenizer.build(INSTRUCTIONS)

    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"image {args.image_size}x{args.image_size}, batch {args.batch}, iters {args.iters}\n"
    )
    rows = []
    for size in sizes:
        for precision in args.precision:
            rows.append(bench_size(size, args, tokenizer, device, precision))
            print(f"  done {size} {precision}", flush=True)

    print()
    print(f"| size | training precision | params | 1-obs latency (ms/chunk) | batched inference (obs/s, B={args.batch}) "
          f"| train fwd+bwd+AdamW (samples/s, B={args.batch}) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']} | {r['precision']} | {r['params'] / 1e6:.2f}M | {r['latency_ms']:.1f} | {r['infer_sps']:.0f} "
              f"| {r['train_sps']:.0f} |")


if __name__ == "__main__":
    main()
