"""Critic-free group policy optimisation for chunked VLA policies: GRPO, or RLOO baselines, in one file.

Read top to bottom: the config, the outcome reward, the group advantages, the loss, then the
training loop (groups -> buffer -> update -> checkpoint -> evaluate); the groups' episodes are
run by `vlapt.rollout.groups.run_groups`, as chunked PPO's decisions by `vlapt.rollout.chunked`.

- Groups: each iteration draws, per task, ``groups_per_task`` training configurations and runs
  ``group_size`` complete episodes on each (the same objects and goal, different sampled chunks).
- Outcome reward: 1 for a success, less the share of the episode limit it took, weighted by
  ``pace_weight``; 0 for a failure. Every success beats every failure, and within a group the
  faster successes beat the slower ones, so a group that always succeeds still teaches pace.
- Advantages, one per episode and shared by all its chunks: GRPO normalises rewards within the
  group (minus the group's mean, over its standard deviation); RLOO subtracts the mean of the
  *other* episodes of the group (a leave-one-out baseline, unbiased). A group whose rewards are
  all equal (all failures; all successes in the same number of steps) has zero advantages and
  contributes no policy gradient, only its self-BC samples.
- The clipped surrogate over the chunk's ratio (chunked PPO's, `ppo_sbc.policy_surrogate`), no value
  function, and optionally the self-BC term of chunked PPO (the same buffer, admission rule and
  adaptive weight, `vlapt.algorithms.ppo_sbc`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from vlapt.algorithms import Algorithm
from vlapt.algorithms.bookkeeping import Evaluator, RunLog, WeightAverage, check_average_options
from vlapt.algorithms.checkpointing import (
    capture_state, check_same_start, latest_checkpoint, load_training_checkpoint, restore_state, save_training_checkpoint,
    start_run,
)
from vlapt.algorithms.ppo_sbc import BCWeight, keep_shortest, policy_surrogate
from vlapt.config import check_at_least, check_positive
from vlapt.data.buffer import DemoBuffer
from vlapt.data.format import RELABELLED, check_observed_as, env_args, read_episodes
from vlapt.envs import get_suite
from vlapt.envs.pools import check_backend, make_pool
from vlapt.interfaces import ChunkPolicy, SlotSpec
from vlapt.policies import load_policy, resolve_device, state_sha256
from vlapt.rollout.groups import GroupBatch, run_groups

log = logging.getLogger("vlapt.grpo")


@dataclasses.dataclass
class GRPOConfig:
    # options since removed, with the value whose behaviour remains: runs made with it still resume
    RETIRED: ClassVar[dict[str, Any]] = {"ratio": "chunk"}
    algorithm: str = "grpo"
    # what to post-train, on what
    init_policy: str = "runs/sft/policy"
    demos: str = "datasets/mt10_scripted_fovy30.hdf5"  # seeds the self-BC buffer
    demos_per_task: int = 0  # 0: all the dataset has
    suite: str = "mt10"
    tasks: list[str] = dataclasses.field(default_factory=list)  # default: the suite's
    output_dir: str = "runs/grpo"
    # groups
    group_size: int = 8  # episodes per configuration: more gives steadier baselines, costs env steps per update
    groups_per_task: int = 1  # configurations per task per iteration
    max_episode_steps: int = 200  # training episodes end here (a failure); far below the 500 of evaluation, since
    # a failure's extra steps carry no signal for an outcome reward
    num_workers: int = 2  # env worker processes: one per core leaves rendering no idle core
    env_backend: str = "local"  # where env slots run: local worker processes, or "ray" (vlapt.envs.pools)
    total_env_steps: int = 1_000_000
    # the outcome reward and its advantages
    pace_weight: float = 0.5  # reward of a success = 1 - pace_weight * steps / max_episode_steps (a failure: 0)
    advantage: str = "grpo"  # "grpo": (r - group mean) / group std; "rloo": r - mean of the rest of the group
    # the update
    lr: float = 2e-5  # small: a joint ratio over a 10 x 4 chunk moves far for a small change of the mean
    epochs: int = 2  # passes over each iteration's episodes
    minibatch_size: int = 128  # chunks per gradient step
    clip_coef: float = 0.2  # PPO's clip on each ratio: how far one update may move a chunk's likelihood
    max_grad_norm: float = 1.0  # clip the gradient's global norm: one extreme ratio cannot throw the policy far
    target_kl: float = 0.05  # stop the epochs once the approximate KL per chunk exceeds this (0: never)
    max_nonfinite_updates: int = 20  # abort (keeping the last good checkpoint) after this many skipped updates
    init_log_std: float = -1.0  # reset the exploration std at the start; 0 keeps SFT's
    # self behaviour cloning, as in chunked PPO
    # "lagrangian": adapted to keep the buffer's BC loss near its target, from bc_coef; "fixed": bc_coef throughout;
    # "none": the group term alone
    bc_weight_rule: str = "lagrangian"
    bc_coef: float = 0.1  # the fixed weight, and the lagrangian rule's starting weight
    bc_target_ratio: float = 1.5  # lagrangian: keep the buffer's BC loss within this ratio of its first value
    bc_lr: float = 0.1  # lagrangian: step size of the dual update on log lambda
    bc_coef_min: float = 1e-3  # bounds of the weight (either rule), so it can neither vanish nor swamp the group term
    bc_coef_max: float = 10.0
    bc_batch_size: int = 64  # buffer chunks per update step, beside each minibatch of rollout chunks
    buffer_capacity: int = 50  # successful episodes per task
    buffer_admission: str = "shorter"  # "shorter": the policy's successes enter when faster; "none": demos only
    ema_decay: float = 0.95  # the weight average written as policy_ema/ (0: none)
    # > 0: also average the iterates made after this many env steps uniformly (stochastic weight averaging) and write
    # the average as policy_swa/; late iterates scatter around a basin, and their mean sits nearer its centre (0: none)
    swa_start_env_steps: int = 0
    # bookkeeping
    checkpoint_every: int = 2  # iterations (each is groups_per_task x group_size episodes per task)
    keep_checkpoints: int = 2  # training checkpoints kept on disk, newest first (0: all, e.g. to average iterates later)
    eval_every: int = 10  # iterations; 0 disables the periodic held-out evaluation
    eval_episodes: int = 5  # per task, held-out configurations
    seed: int = 0
    threads: int = 2  # torch threads for the learner
    rollout_threads: int = 1  # torch threads for inference during rollouts: leave the cores to the env workers
    device: str = "cpu"  # the learner's device: cpu, cuda, cuda:N, mps, or auto (cuda where there is one)
    precision: str = "fp32"  # the learner's forward passes: fp32, or bf16 (autocast)
    resume: bool = True

    def validate(self) -> "GRPOConfig":
        suite = get_suite(self.suite)
        suite.resolve_tasks(self.tasks)
        check_backend(self.env_backend)
        for name, value, valid in (("advantage", self.advantage, ("grpo", "rloo")),
                                   ("bc_weight_rule", self.bc_weight_rule, ("lagrangian", "fixed", "none")),
                                   ("buffer_admission", self.buffer_admission, ("shorter", "none")),
                                   ("precision", self.precision, ("fp32", "bf16"))):
            if value not in valid:
                raise ValueError(f"{name} must be one of {', '.join(valid)}, got {value!r}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (a group baseline needs company), got {self.group_size}")
        check_at_least(self, 1, "groups_per_task", "epochs", "minibatch_size", "total_env_steps", "buffer_capacity",
                       "bc_batch_size", "checkpoint_every", "threads", "rollout_threads", "eval_episodes")
        check_at_least(self, 0, "num_workers", "eval_every", "keep_checkpoints")
        if not 1 <= self.max_episode_steps <= suite.max_episode_steps:
            raise ValueError(f"max_episode_steps must be in [1, {suite.max_episode_steps}], got {self.max_episode_steps}")
        if not 0 <= self.pace_weight < 1:
            raise ValueError(f"pace_weight must be in [0, 1) so that every success beats every failure, got {self.pace_weight}")
        check_positive(self, "lr", "clip_coef", "max_grad_norm", "bc_target_ratio")
        check_at_least(self, 0, "target_kl", "max_nonfinite_updates", "bc_lr")
        if self.eval_every % self.checkpoint_every:
            raise ValueError(f"eval_every ({self.eval_every}) must be a multiple of checkpoint_every ({self.checkpoint_every}): "
                             "an evaluation scores the checkpoint written at its iteration")
        if not self.bc_coef_min <= self.bc_coef <= self.bc_coef_max or self.bc_coef_min <= 0:
            raise ValueError(f"bc_coef ({self.bc_coef}) must lie in [bc_coef_min, bc_coef_max] with bc_coef_min > 0")
        check_average_options(self)
        resolve_device(self.device)
        return self


# -- the outcome reward and the group advantages ------------------------------------------------------------
def outcome_reward(success: bool, steps: int, max_episode_steps: int, pace_weight: float) -> float:
    return 1.0 - pace_weight * steps / max_episode_steps if success else 0.0


def group_advantages(rewards: np.ndarray, kind: str, eps: float = 1e-6) -> np.ndarray:
    """Advantages of one group's episodes from their rewards ``(G,)``.

    "grpo": (r - mean) / (std + eps), std over the group (population); "rloo": r - mean of the
    other G - 1 rewards, i.e. G / (G - 1) * (r - mean). Equal rewards give zeros either way.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    centred = rewards - rewards.mean()
    if kind == "rloo":
        return (centred * len(rewards) / (len(rewards) - 1)).astype(np.float32)
    std = rewards.std()
    return (centred / (std + eps) if std > 0 else np.zeros_like(centred)).astype(np.float32)


# -- the loss ----------------------------------------------------------------------------------------------
def clipped_surrogate(policy: ChunkPolicy, observations: dict, actions: torch.Tensor, old_log_probs: torch.Tensor,
                      advantages: torch.Tensor, clip_coef: float):
    """The clipped policy-gradient surrogate over each chunk's ratio ``(B,)``, no value function; returns (loss,
    entropy, approx_kl, clipfrac)."""
    scored = policy.evaluate(observations, actions)
    loss, approx_kl, clipfrac = policy_surrogate(scored.log_prob, old_log_probs, advantages, clip_coef)
    return loss, scored.entropy.mean(), approx_kl, clipfrac


# -- the loop ----------------------------------------------------------------------------------------------
def train_grpo(config: GRPOConfig, progress: bool = True, evaluator: Evaluator | None = None) -> Path:
    """Post-train ``config.init_policy`` with group advantages; returns the final policy's directory."""
    config.validate()
    suite = get_suite(config.suite)
    tasks = suite.resolve_tasks(config.tasks)
    if RELABELLED in env_args(config.demos):
        raise ValueError(f"demos {config.demos} is a `vlapt relabel` dataset; seed the self-BC buffer with `vlapt collect`'s")
    policy = load_policy(config.init_policy)
    check_observed_as(config.demos, policy.observation_config(), suite, "init_policy")  # the self-BC buffer's images
    demos = read_episodes(config.demos, tasks, config.demos_per_task or None)
    with start_run(config, config.output_dir, config.threads, exempt=RESUMABLE) as run:
        return _post_train(config, run.directory, suite, tasks, demos, policy, progress, evaluator)


RESUMABLE = ("total_env_steps", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_episodes", "num_workers", "env_backend",
             "threads", "rollout_threads", "resume", "ema_decay", "device", "precision")


def _post_train(config, out_dir: Path, suite, tasks, demos, policy, progress, evaluator) -> Path:
    init_sha256 = state_sha256(policy)  # the starting policy's weights, recorded with the result (lineage)
    resume_from = latest_checkpoint(out_dir) if config.resume else None
    if resume_from is not None:
        policy = load_policy(resume_from)
    elif config.init_log_std != 0:
        policy.reset_exploration(config.init_log_std)
    device = resolve_device(config.device)
    policy.to(device)
    actor = policy if device.type == "cpu" else copy.deepcopy(policy).cpu()  # rollouts act on the CPU, near the envs
    optimizer = torch.optim.Adam(policy.param_groups()["actor"], lr=config.lr, eps=1e-5)  # no critic to train
    buffer = DemoBuffer(tasks, config.buffer_capacity, policy.chunk_len)
    for key, demo in enumerate(demos):
        keep_shortest(buffer, demo, demo_key=key)
    bc_weight = BCWeight(config.bc_weight_rule, config.bc_coef, config.bc_target_ratio, config.bc_lr,
                         config.bc_coef_min, config.bc_coef_max)
    average = WeightAverage.exponential(policy, config.ema_decay)
    tail_average = WeightAverage.uniform(policy, config.swa_start_env_steps)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    sample_gen = torch.Generator().manual_seed(config.seed)
    iteration, env_steps, nonfinite, lost_episodes = 0, 0, 0, 0
    next_index = {t: 0 for t in tasks}
    history: list[dict] = []
    if resume_from is not None:
        _, tensors, state = load_training_checkpoint(resume_from)
        check_same_start(state, init_sha256, config.init_policy, resume_from)
        restore_state(optimizer, rng, {"sample": sample_gen}, tensors, state)
        buffer.load_state(tensors, state["buffer"], demos)
        bc_weight.load(state["bc_weight"])
        average.load(tensors, resume_from)
        tail_average.load(tensors, resume_from)
        iteration, env_steps, next_index, history = state["iteration"], state["env_steps"], state["next_index"], state["history"]
        lost_episodes = history[-1]["lost_episodes"] if history else 0

    env_config = suite.check_env_config(dataclasses.replace(policy.observation_config(),
                                                            max_episode_steps=config.max_episode_steps))
    G = config.group_size
    slot_tasks = [t for t in tasks for _ in range(config.groups_per_task * G)]
    slots = [SlotSpec(suite, t, env_config, policy.chunk_len) for t in slot_tasks]
    run_log = RunLog(out_dir, "grpo", config.total_env_steps, env_steps, history, evaluator, config.eval_every, progress)
    run_log.begin(config.init_policy, resume_from, iteration, env_steps, finished=env_steps >= config.total_env_steps)
    with make_pool(slots, num_workers=config.num_workers, backend=config.env_backend) as pool:
        while env_steps < config.total_env_steps:
            iteration += 1
            configurations = []
            for task in tasks:  # each group's configuration: the task's next training configuration
                configurations += [next_index[task] + g for g in range(config.groups_per_task)]
                next_index[task] += config.groups_per_task
            t0 = time.perf_counter()
            torch.set_num_threads(config.rollout_threads)
            batch = run_groups(actor, pool, slot_tasks, configurations, G, sample_gen)
            torch.set_num_threads(config.threads)
            rollout_time = time.perf_counter() - t0
            steps_now = batch.env_steps
            env_steps += steps_now
            rewards = np.array([outcome_reward(e.success, e.steps, config.max_episode_steps, config.pace_weight)
                                for e in batch.episodes])
            advantages = np.zeros(len(rewards), np.float32)
            for members in batch.groups:
                if len(members) > 1:
                    advantages[members] = group_advantages(rewards[members], config.advantage)
            for episode in batch.episodes:
                if episode.success and config.buffer_admission == "shorter":
                    keep_shortest(buffer, episode)
            t1 = time.perf_counter()
            stats = _update(policy, optimizer, batch, advantages[batch.episode_of], buffer, bc_weight, config, rng)
            nonfinite += stats.pop("nonfinite")
            if nonfinite > config.max_nonfinite_updates:
                raise FloatingPointError(
                    f"{nonfinite} updates had non-finite losses or gradients; stopped. The last good checkpoint is in "
                    f"{out_dir / 'checkpoints'}; lower lr or max_grad_norm and resume")
            if actor is not policy:
                actor.load_state_dict(policy.state_dict())
            average.update(policy, env_steps)
            tail_average.update(policy, env_steps)
            grouped = [e for members in batch.groups for e in members]  # the episodes not lost with a worker
            finished = [batch.episodes[e] for e in grouped]
            successes = [e for e in finished if e.success]
            row = {
                "iteration": iteration, "env_steps": env_steps,
                "train_success": len(successes) / max(1, len(finished)),
                "lost_episodes": lost_episodes + len(batch.episodes) - len(finished),
                "train_steps_to_success": float(np.mean([e.steps for e in successes])) if successes else float("nan"),
                "mean_reward": float(rewards[grouped].mean()) if grouped else float("nan"),
                "informative_groups": sum(len(m) > 1 and float(np.ptp(rewards[m])) > 0 for m in batch.groups) / len(batch.groups),
                "bc_weight": bc_weight.value, **stats, **{f"buffer_{k}": v for k, v in buffer.stats().items()},
                "rollout_env_steps_per_s": steps_now / rollout_time, "learn_time_s": time.perf_counter() - t1,
            }
            lost_episodes = row["lost_episodes"]
            run_log.record(row, steps_now, it=iteration, succ=f"{row['train_success']:.2f}",
                           steps=f"{row['train_steps_to_success']:.0f}", kl=f"{stats['approx_kl']:.3f}")
            done = env_steps >= config.total_env_steps
            if iteration % config.checkpoint_every == 0 or done:
                tensors, meta = capture_state(optimizer, rng, {"sample": sample_gen})
                buffer_tensors, buffer_meta = buffer.state()
                tensors.update({**buffer_tensors, **average.state(), **tail_average.state()})
                meta.update({"buffer": buffer_meta, "bc_weight": bc_weight.state(), "iteration": iteration,
                             "env_steps": env_steps, "next_index": dict(next_index), "history": history,
                             "init_state_sha256": init_sha256})
                checkpoint = save_training_checkpoint(out_dir, iteration, policy, tensors, meta, keep=config.keep_checkpoints)
                run_log.after_checkpoint(checkpoint, iteration, env_steps, done)
    final = out_dir / "policy"
    metadata = {"trained_by": f"vlapt train algorithm=grpo ({config.advantage})", "env_steps": env_steps,
                "iterations": iteration, "init_policy": config.init_policy, "init_state_sha256": init_sha256}
    policy.save(final, metadata=metadata)
    average.save(out_dir / "policy_ema", {**metadata, "trained_by": f"{metadata['trained_by']}, weight average"})
    tail_average.save(out_dir / "policy_swa", {**metadata, "trained_by": f"{metadata['trained_by']}, uniform tail average"})
    run_log.close()
    return final


def _update(policy, optimizer, batch: GroupBatch, advantages: np.ndarray, buffer: DemoBuffer, bc_weight: BCWeight,
            config: GRPOConfig, rng: np.random.Generator) -> dict:
    """Epochs of clipped-surrogate minibatches over every decision, each with a self-BC minibatch."""
    device = next(policy.parameters()).device
    n = batch.actions.shape[0]
    actions = torch.from_numpy(batch.actions).to(device)
    old = torch.from_numpy(batch.log_probs).to(device)
    adv = torch.from_numpy(advantages).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    policy.eval()  # re-score with the network that sampled the chunks (no dropout), so the first ratios are 1
    sums = {"policy_loss": 0.0, "entropy": 0.0, "approx_kl": 0.0, "clipfrac": 0.0, "bc_loss": 0.0}
    updates, nonfinite = 0, 0
    for _ in range(config.epochs):
        order = rng.permutation(n)
        epoch_kl = []
        for start in range(0, n, config.minibatch_size):
            idx = order[start:start + config.minibatch_size]
            observations = {"image": batch.observations["image"][idx], "proprio": batch.observations["proprio"][idx],
                            "instruction": [batch.observations["instruction"][i] for i in idx]}
            with autocast:
                loss, entropy, kl, clipfrac = clipped_surrogate(policy, observations, actions[idx], old[idx], adv[idx],
                                                                config.clip_coef)
                bc = torch.zeros((), device=device)
                if bc_weight.value > 0:
                    demo = buffer.sample(config.bc_batch_size, rng)
                    bc = policy.bc_loss(demo, demo["actions"], demo["action_pad"]).loss
                total = loss + bc_weight.value * bc
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(total):
                nonfinite += 1
                log.warning("non-finite loss (%s); minibatch skipped", total.item())
                continue
            total.backward()
            if not torch.isfinite(torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)):
                nonfinite += 1
                optimizer.zero_grad(set_to_none=True)
                log.warning("non-finite gradient norm; minibatch skipped")
                continue
            optimizer.step()
            updates += 1
            for key, value in zip(sums, (loss, entropy, kl, clipfrac, bc)):
                sums[key] += float(value.detach())
            epoch_kl.append(float(kl))
        if config.target_kl and epoch_kl and np.mean(epoch_kl) > config.target_kl:
            break
    stats = {k: (v / updates if updates else float("nan")) for k, v in sums.items()}
    if bc_weight.value > 0 and updates:
        bc_weight.update(stats["bc_loss"])
    stats.update({"updates": updates, "nonfinite": nonfinite, "action_std": policy.exploration_std()})
    return stats


def title(config: GRPOConfig) -> str:
    """How results tables name a run: its baseline, and self-BC when it has one."""
    return config.advantage.upper() + (" + self-BC" if config.bc_weight_rule != "none" else "")


ALGORITHM = Algorithm("grpo", GRPOConfig, train_grpo, title=title, resumable=RESUMABLE)
