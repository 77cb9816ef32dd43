"""Rollout-loop throughput against the raw environment, and the PPO learner's samples/s.

For each rollout-group setting (1: lockstep; 2: inference for one group overlaps the env
steps of the other) the chunked rollout loop with batched policy inference runs
``--decisions`` decisions per slot, and every pool command it sends (the resets and the
chunks it executed) is recorded. The **raw environment** then replays exactly that work on
the same workers, with two commands in flight so the workers never wait: the same
configurations, the same chunks, hence the same trajectories, successes and resets (MuJoCo
is deterministic), and no policy. ``ratio`` is loop / replay: the share of the workers' own
speed the loop keeps once a policy is choosing the actions (target >= 0.8).

Random chunks, the older baseline, are also printed: they flail near the start pose, touch
no object and almost never end an episode (no resets), so they are a cheaper workload than
a policy's and their steps/s overstates what the env does under a policy.
Not a test: numbers depend on the machine and its load.

    .venv/bin/python benchmarks/bench_rollout.py --policy runs/pipeline/sft/policy --decisions 60
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import vlapt  # noqa: F401
from vlapt.algorithms.ppo_sbc import ppo_losses
from vlapt.envs import get_suite
from vlapt.envs.pools import make_pool
from vlapt.interfaces import EnvPool, SlotSpec
from vlapt.policies import load_policy
from vlapt.policies.vla import Tokenizer, VLAPolicy, policy_config_for_size
from vlapt.rollout.chunked import ChunkedRollout


class RecordingPool:
    """Passes a rollout's pool commands through and records them, so the same work can be replayed."""

    def __init__(self, pool: EnvPool):
        self.pool = pool
        self.resets: list[dict] = []
        self.steps: list[tuple[dict, dict]] = []

    def groups(self, count: int) -> list[list[int]]:
        return self.pool.groups(count)

    def reset(self, requests: dict) -> dict:
        self.resets.append(dict(requests))
        return self.pool.reset(requests)

    def submit(self, actions: dict, reset_options: dict | None = None):
        self.steps.append(({i: np.array(a) for i, a in actions.items()}, dict(reset_options or {})))
        return self.pool.submit(actions, reset_options)

    def wait(self, ticket):
        return self.pool.wait(ticket)

    def replay(self) -> tuple[float, int]:
        """The recorded work again, without a policy: (env steps/s, env steps)."""
        for requests in self.resets:
            self.pool.reset(requests)
        steps, in_flight = 0, []
        start = time.perf_counter()
        for actions, reset_options in self.steps:
            in_flight.append(self.pool.submit(actions, reset_options))
            if len(in_flight) > 2:
                steps += sum(r.info["steps"] for r in self.pool.wait(in_flight.pop(0)).values())
        for ticket in in_flight:
            steps += sum(r.info["steps"] for r in self.pool.wait(ticket).values())
        return steps / (time.perf_counter() - start), steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", help="checkpoint dir (default: a fresh 'default'-size policy)")
    parser.add_argument("--envs-per-task", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--decisions", type=int, default=60, help="decisions per slot to time")
    parser.add_argument("--repeats", type=int, default=2, help="loop + replay measurements per group setting")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the learner")
    parser.add_argument("--rollout-threads", type=int, default=1,
                        help="torch threads for inference in the rollout loop (PPOConfig.rollout_threads)")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2],
                        help="rollout slot groups to time (1: lockstep; 2: inference overlaps env steps)")
    parser.add_argument("--minibatch", type=int, default=128)
    parser.add_argument("--backend", default="local", help="env pool backend (vlapt.envs.pools): local, ray, ...")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    suite = get_suite("mt10")
    if args.policy:
        model = load_policy(args.policy)
    else:
        torch.manual_seed(0)
        model = VLAPolicy(policy_config_for_size("default", vocab=Tokenizer.build(suite.vocabulary()).vocab,
                                                 proprio_dim=4, action_dim=4))
    config = model.config
    h = config.chunk_len
    env_config = suite.check_env_config(model.observation_config())
    slots = [SlotSpec(suite, t, env_config, h) for t in suite.tasks for _ in range(args.envs_per_task)]
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)

    with make_pool(slots, num_workers=args.workers, backend=args.backend) as pool:

        def raw_steps_per_s() -> float:
            """Random chunks on the same slots, no policy: what the workers alone can do."""
            pool.reset({i: {"split": "train", "index": i} for i in range(len(slots))})
            steps, start = 0, time.perf_counter()
            for _ in range(args.decisions):
                results = pool.wait(pool.submit({i: rng.uniform(-1, 1, (h, 4)) for i in range(len(slots))}))
                steps += sum(r.info["steps"] for r in results.values())
                ended = [i for i, r in results.items() if r.terminated or r.truncated]
                if ended:
                    pool.reset({i: {"split": "train", "index": 1000 + i} for i in ended})
            return steps / (time.perf_counter() - start)

        raw_runs = [raw_steps_per_s()]
        rows = []
        for groups in args.groups:
            for _ in range(args.repeats):
                recorder = RecordingPool(pool)
                torch.set_num_threads(args.rollout_threads)
                rollout = ChunkedRollout(recorder, [s.task for s in slots], 0.99, h, groups=groups)
                start = time.perf_counter()
                batch, finished = rollout.collect(model, args.decisions, generator)
                loop = batch.steps.sum() / (time.perf_counter() - start)
                torch.set_num_threads(args.threads)
                replay, replay_steps = recorder.replay()
                if replay_steps != batch.steps.sum():
                    print(f"warning: the replay executed {replay_steps} env steps, the loop {batch.steps.sum()}")
                rows.append((groups, loop, replay, len(finished)))
        raw_runs.append(raw_steps_per_s())  # before and after: the machine's speed drifts
        raw = float(np.mean(raw_runs))

    n = batch.actions.shape[0] * batch.actions.shape[1]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    model.train()
    start, seen = time.perf_counter(), 0
    for k in range(0, n - args.minibatch + 1, args.minibatch):
        idx = np.arange(k, k + args.minibatch)
        mb = batch.observations(idx)
        acts = torch.from_numpy(batch.actions.reshape(n, h, 4)[idx])
        zeros = torch.zeros(len(idx))
        pl, vl, *_ = ppo_losses(model, mb, acts, zeros, zeros, zeros + 1, zeros, 0.2, 0.2)
        optimizer.zero_grad()
        (pl + vl).backward()
        optimizer.step()
        seen += len(idx)
    learner = seen / (time.perf_counter() - start)

    print("| slots | image | chunk | rollout groups | episodes ended | rollout loop steps/s | raw env, same work replayed | ratio | raw env, random chunks | loop / random | learner samples/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for groups, loop, replay, ended in rows:
        print(f"| {len(slots)} | {config.image_size} | {h} | {groups} | {ended} | {loop:.0f} | {replay:.0f} | {loop / replay:.2f} "
              f"| {raw:.0f} | {loop / raw:.2f} | {learner:.0f} |")


if __name__ == "__main__":
    main()
