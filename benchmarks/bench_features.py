"""Frozen image encoders with cached features against trained ones: learner samples/s and env steps per hour.

For each variant one PPO iteration is replayed with the policy alone (random inputs, no envs):
the rollout's inference (``--slots`` env slots in two groups, ``--horizon`` decisions each, every
image new), then the update (``--epochs`` epochs of ``--minibatch`` decisions, each with a self-BC
minibatch of ``--bc-batch`` drawn from a buffer of ``--buffer-images`` images). The buffer's
features are computed before timing, as in a run whose buffer has been sampled for a while (its
steady state). Printed per variant: learner samples/s (PPO + BC samples per second of update;
per CPU-second too, which a shared machine distorts less),
inference time per iteration, the cache's hit rate, and an estimate of post-training env steps
per wall-hour::

    iteration = max(env time, inference time) + update time      (two slot groups overlap the two)
    env time  = slots * horizon * --chunk-steps / --env-steps-per-s

with the env's own rate given (by default the raw MT10 rate measured in
docs/experiments/rollout-throughput.md). Not a test: figures depend on the machine and its load.

    .venv/bin/python benchmarks/bench_features.py
    .venv/bin/python benchmarks/bench_features.py --variants conv,conv-frozen --slots 10 --horizon 4 --epochs 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from vlapt.policies.vla import Tokenizer, VLAPolicy, policy_config_for_size

INSTRUCTIONS = ["reach the goal", "push the puck to the goal", "open the drawer", "press the button from the top"]
VARIANTS = {
    # name: PolicyConfig overrides
    "conv": {},
    "conv-frozen": {"vision_trainable": "none"},
    "effnet-frozen": {"vision_backbone": "efficientnet_lite0", "image_keypoints": 0, "vision_trainable": "none"},
    "effnet-last2": {"vision_backbone": "efficientnet_lite0", "image_keypoints": 0, "vision_trainable": "last_2"},
    "effnet-finetune": {"vision_backbone": "efficientnet_lite0", "image_keypoints": 0, "vision_trainable": "all"},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="conv,conv-frozen,effnet-frozen,effnet-finetune",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--size", default="default", help="model size preset")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--chunk-len", type=int, default=10)
    parser.add_argument("--slots", type=int, default=20, help="env slots (MT10: 10 tasks x 2)")
    parser.add_argument("--horizon", type=int, default=8, help="decisions per slot per iteration")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--minibatch", type=int, default=128)
    parser.add_argument("--bc-batch", type=int, default=64)
    parser.add_argument("--buffer-images", type=int, default=512)
    parser.add_argument("--iters", type=int, default=1, help="timed iterations per variant (after one untimed)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the update")
    parser.add_argument("--rollout-threads", type=int, default=1, help="torch threads for rollout inference")
    parser.add_argument("--env-steps-per-s", type=float, default=1500.0, help="the envs' own rate (raw env steps/s)")
    parser.add_argument("--chunk-steps", type=float, default=10.0, help="env steps a decision executes on average")
    parser.add_argument("--effnet-weights", default="", help="vision_backbone_path for the EfficientNet variants "
                        "('': the converted ImageNet weights, 'random': none)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def observations(rng: np.random.Generator, n: int, size: int) -> dict:
    return {"image": rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8),
            "proprio": rng.normal(size=(n, 4)).astype(np.float32),
            "instruction": [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(n)]}


def rows(batch: dict, idx: np.ndarray) -> dict:
    return {"image": batch["image"][idx], "proprio": batch["proprio"][idx],
            "instruction": [batch["instruction"][i] for i in idx]}


def iteration(policy: VLAPolicy, args, rng: np.random.Generator, buffer: dict, optimizer) -> dict:
    group = args.slots // 2 or 1
    torch.set_num_threads(args.rollout_threads)
    seen, actions, log_probs = [], [], []
    start = time.perf_counter()
    for _ in range(args.horizon):
        for _ in range(2):
            obs = observations(rng, group, args.image_size)
            sample = policy.act(obs)
            seen.append(obs)
            actions.append(sample.actions)
            log_probs.append(torch.from_numpy(sample.log_prob))
    infer_s = time.perf_counter() - start
    batch = {"image": np.concatenate([o["image"] for o in seen]), "proprio": np.concatenate([o["proprio"] for o in seen]),
             "instruction": [t for o in seen for t in o["instruction"]]}
    actions, log_probs = torch.cat(actions), torch.cat(log_probs)
    torch.set_num_threads(args.threads)
    policy.train()
    samples = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.epochs):
        order = rng.permutation(len(actions))
        for first in range(0, len(order), args.minibatch):
            idx = order[first:first + args.minibatch]
            evaluation = policy.evaluate(rows(batch, idx), actions[idx])
            ratio = (evaluation.log_prob - log_probs[idx]).exp()
            loss = -(ratio * torch.randn(len(idx))).mean() + 0.5 * evaluation.value.square().mean()
            bc_idx = rng.integers(0, len(buffer["proprio"]), size=args.bc_batch)
            loss = loss + 0.1 * policy.bc_loss(rows(buffer, bc_idx), buffer["actions"][bc_idx], buffer["pad"][bc_idx]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            samples += len(idx) + args.bc_batch
    learn_s, learn_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    return {"infer_s": infer_s, "learn_s": learn_s, "learn_cpu_s": learn_cpu_s, "samples": samples}


def bench(name: str, args, vocab: list[str]) -> dict:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    overrides = dict(VARIANTS[name])
    if overrides.get("vision_backbone") == "efficientnet_lite0":
        overrides["vision_backbone_path"] = args.effnet_weights
    config = policy_config_for_size(args.size, image_size=args.image_size, chunk_len=args.chunk_len, vocab=vocab, **overrides)
    policy = VLAPolicy(config)
    groups = policy.param_groups()
    optimizer = torch.optim.Adam([{"params": groups["actor"]}, {"params": groups["critic"]}], lr=1e-5, eps=1e-5)
    buffer = observations(rng, args.buffer_images, args.image_size)
    buffer["actions"] = torch.randn(args.buffer_images, args.chunk_len, 4)
    buffer["pad"] = torch.zeros(args.buffer_images, args.chunk_len, dtype=torch.bool)
    torch.set_num_threads(args.threads)
    for first in range(0, args.buffer_images, 128):  # the buffer's steady state: its features already computed
        policy.value(rows(buffer, np.arange(first, min(first + 128, args.buffer_images))))
    iteration(policy, args, rng, buffer, optimizer)  # warm-up
    timed = [iteration(policy, args, rng, buffer, optimizer) for _ in range(args.iters)]
    infer_s = float(np.mean([t["infer_s"] for t in timed]))
    learn_s = float(np.mean([t["learn_s"] for t in timed]))
    learn_cpu_s = float(np.mean([t["learn_cpu_s"] for t in timed]))
    samples = timed[0]["samples"]
    env_steps = args.slots * args.horizon * args.chunk_steps
    env_s = env_steps / args.env_steps_per_s
    stats = policy.feature_cache_stats() or {}
    return {"variant": name, "trainable": policy.num_parameters(trainable_only=True), "params": policy.num_parameters(),
            "learner_sps": samples / learn_s, "learn_s": learn_s, "infer_s": infer_s, "cpu_sps": samples / learn_cpu_s,
            "hit_rate": stats.get("hit_rate", float("nan")) if policy.vision.cacheable() else float("nan"),
            "cache_mb": stats.get("megabytes", 0.0), "env_steps_per_hour": env_steps / (max(env_s, infer_s) + learn_s) * 3600}


def main() -> None:
    args = parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    vocab = Tokenizer.build(INSTRUCTIONS).vocab
    print(f"torch {torch.__version__}, threads {args.threads} (update) / {args.rollout_threads} (rollout), size {args.size}, "
          f"image {args.image_size}px, {args.slots} slots x {args.horizon} decisions, {args.epochs} epochs of "
          f"{args.minibatch} + BC {args.bc_batch}, buffer {args.buffer_images} images, env {args.env_steps_per_s:.0f} "
          f"steps/s x {args.chunk_steps:g} steps/decision\n", flush=True)
    results = []
    for name in names:
        start = time.perf_counter()
        results.append(bench(name, args, vocab))
        print(f"  done {name} ({time.perf_counter() - start:.0f} s)", flush=True)
    base = results[0]
    print()
    print("| variant | trainable / all params | learner samples/s | samples per CPU-s | update s/iter "
          "| rollout inference s/iter | cache hit rate | cache MB | env steps per wall-hour (est.) | vs first |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        hit = "-" if np.isnan(r["hit_rate"]) else f"{r['hit_rate']:.2f}"
        print(f"| {r['variant']} | {r['trainable'] / 1e6:.2f}M / {r['params'] / 1e6:.2f}M | {r['learner_sps']:.0f} | {r['cpu_sps']:.0f} "
              f"| {r['learn_s']:.2f} | {r['infer_s']:.2f} | {hit} | {r['cache_mb']:.0f} "
              f"| {r['env_steps_per_hour'] / 1e3:.0f}k | {r['env_steps_per_hour'] / base['env_steps_per_hour']:.2f}x |")


if __name__ == "__main__":
    main()
