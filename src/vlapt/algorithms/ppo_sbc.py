"""Action-chunked PPO with self behaviour cloning (arXiv 2509.25718), in one file.

Read top to bottom: the config (every hyperparameter), the BC-weight rule, buffer admission,
the losses, then the training loop (rollout -> buffer -> update -> checkpoint -> evaluate).

- One decision = one action chunk; one PPO ratio per chunk from the chunk's joint likelihood
  (the policy's own, `ChunkPolicy.evaluate`); GAE over decisions with the discount of the env
  steps each chunk actually executed (`vlapt.algorithms.returns.chunk_gae`).
- Self-BC: a per-task buffer seeded with the SFT demonstrations that admits the policy's own
  successes when shorter than its longest episode, and a BC loss on it (the policy's own,
  `ChunkPolicy.bc_loss`).
- The BC weight lambda is adapted online by dual ascent on a constraint (`BCWeight`).

The algorithm sees the policy only through `vlapt.interfaces.ChunkPolicy` and the envs only
through an `EnvPool`, so any policy family, env suite or pool backend trains here unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections import deque
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
from vlapt.algorithms.returns import chunk_gae
from vlapt.config import check_at_least, check_positive
from vlapt.data.buffer import DemoBuffer
from vlapt.data.format import RELABELLED, check_observed_as, env_args, read_episodes
from vlapt.envs import get_suite
from vlapt.envs.pools import check_backend, make_pool
from vlapt.interfaces import ChunkPolicy, Episode, SlotSpec
from vlapt.policies import load_policy, resolve_device, state_sha256
from vlapt.rollout.chunked import ChunkedRollout, RolloutBatch

log = logging.getLogger("vlapt.ppo")

@dataclasses.dataclass
class PPOConfig:
    # options since removed, with the value whose behaviour remains: runs made with it still resume
    RETIRED: ClassVar[dict[str, Any]] = {"ratio": "chunk"}
    algorithm: str = "ppo"  # `vlapt train algorithm=...` picks the algorithm module (vlapt.algorithms)
    # what to post-train, on what
    init_policy: str = "runs/sft/policy"  # the SFT checkpoint directory to start from
    demos: str = "datasets/mt10_scripted_fovy30.hdf5"  # seeds the self-BC buffer; rendered like the policy's images
    demos_per_task: int = 0  # 0: all the dataset has
    suite: str = "mt10"
    tasks: list[str] = dataclasses.field(default_factory=list)  # default: the suite's
    output_dir: str = "runs/ppo"
    # rollout
    envs_per_task: int = 2  # env slots per task: more decorrelates the batch, costs memory and env workers
    horizon: int = 8  # decisions per slot per iteration: with chunk length 10, 80 env steps
    num_workers: int = 2  # env worker processes: one per core leaves rendering no idle core
    env_backend: str = "local"  # where env slots run: local worker processes, or "ray" (vlapt.envs.pools)
    rollout_groups: int = 2  # slot groups stepped in turn, so inference for one overlaps env steps of another
    total_env_steps: int = 1_000_000
    # PPO
    gamma: float = 0.99  # per env step; a chunk of n steps discounts by gamma ** n, so faster successes earn more
    gae_lambda: float = 0.95  # per decision
    lr: float = 2e-5  # small: a joint ratio over a 10 x 4 chunk moves far for a small change of the mean
    epochs: int = 4  # passes over each iteration's rollout: reuse of costly samples, cut short by target_kl
    minibatch_size: int = 128  # chunks per gradient step
    clip_coef: float = 0.2  # PPO's clip on each ratio: how far one update may move a chunk's likelihood
    value_clip_coef: float = 0.2  # the same clip on the value update, so the critic tracks returns without jumps
    vf_coef: float = 0.5  # the value loss's weight beside the policy loss in the shared backward pass
    ent_coef: float = 0.0  # the Gaussian's learned std explores; BC keeps it calibrated
    max_grad_norm: float = 1.0  # clip the gradient's global norm: one extreme ratio cannot throw the policy far
    target_kl: float = 0.05  # stop the epochs once the approximate KL per chunk exceeds this (0: never)
    advantage_norm: str = "minibatch"  # "minibatch": zero mean, unit std per minibatch (CleanRL's); "none"
    init_log_std: float = -1.0  # reset the exploration std at the start (normalised action units); 0 keeps SFT's
    value_warmup_iterations: int = 2  # train only the critic first: SFT leaves the value head untrained
    # parts of the policy kept as SFT left them (ChunkPolicyBase.freeze), e.g. [vision]: a frozen image encoder's
    # features are computed once per image and reused across epochs and BC minibatches
    freeze: list[str] = dataclasses.field(default_factory=list)
    # self behaviour cloning
    bc_weight_rule: str = "lagrangian"  # "lagrangian" (BCWeight) | "fixed" (bc_coef) | "none" (plain chunked PPO)
    bc_coef: float = 0.1  # the fixed weight, and the lagrangian rule's starting weight
    bc_target_ratio: float = 1.5  # lagrangian: keep the buffer's BC loss within this ratio of its first value
    bc_lr: float = 0.1  # lagrangian: step size of the dual update on log lambda
    bc_coef_min: float = 1e-3  # bounds of the weight (either rule), so it can neither vanish nor swamp the PPO term
    bc_coef_max: float = 10.0
    bc_batch_size: int = 64  # buffer chunks per update step, beside each minibatch of rollout chunks
    buffer_capacity: int = 50  # successful episodes per task
    buffer_admission: str = "shorter"  # "shorter": the policy's successes enter when faster (keep_shortest); "none": demos only
    # > 0: also keep an exponential moving average of the policy's weights (decay per iteration) and write it as
    # policy_ema/ beside policy/: a smoother read-out of the same run that never feeds back into training (0: off)
    ema_decay: float = 0.95
    # > 0: also average the iterates made after this many env steps uniformly (stochastic weight averaging) and write
    # the average as policy_swa/; late iterates scatter around a basin, and their mean sits nearer its centre (0: none)
    swa_start_env_steps: int = 0
    # bookkeeping
    checkpoint_every: int = 5  # iterations
    keep_checkpoints: int = 2  # training checkpoints kept on disk, newest first (0: all, e.g. to average iterates later)
    eval_every: int = 25  # iterations; 0 disables the periodic held-out evaluation
    eval_episodes: int = 5  # per task, held-out configurations
    max_nonfinite_updates: int = 20  # abort (keeping the last good checkpoint) after this many skipped updates
    seed: int = 0
    threads: int = 2  # torch threads for the learner
    rollout_threads: int = 1  # torch threads for inference during rollouts: leave the cores to the env workers
    device: str = "cpu"  # the learner's device: cpu, cuda, cuda:N, mps, or auto (cuda where there is one)
    rollout_device: str = "cpu"  # where rollouts run the policy: cpu (next to the env workers) or learner
    precision: str = "fp32"  # the learner's forward passes: fp32, or bf16 (autocast; likelihoods stay float32)
    resume: bool = True

    def validate(self) -> "PPOConfig":
        get_suite(self.suite).resolve_tasks(self.tasks)
        check_backend(self.env_backend)
        for name, value, valid in (("bc_weight_rule", self.bc_weight_rule, ("lagrangian", "fixed", "none")),
                                   ("buffer_admission", self.buffer_admission, ("shorter", "none")),
                                   ("advantage_norm", self.advantage_norm, ("minibatch", "none")),
                                   ("rollout_device", self.rollout_device, ("cpu", "learner")),
                                   ("precision", self.precision, ("fp32", "bf16"))):
            if value not in valid:
                raise ValueError(f"{name} must be one of {', '.join(valid)}, got {value!r}")
        check_at_least(self, 1, "envs_per_task", "horizon", "rollout_groups", "threads", "rollout_threads", "epochs",
                       "minibatch_size", "total_env_steps", "buffer_capacity", "bc_batch_size", "checkpoint_every",
                       "eval_episodes")
        check_at_least(self, 0, "num_workers", "eval_every", "value_warmup_iterations", "keep_checkpoints")
        if self.eval_every % self.checkpoint_every:
            raise ValueError(f"eval_every ({self.eval_every}) must be a multiple of checkpoint_every ({self.checkpoint_every}): "
                             "an evaluation scores the checkpoint written at its iteration")
        check_positive(self, "lr", "clip_coef", "max_grad_norm", "bc_target_ratio")
        check_at_least(self, 0, "target_kl", "max_nonfinite_updates", "bc_lr", "value_clip_coef")
        resolve_device(self.device)
        if not 0 < self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ValueError(f"gamma must be in (0, 1] and gae_lambda in [0, 1], got {self.gamma} and {self.gae_lambda}")
        if not self.bc_coef_min <= self.bc_coef <= self.bc_coef_max or self.bc_coef_min <= 0:
            raise ValueError(f"bc_coef ({self.bc_coef}) must lie in [bc_coef_min, bc_coef_max] = "
                             f"[{self.bc_coef_min}, {self.bc_coef_max}] with bc_coef_min > 0 (bc_weight_rule=none disables BC)")
        check_average_options(self)
        return self


# -- the BC weight ---------------------------------------------------------------------------------------
class BCWeight:
    """The online-adapted weight lambda in L = L_PPO + lambda * L_BC.

    "lagrangian": self-BC as a constraint, not a fixed regulariser. PPO may change the policy
    freely as long as the buffer's BC loss stays below a target (``bc_target_ratio`` times its
    value at the start, offset by its size since an NLL can be negative); lambda is the
    constraint's multiplier, updated by dual ascent on log lambda:
    log lambda += bc_lr * (L_BC - target) / scale. When RL updates start to forget the
    successful behaviour in the buffer (the failure that makes PPO on sparse rewards collapse),
    lambda grows until the policy returns to it; while the policy keeps it, lambda decays and RL
    is free to find faster solutions, which then enter the buffer and become what the constraint
    protects. "fixed": lambda = bc_coef. "none": lambda = 0.
    """

    def __init__(self, rule: str, init: float, target_ratio: float, lr: float, lo: float, hi: float):
        self.rule, self.value, self.target_ratio, self.lr, self.lo, self.hi = rule, init, target_ratio, lr, lo, hi
        self.target: float | None = None
        self.scale = 1.0
        if rule == "none":
            self.value = 0.0

    def update(self, bc_loss: float) -> float:
        if self.rule != "lagrangian" or not math.isfinite(bc_loss):
            return self.value
        if self.target is None:  # calibrate on the first measurement
            self.scale = abs(bc_loss) + 1e-3
            self.target = bc_loss + (self.target_ratio - 1.0) * self.scale
            return self.value
        violation = (bc_loss - self.target) / self.scale
        log_value = np.clip(math.log(self.value) + self.lr * violation, math.log(self.lo), math.log(self.hi))
        self.value = float(np.clip(math.exp(log_value), self.lo, self.hi))  # a log-space step: a spike cannot overflow
        return self.value

    def state(self) -> dict:
        return {"value": self.value, "target": self.target, "scale": self.scale}

    def load(self, state: dict) -> None:
        self.value, self.target, self.scale = state["value"], state["target"], state["scale"]


# -- buffer admission ------------------------------------------------------------------------------------
def keep_shortest(buffer: DemoBuffer, episode: Episode, demo_key: int = -1) -> bool:
    """Store a success while its task has room, else in place of the longest stored episode if it is shorter.

    So the buffer drifts from the demonstrations' solutions towards the policy's own faster ones,
    and BC on it pulls the policy towards its best behaviour rather than back to the experts'.
    Seeding uses the same rule, so the buffer starts with the shortest demonstrations.
    """
    stored = buffer.entries(episode.task)
    if buffer.has_room(episode.task):
        buffer.put(episode, demo_key=demo_key)
        return True
    longest = max(range(len(stored)), key=lambda i: stored[i].length)
    if episode.steps < stored[longest].length:
        buffer.put(episode, replace=longest, demo_key=demo_key)
        return True
    return False


# -- the losses ------------------------------------------------------------------------------------------
def policy_surrogate(new_log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                     clip_coef: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate over one ratio per chunk ``(B,)``; returns (policy_loss, approx_kl, clipfrac)."""
    log_ratio = new_log_probs - old_log_probs
    ratio = log_ratio.exp()
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages)
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clipfrac = ((ratio - 1).abs() > clip_coef).float().mean()
    return -surrogate.mean(), approx_kl, clipfrac


def ppo_losses(policy: ChunkPolicy, observations: dict, actions: torch.Tensor, old_log_probs: torch.Tensor,
               old_values: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor, clip_coef: float,
               value_clip_coef: float):
    """Clipped surrogate over each chunk's ratio ``(B,)`` and the clipped value loss; returns (policy_loss,
    value_loss, entropy, approx_kl, clipfrac)."""
    new_log_probs, entropy, values = policy.evaluate(observations, actions)
    policy_loss, approx_kl, clipfrac = policy_surrogate(new_log_probs, old_log_probs, advantages, clip_coef)
    clipped_values = old_values + (values - old_values).clamp(-value_clip_coef, value_clip_coef)
    value_loss = 0.5 * torch.max((values - returns).square(), (clipped_values - returns).square()).mean()
    return policy_loss, value_loss, entropy.mean(), approx_kl, clipfrac


def make_optimizer(policy: ChunkPolicy, config: PPOConfig) -> torch.optim.Adam:
    groups = policy.param_groups()
    return torch.optim.Adam([{"params": groups["actor"], "lr": config.lr}, {"params": groups["critic"], "lr": config.lr}],
                            eps=1e-5)


# -- the loop --------------------------------------------------------------------------------------------
def train_ppo(config: PPOConfig, progress: bool = True, evaluator: Evaluator | None = None) -> Path:
    """Post-train ``config.init_policy``; returns the final policy's directory (``output_dir/policy``).

    ``evaluator`` (e.g. `vlapt.evaluation.checkpoint_evaluator`) scores the starting policy and
    every ``eval_every``-th checkpoint on held-out configurations; without one there are no
    periodic evaluations.
    """
    config.validate()
    suite = get_suite(config.suite)
    tasks = suite.resolve_tasks(config.tasks)
    if RELABELLED in env_args(config.demos):
        raise ValueError(f"demos {config.demos} is a `vlapt relabel` dataset: its actions are the expert's labels, not "
                         "trials that reached success; seed the self-BC buffer with a `vlapt collect` dataset")
    policy = load_policy(config.init_policy)  # checked before the run directory exists
    check_observed_as(config.demos, policy.observation_config(), suite, "init_policy")  # the self-BC buffer's images
    demos = read_episodes(config.demos, tasks, config.demos_per_task or None)
    # -- option `freeze` (ChunkPolicyBase.freeze, optional for a family): the policy records what it froze, so
    # its checkpoints, and a resumed run, stay frozen ---------------------------------------------------------
    if config.freeze:
        policy.freeze(config.freeze)
    # ---------------------------------------------------------------------------------------------------------
    with start_run(config, config.output_dir, config.threads, exempt=RESUMABLE) as run:
        return _post_train(config, run.directory, suite, tasks, demos, policy, progress, evaluator)


# options that may differ when a run is resumed: its budget, bookkeeping and resources, not what it learns
RESUMABLE = ("total_env_steps", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_episodes", "num_workers", "env_backend",
             "rollout_groups", "threads", "rollout_threads", "resume", "ema_decay", "device", "rollout_device", "precision")


def _post_train(config: PPOConfig, out_dir: Path, suite, tasks, demos: list[Episode], policy: ChunkPolicy,
                progress: bool, evaluator: Evaluator | None) -> Path:
    # -- policy, optimiser, buffer, state ----------------------------------------------------------------
    init_sha256 = state_sha256(policy)  # the starting policy's weights, recorded with the result (lineage)
    resume_from = latest_checkpoint(out_dir) if config.resume else None
    if resume_from is not None:
        policy = load_policy(resume_from)
    h = policy.chunk_len
    if resume_from is None and config.init_log_std != 0:
        policy.reset_exploration(config.init_log_std)
    device = resolve_device(config.device)
    policy.to(device)
    # the policy the rollouts act with: the learner's own, or a copy kept in sync on the rollout device
    actor = policy if config.rollout_device == "learner" or device.type == "cpu" else copy.deepcopy(policy).cpu()
    optimizer = make_optimizer(policy, config)
    buffer = DemoBuffer(tasks, config.buffer_capacity, h)
    for key, demo in enumerate(demos):
        keep_shortest(buffer, demo, demo_key=key)
    bc_weight = BCWeight(config.bc_weight_rule, config.bc_coef, config.bc_target_ratio, config.bc_lr,
                         config.bc_coef_min, config.bc_coef_max)
    average = WeightAverage.exponential(policy, config.ema_decay)
    tail_average = WeightAverage.uniform(policy, config.swa_start_env_steps)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    sample_gen = torch.Generator().manual_seed(config.seed)  # on the CPU whatever the devices: its state resumes anywhere
    iteration, env_steps, nonfinite = 0, 0, 0
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
        log.info("resumed from %s: iteration %d, %d env steps", resume_from, iteration, env_steps)

    env_config = suite.check_env_config(policy.observation_config())
    slots = [SlotSpec(suite, t, env_config, h) for t in tasks for _ in range(config.envs_per_task)]
    run_log = RunLog(out_dir, "ppo", config.total_env_steps, env_steps, history, evaluator, config.eval_every, progress)
    recent = deque(maxlen=max(20, 2 * len(slots)))  # (success, steps) of recent finished training episodes
    if resume_from is not None:
        recent.extend(tuple(e) for e in state.get("recent", []))
    run_log.begin(config.init_policy, resume_from, iteration, env_steps, finished=env_steps >= config.total_env_steps)
    with make_pool(slots, num_workers=config.num_workers, backend=config.env_backend) as pool:
        rollout = ChunkedRollout(pool, [s.task for s in slots], config.gamma, h, next_index, config.rollout_groups)
        rollout.lost_episodes = history[-1].get("lost_episodes", 0) if history else 0  # a count over the whole run
        while env_steps < config.total_env_steps:
            iteration += 1
            t0 = time.perf_counter()
            torch.set_num_threads(config.rollout_threads)
            batch, finished = rollout.collect(actor, config.horizon, sample_gen)
            torch.set_num_threads(config.threads)
            rollout_time = time.perf_counter() - t0
            steps_now = int(batch.steps.sum())
            env_steps += steps_now
            for episode in finished:
                recent.append((bool(episode.success), int(episode.steps)))
                if episode.success and config.buffer_admission == "shorter":
                    keep_shortest(buffer, episode)
            t1 = time.perf_counter()
            stats = _update(policy, optimizer, batch, buffer, bc_weight, config, rng,
                            critic_only=iteration <= config.value_warmup_iterations)
            if actor is not policy:
                actor.load_state_dict(policy.state_dict())
            nonfinite += stats.pop("nonfinite")
            if iteration > config.value_warmup_iterations:  # averaged from the first actor update on
                average.update(policy, env_steps)
                tail_average.update(policy, env_steps)
            if nonfinite > config.max_nonfinite_updates:
                raise FloatingPointError(
                    f"{nonfinite} updates had non-finite losses or gradients; stopped. The last good checkpoint is in "
                    f"{out_dir / 'checkpoints'}; lower lr or max_grad_norm and resume")
            succ = [steps for success, steps in recent if success]
            row = {
                "iteration": iteration, "env_steps": env_steps,
                "train_success": len(succ) / len(recent) if recent else float("nan"),
                "train_steps_to_success": float(np.mean(succ)) if succ else float("nan"),
                "bc_weight": bc_weight.value, **stats, **{f"buffer_{k}": v for k, v in buffer.stats().items()},
                "lost_episodes": rollout.lost_episodes,
                "rollout_env_steps_per_s": steps_now / rollout_time, "learn_time_s": time.perf_counter() - t1,
            }
            run_log.record(row, steps_now, it=iteration, succ=f"{row['train_success']:.2f}",
                           steps=f"{row['train_steps_to_success']:.0f}", lam=f"{bc_weight.value:.3f}",
                           kl=f"{stats['approx_kl']:.3f}")
            done = env_steps >= config.total_env_steps
            if iteration % config.checkpoint_every == 0 or done:
                checkpoint = _checkpoint(out_dir, iteration, env_steps, policy, optimizer, rng, sample_gen, buffer,
                                         bc_weight, rollout.next_index, history, (average, tail_average), init_sha256, recent,
                                         config.keep_checkpoints)
                run_log.after_checkpoint(checkpoint, iteration, env_steps, done)
    final = out_dir / "policy"
    metadata = {"trained_by": "vlapt train (chunked PPO + self-BC)", "env_steps": env_steps, "iterations": iteration,
                "init_policy": config.init_policy, "init_state_sha256": init_sha256}
    policy.save(final, metadata=metadata)
    average.save(out_dir / "policy_ema", {**metadata, "trained_by": f"{metadata['trained_by']}, weight average"})
    tail_average.save(out_dir / "policy_swa", {**metadata, "trained_by": f"{metadata['trained_by']}, uniform tail average"})
    run_log.close()
    return final


def _update(policy, optimizer, batch: RolloutBatch, buffer: DemoBuffer, bc_weight: BCWeight, config: PPOConfig,
            rng: np.random.Generator, critic_only: bool) -> dict:
    """PPO epochs over the batch, each minibatch also cloning a buffer minibatch; returns averaged statistics."""
    T, S = batch.rewards.shape
    advantages, returns = chunk_gae(batch.rewards, batch.values, batch.discounts, batch.dones, batch.last_values,
                                    config.gae_lambda)
    rows = np.flatnonzero(batch.valid.reshape(-1))  # decisions lost with an env worker are never learned from
    device = next(policy.parameters()).device

    def tensor(array: np.ndarray, *shape: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array).reshape(T * S, *shape)).to(device)

    actions = tensor(batch.actions, *batch.actions.shape[2:])
    old_logp, old_values, adv, ret = tensor(batch.log_probs), tensor(batch.values), tensor(advantages), tensor(returns)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    policy.eval()  # re-score with the network that sampled the chunks (no dropout), so the first ratios are 1
    sums = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "approx_kl": 0.0, "clipfrac": 0.0, "bc_loss": 0.0}
    updates, nonfinite = 0, 0
    for _ in range(config.epochs):
        order = rows[rng.permutation(len(rows))]
        epoch_kl = []
        starts = list(range(0, len(order), config.minibatch_size))
        if config.minibatch_size > 1 and len(starts) > 1 and len(order) - starts[-1] == 1:
            starts.pop()  # a lone last row joins the minibatch before it: one advantage cannot be normalised
        for start, end in zip(starts, starts[1:] + [len(order)]):
            idx = order[start:end]
            mb_adv = adv[idx]
            if config.advantage_norm == "minibatch" and len(idx) > 1:
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
            with autocast:
                pl, vl, ent, kl, cf = ppo_losses(policy, batch.observations(idx), actions[idx], old_logp[idx],
                                                 old_values[idx], mb_adv, ret[idx], config.clip_coef,
                                                 config.value_clip_coef)
                bc = torch.zeros((), device=device)
                if critic_only:
                    loss = config.vf_coef * vl
                else:
                    loss = pl + config.vf_coef * vl - config.ent_coef * ent
                    if bc_weight.value > 0:
                        demo = buffer.sample(config.bc_batch_size, rng)
                        bc = policy.bc_loss(demo, demo["actions"], demo["action_pad"]).loss
                        loss = loss + bc_weight.value * bc
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                nonfinite += 1
                log.warning("non-finite loss (%s); minibatch skipped", loss.item())
                continue
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
            if not torch.isfinite(grad_norm):
                nonfinite += 1
                optimizer.zero_grad(set_to_none=True)
                log.warning("non-finite gradient norm; minibatch skipped")
                continue
            optimizer.step()
            updates += 1
            for k, v in zip(sums, (pl, vl, ent, kl, cf, bc)):
                sums[k] += float(v.detach())
            epoch_kl.append(float(kl))
        if not critic_only and config.target_kl and epoch_kl and np.mean(epoch_kl) > config.target_kl:
            break
    stats = {k: (v / updates if updates else float("nan")) for k, v in sums.items()}
    if not critic_only and bc_weight.value > 0 and updates:  # only a measured BC loss moves the weight
        bc_weight.update(stats["bc_loss"])
    valid = batch.valid.reshape(-1)
    stats.update({"updates": updates, "nonfinite": nonfinite, "action_std": policy.exploration_std(),
                  "explained_variance": _explained_variance(batch.values.reshape(-1)[valid], returns.reshape(-1)[valid])})
    return stats


def _explained_variance(pred: np.ndarray, target: np.ndarray) -> float:
    var = np.var(target)
    return float("nan") if var == 0 else float(1 - np.var(target - pred) / var)


# -- checkpoints -----------------------------------------------------------------------------------------
def _checkpoint(out_dir, iteration, env_steps, policy, optimizer, rng, sample_gen, buffer, bc_weight, next_index, history,
                averages: tuple[WeightAverage, ...], init_sha256: str, recent: deque, keep: int) -> Path:
    tensors, meta = capture_state(optimizer, rng, {"sample": sample_gen})
    buffer_tensors, buffer_meta = buffer.state()
    tensors.update(buffer_tensors)
    for average in averages:
        tensors.update(average.state())
    meta.update({"buffer": buffer_meta, "bc_weight": bc_weight.state(), "iteration": iteration, "env_steps": env_steps,
                 "next_index": dict(next_index), "history": history, "init_state_sha256": init_sha256,
                 "recent": [list(e) for e in recent]})
    return save_training_checkpoint(out_dir, iteration, policy, tensors, meta, keep=keep)


def title(config: PPOConfig) -> str:
    """How results tables name a run: chunked PPO, and self-BC when it has one."""
    return "chunked PPO" + (" + self-BC" if config.bc_weight_rule != "none" else "")


ALGORITHM = Algorithm("ppo", PPOConfig, train_ppo, title=title, resumable=RESUMABLE)
