"""Action-chunked PPO with self behaviour cloning (arXiv 2509.25718), in one file.

Read top to bottom: the config (every hyperparameter), the BC-weight rule, the losses, then
the training loop (rollout -> buffer -> update -> checkpoint -> evaluate).

- One decision = one action chunk; one PPO ratio per chunk from its joint Gaussian
  likelihood (sum over the h x action_dim entries); GAE over decisions with the discount of
  the env steps each chunk actually executed (vlapt.rollout.chunked).
- Self-BC: a per-task buffer seeded with the SFT demonstrations that admits the policy's
  own successes when shorter than its longest episode, or (``buffer_admission=advantage``)
  when better than the critic expected, or (``pace``) when faster relative to the scripted
  expert on the same configuration (vlapt.data.demo_buffer), and a BC loss (chunk NLL) on it.
- The BC weight lambda is adapted online by dual ascent on a constraint (see `BCWeight`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vlapt.algorithms.checkpointing import (
    capture_state,
    latest_checkpoint,
    load_training_checkpoint,
    restore_state,
    save_training_checkpoint,
    start_run,
)
from vlapt.algorithms.sft import chunk_bc_loss
from vlapt.config import atomic_write_json, atomic_write_text
from vlapt.data.demo_buffer import ADMISSION_RULES, DemoBuffer
from vlapt.data.format import RELABELLED, env_args, read_episodes
from vlapt.envs.tasks import instruction_for, resolve_tasks
from vlapt.envs.vector import EnvPool, SlotSpec
from vlapt.evaluation.agents import env_config_for_policy, stack_observations
from vlapt.evaluation.metrics import format_table
from vlapt.evaluation.protocol import EvalConfig
from vlapt.models import Tokenizer, VLAPolicy, load_pretrained, make_batch, save_pretrained
from vlapt.models.checkpoint import load_pretrained_config
from vlapt.rollout.chunked import ChunkedRollout, RolloutBatch, chunk_gae

log = logging.getLogger("vlapt.ppo")


@dataclasses.dataclass
class PPOConfig:
    # what to post-train, on what
    init_policy: str = "runs/sft/policy"  # SFT checkpoint directory
    demos: str = "datasets/mt10_scripted_fovy30.hdf5"  # seeds the self-BC buffer; rendered like the policy's images
    demos_per_task: int = 0  # 0: all the dataset has
    suite: str = "mt10"
    tasks: list[str] = dataclasses.field(default_factory=list)
    output_dir: str = "runs/ppo"
    reward: str = "sparse"  # "sparse" (1 at first success) or "dense" (MetaWorld's shaped reward)
    # > 0: add potential-based shaping c * (gamma^n phi(s') - phi(s)) per chunk, phi = MetaWorld's dense reward / 10
    # (sparse reward only): a progress signal in failed episodes that leaves the sparse task's optimal policies as they are
    shaping_coef: float = 0.0
    # rollout
    envs_per_task: int = 2
    horizon: int = 8  # decisions per env slot per iteration: 80 env steps with the default chunk length 10 (use 80 / h)
    num_workers: int = 2
    rollout_groups: int = 2  # slot groups stepped in turn, so inference for one overlaps env steps of another; 1: lockstep
    # > 0: receding horizon. Execute only the first execute_steps actions of each chunk, then decide again; the PPO
    # ratio and entropy score those actions only, and self-collected BC chunks hold only them (the rest is padding).
    # The periodic evaluations execute the same way; evaluate the result with `vlapt eval ... execute_steps=k`.
    # Keep horizon * execute_steps near 80 env steps per slot and iteration (e.g. 5 -> horizon=16). 0: the whole chunk
    execute_steps: int = 0
    total_env_steps: int = 1_000_000  # ~54 min on 2 cores; MT10 0.892 at 500k, 0.904 at 1M over three seeds (docs/results.md)
    # PPO
    gamma: float = 0.99  # per env step; a chunk of n steps discounts by gamma ** n
    gae_lambda: float = 0.95  # per decision
    lr: float = 2e-5  # 1e-4 moved the policy too far per update (approx KL > 1 per chunk) and tasks collapsed
    value_lr: float = 0.0  # value head's learning rate; 0: lr. 1e-3 explains ~0.8 of the return variance at once (lr: ~0.05
    # for 150k env steps), yet MT10 gave 0.864 / 71.1 and 0.898 / 72.3 for seeds 0, 1 against 0.928 / 72.6 and 0.872 / 73.7
    epochs: int = 4
    minibatch_size: int = 128
    clip_coef: float = 0.2
    value_clip_coef: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    max_grad_norm: float = 1.0
    target_kl: float = 0.05  # stop the epoch loop once approx KL per chunk exceeds this (0: never)
    normalize_advantages: bool = True
    # "minibatch": one mean/std per minibatch (CleanRL's); "task": each task's advantages centred on their batch
    # mean and divided by a running std of their own (TaskAdvantageScale), so every task weighs the same in the
    # surrogate whatever the size of its advantages (with sparse reward, the tasks that fail most have the smallest)
    advantage_norm: str = "minibatch"
    advantage_norm_decay: float = 0.9  # "task": EMA decay per iteration of each task's advantage variance
    init_log_std: float = -1.0  # reset the exploration std (normalised action units) at the start; 0 keeps SFT's
    # != 0: add correlated chunk noise (PolicyConfig.correlated_noise) with this initial log-std at the start: a
    # draw per chunk and action dimension shared by the chunk's steps, so exploration varies whole motions
    correlated_noise_log_std: float = 0.0
    value_warmup_iterations: int = 2  # train only the critic first: SFT leaves the value head untrained
    # self behaviour cloning
    bc_weight_rule: str = "lagrangian"  # "lagrangian" | "fixed" | "none"
    bc_coef: float = 0.1  # fixed weight, and the lagrangian rule's starting weight
    bc_target_ratio: float = 1.5  # lagrangian: keep buffer BC loss <= ratio x its reference level
    # lagrangian: what the BC loss is held to. "initial": its first measured value (on the SFT demos);
    # "reference": the SFT policy's loss on the same minibatches (its means, the current policy's std),
    # which rises with the buffer as it fills with the policy's own noisy-action successes (one extra
    # no-grad forward per BC minibatch).
    bc_target: str = "initial"
    bc_lr: float = 0.1  # lagrangian: step size of the dual update on log lambda
    bc_coef_min: float = 1e-3
    bc_coef_max: float = 10.0
    bc_batch_size: int = 64
    buffer_capacity: int = 50
    buffer_admit_self: bool = True  # False: the buffer only ever holds the SFT demos (ablation)
    # which of the policy's successes enter the buffer (vlapt.data.demo_buffer): "shorter" than the longest stored one
    # (replacing it), or "advantage": discounted return above the critic's value of the episode's first observation,
    # i.e. better than expected on that configuration (replacing the oldest entry), or "pace": fewer steps relative to
    # the scripted expert's on the same configuration than the stored episode with the highest ratio (replacing it;
    # the envs then run the expert, unrendered, at every reset to measure it)
    buffer_admission: str = "shorter"
    # the BC targets of the policy's own successes: "sampled" (the policy's samples before the env clips them) or
    # "executed" (what the env ran, clipped to the action bounds). Where the policy commands full speed, clipping
    # cuts off the half of its exploration noise that points outwards, so the executed actions average inside the
    # bound and imitating them pulls the mean command below full speed; the samples average to the mean itself.
    # MT10, 500k env steps, seeds 0 and 1: pace 0.96-0.97 of the experts' against 0.995, success 0.896 and 0.922
    # against 0.936 and 0.896 (docs/results.md)
    bc_self_actions: str = "sampled"
    # > 0: also keep an exponential moving average of the policy's weights (this decay per iteration; 0.95 averages
    # over ~20 iterations, ~30k env steps) and write it as policy_ema/ beside policy/. PPO's last iterate carries the
    # noise of its last few updates; the average is a smoother policy from the same run, at no extra env steps, and
    # never feeds back into training (0: off; the run is the same either way)
    ema_decay: float = 0.95
    # bookkeeping
    checkpoint_every: int = 5  # iterations
    eval_every: int = 25  # iterations; 0 disables
    eval_episodes: int = 5  # per task, held-out configurations
    max_nonfinite_updates: int = 20  # abort (keeping the last good checkpoint) after this many skipped updates
    seed: int = 0
    threads: int = 2  # torch threads for the learner
    rollout_threads: int = 1  # torch threads for inference during rollouts: leave the cores to the env workers
    resume: bool = True

    def validate(self) -> "PPOConfig":
        resolve_tasks(self.suite, self.tasks)
        if self.bc_target not in ("initial", "reference"):
            raise ValueError(f"bc_target must be initial or reference, got {self.bc_target!r}")
        if self.bc_weight_rule not in ("lagrangian", "fixed", "none"):
            raise ValueError(f"bc_weight_rule must be lagrangian, fixed or none, got {self.bc_weight_rule!r}")
        if self.lr <= 0 or self.value_lr < 0:
            raise ValueError(f"lr must be > 0 and value_lr >= 0 (0: lr), got lr={self.lr}, value_lr={self.value_lr}")
        if self.execute_steps < 0:
            raise ValueError(f"execute_steps must be >= 0 (0: the whole chunk), got {self.execute_steps}")
        for name in ("envs_per_task", "horizon", "rollout_groups", "threads", "rollout_threads", "epochs", "minibatch_size", "total_env_steps", "buffer_capacity"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ValueError("gamma must be in (0, 1] and gae_lambda in [0, 1]")
        if not self.bc_coef_min <= self.bc_coef <= self.bc_coef_max or self.bc_coef_min <= 0:
            raise ValueError(f"bc_coef ({self.bc_coef}) must lie in [bc_coef_min, bc_coef_max] = "
                             f"[{self.bc_coef_min}, {self.bc_coef_max}] with bc_coef_min > 0 (bc_weight_rule=none disables BC)")
        if self.reward not in ("sparse", "dense"):
            raise ValueError(f"reward must be sparse or dense, got {self.reward!r}")
        if self.shaping_coef < 0 or (self.shaping_coef and self.reward != "sparse"):
            raise ValueError(f"shaping_coef must be >= 0 and needs reward=sparse (the dense reward is the potential), "
                             f"got shaping_coef={self.shaping_coef}, reward={self.reward!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no weight average), got {self.ema_decay}")
        if self.buffer_admission not in ADMISSION_RULES:
            raise ValueError(f"buffer_admission must be one of {', '.join(ADMISSION_RULES)}, got {self.buffer_admission!r}")
        if self.bc_self_actions not in ("executed", "sampled"):
            raise ValueError(f"bc_self_actions must be executed or sampled, got {self.bc_self_actions!r}")
        if self.advantage_norm not in ("minibatch", "task"):
            raise ValueError(f"advantage_norm must be minibatch or task, got {self.advantage_norm!r}")
        if not 0 <= self.advantage_norm_decay < 1:
            raise ValueError(f"advantage_norm_decay must be in [0, 1), got {self.advantage_norm_decay}")
        return self


class BCWeight:
    """The online-adapted weight lambda in L = L_PPO + lambda * L_BC.

    "lagrangian": treat self-BC as a constraint, not a fixed regulariser. PPO may change the
    policy freely as long as the buffer's BC loss stays below a target (``bc_target_ratio``
    times its value at the start); lambda is the constraint's multiplier, updated by dual
    ascent on log lambda: log lambda += bc_lr * (L_BC / target - 1). When RL updates start
    to forget the successful behaviour in the buffer (the failure mode that makes PPO on
    sparse rewards collapse), lambda grows until the policy returns to it; while the policy
    keeps it, lambda decays and RL is free to find shorter solutions, which then enter
    the buffer and become the behaviour the constraint protects.
    "fixed": lambda = bc_coef. "none": lambda = 0 (plain chunked PPO).

    With a ``reference_loss`` (the SFT policy's BC loss on the same samples) the target moves
    with the buffer: the policy must imitate the buffer nearly as well as the SFT policy does.
    Without one, the target is fixed at the first measurement, which the buffer can outgrow:
    the policy's own successes carry its exploration noise, so the BC loss of a buffer full of
    them sits above a target calibrated on clean demonstrations, and lambda climbs to its cap.
    """

    def __init__(self, rule: str, init: float, target_ratio: float, lr: float, lo: float, hi: float):
        self.rule, self.value, self.target_ratio, self.lr, self.lo, self.hi = rule, init, target_ratio, lr, lo, hi
        self.target: float | None = None
        self.scale = 1.0
        if rule == "none":
            self.value = 0.0

    def update(self, bc_loss: float, reference_loss: float | None = None) -> float:
        if self.rule != "lagrangian" or not math.isfinite(bc_loss):
            return self.value
        if reference_loss is not None:
            if not math.isfinite(reference_loss):
                return self.value
            self.scale = abs(reference_loss) + 1e-3
            self.target = reference_loss + (self.target_ratio - 1.0) * self.scale
        elif self.target is None:  # calibrate on the first measurement; NLL can be negative, so offset by |L0|
            self.scale = abs(bc_loss) + 1e-3
            self.target = bc_loss + (self.target_ratio - 1.0) * self.scale
            return self.value
        violation = (bc_loss - self.target) / self.scale
        log_value = np.clip(math.log(self.value) + self.lr * violation, math.log(self.lo), math.log(self.hi))
        self.value = float(np.clip(math.exp(log_value), self.lo, self.hi))  # log-space step: a spike cannot overflow
        return self.value

    def state(self) -> dict:
        return {"value": self.value, "target": self.target, "scale": self.scale}

    def load(self, state: dict) -> None:
        self.value, self.target, self.scale = state["value"], state["target"], state["scale"]


def task_columns(tasks: list[str]) -> dict[str, list[int]]:
    """Task -> the rollout slots (columns of a (T, S) batch) that run it, in first-seen order."""
    columns: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
        columns.setdefault(task, []).append(i)
    return columns


class TaskAdvantageScale:
    """Per-task advantage normalisation for multi-task PPO.

    One mean/std over a minibatch that mixes tasks gives each task a share of the surrogate's
    gradient in proportion to the size of its advantages, and with a sparse reward those sizes
    differ by task for reasons that have nothing to do with how much there is to learn: a task
    that succeeds in every episode collects a reward in many of its chunks, while a task that
    mostly fails spends long stretches at low value with no reward at all (on MT10 the
    advantages of door-open and window-close spread ~5x wider than peg-insert-side's). Each
    task's advantages are centred on their own batch mean and divided by their own std, so
    every task weighs the same (the problem PopArt solves for reward scales). The variance is
    a running EMA over iterations rather than the batch's own (~16 chunks per task), so a quiet
    iteration's critic noise is not blown up to unit scale.
    """

    def __init__(self, decay: float = 0.9, floor: float = 1e-4):
        self.decay, self.floor = decay, floor
        self.variance: dict[str, float] = {}

    def normalize(self, advantages: np.ndarray, tasks: list[str]) -> np.ndarray:
        """Advantages (T, S) of slots running ``tasks`` (S,) -> normalised per task; updates the running variances."""
        out = np.empty_like(advantages)
        for task, cols in task_columns(tasks).items():
            centred = advantages[:, cols] - advantages[:, cols].mean()
            var = float(np.mean(np.square(centred)))
            old = self.variance.get(task)
            self.variance[task] = var if old is None else self.decay * old + (1 - self.decay) * var
            out[:, cols] = centred / max(math.sqrt(self.variance[task]), self.floor)
        return out

    def state(self) -> dict:
        return {"variance": dict(self.variance)}

    def load(self, state: dict) -> None:
        self.variance = {t: float(v) for t, v in state["variance"].items()}


def rollout_functions(model: VLAPolicy, tokenizer: Tokenizer, generator: torch.Generator, execute_steps: int = 0,
                      clip: bool = True):
    """``act`` and ``value`` for `ChunkedRollout`: batched, sampled chunks; executed = unnormalised and clipped to the
    action bounds, and only the first ``execute_steps`` actions of each chunk (with the log-prob of those) when it
    is > 0. ``clip=False`` sends the samples unclipped: the env clips them the same way, so the rollout is the same,
    but the self-BC buffer then keeps the samples rather than their clipped execution (``bc_self_actions``)."""
    k = execute_steps or model.chunk_len

    def act(observations):
        batch = make_batch(stack_observations(observations), tokenizer, model.config)
        with torch.no_grad():
            model.eval()
            actions, log_probs, values = model.sample(batch, deterministic=False, generator=generator, steps=k)
        executed = model.unnormalize_actions(actions[:, :k]).numpy()
        if clip:
            executed = np.clip(executed, -1.0, 1.0)
        return actions.numpy(), executed, log_probs.numpy(), values.numpy()

    def value(observations):
        with torch.no_grad():
            model.eval()
            return model(make_batch(stack_observations(observations), tokenizer, model.config)).value.numpy()

    return act, value


def make_optimizer(model: VLAPolicy, config: PPOConfig) -> torch.optim.Adam:
    """Adam with the value head in a group of its own: SFT leaves it untrained, and at the actor's
    small learning rate it explains almost none of the returns' variance for ~150k env steps,
    so PPO's early advantages are mostly noise."""
    value_params = list(model.value_head.parameters())
    value_ids = {id(p) for p in value_params}
    return torch.optim.Adam([
        {"params": [p for p in model.parameters() if id(p) not in value_ids], "lr": config.lr},
        {"params": value_params, "lr": config.value_lr or config.lr},
    ], eps=1e-5)


def ppo_losses(
    model: VLAPolicy, batch: dict, actions: torch.Tensor, old_log_probs: torch.Tensor, old_values: torch.Tensor,
    advantages: torch.Tensor, returns: torch.Tensor, clip_coef: float, value_clip_coef: float, execute_steps: int = 0,
):
    """Chunk-level clipped surrogate and clipped value loss; returns (policy_loss, value_loss, entropy, approx_kl, clipfrac).

    ``execute_steps`` > 0: the ratio and entropy of each chunk's first ``execute_steps`` actions, the ones executed."""
    new_log_probs, entropy, values = model.evaluate_actions(batch, actions, steps=execute_steps)
    log_ratio = new_log_probs - old_log_probs
    ratio = log_ratio.exp()
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages)
    policy_loss = -surrogate.mean()
    clipped_values = old_values + (values - old_values).clamp(-value_clip_coef, value_clip_coef)
    value_loss = 0.5 * torch.max((values - returns).square(), (clipped_values - returns).square()).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clipfrac = ((ratio - 1).abs() > clip_coef).float().mean()
    return policy_loss, value_loss, entropy.mean(), approx_kl, clipfrac


def train_ppo(config: PPOConfig, progress: bool = True) -> Path:
    config.validate()
    if RELABELLED in env_args(config.demos):
        raise ValueError(f"demos {config.demos} is a `vlapt relabel` dataset: its actions are the expert's labels, not "
                         "trials that reached success; seed the self-BC buffer with a `vlapt collect` dataset")
    init_chunk_len = load_pretrained_config(config.init_policy)[0].chunk_len
    if config.execute_steps > init_chunk_len:
        raise ValueError(f"execute_steps={config.execute_steps} exceeds the chunk length {init_chunk_len} of "
                         f"{config.init_policy}; use 1..{init_chunk_len} (0: the whole chunk)")
    out_dir = start_run(config, config.output_dir, config.threads)
    tasks = resolve_tasks(config.suite, config.tasks)

    # -- policy, optimiser, buffer, state ---------------------------------------------------------
    resume_from = latest_checkpoint(out_dir) if config.resume else None
    model = load_pretrained(resume_from or config.init_policy)
    policy_config = model.config
    tokenizer = Tokenizer(policy_config.vocab)
    h = policy_config.chunk_len
    if resume_from is None and config.init_log_std != 0:
        with torch.no_grad():
            model.log_std.fill_(config.init_log_std)
    if resume_from is None and config.correlated_noise_log_std != 0:
        if model.config.correlated_noise:
            with torch.no_grad():
                model.correlated_log_std.fill_(config.correlated_noise_log_std)
        else:
            model.enable_correlated_noise(config.correlated_noise_log_std)
    optimizer = make_optimizer(model, config)
    demos = read_episodes(config.demos, tasks, config.demos_per_task or None)
    buffer = DemoBuffer(tasks, config.buffer_capacity, config.buffer_admit_self, config.buffer_admission)
    buffer.seed(demos, h)
    reference_model = None
    if config.bc_weight_rule == "lagrangian" and config.bc_target == "reference":
        reference_model = load_pretrained(config.init_policy).eval().requires_grad_(False)
        if model.config.correlated_noise and not reference_model.config.correlated_noise:
            reference_model.enable_correlated_noise(model.config.init_correlated_log_std)
            reference_model.requires_grad_(False)
    bc_weight = BCWeight(config.bc_weight_rule, config.bc_coef, config.bc_target_ratio, config.bc_lr,
                         config.bc_coef_min, config.bc_coef_max)
    advantage_scale = TaskAdvantageScale(config.advantage_norm_decay)
    ema = None
    if config.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    sample_gen = torch.Generator().manual_seed(config.seed)
    iteration, env_steps, nonfinite = 0, 0, 0
    next_index = {t: 0 for t in tasks}
    history: list[dict] = []
    if resume_from is not None:
        _, tensors, state = load_training_checkpoint(resume_from)
        restore_state(optimizer, rng, {"sample": sample_gen}, tensors, state)
        buffer.load_state(tensors, state["buffer"], demos, h)
        bc_weight.load(state["bc_weight"])
        advantage_scale.load(state.get("advantage_scale", {"variance": {}}))  # runs from before it have none
        if ema is not None:
            _load_ema(ema, tensors, resume_from)
        iteration, env_steps, next_index, history = state["iteration"], state["env_steps"], state["next_index"], state["history"]
        log.info("resumed from %s: iteration %d, %d env steps", resume_from, iteration, env_steps)

    act, value = rollout_functions(model, tokenizer, sample_gen, config.execute_steps,
                                   clip=config.bc_self_actions == "executed")
    env_config = env_config_for_policy(policy_config, reward=config.reward,
                                       expert_reference=config.buffer_admission == "pace")
    slots = [SlotSpec(t, env_config, h) for t in tasks for _ in range(config.envs_per_task)]
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out_dir / "tb"), purge_step=iteration)
    recent = deque(maxlen=max(20, 2 * len(slots)))  # recent finished training episodes
    bar = tqdm(total=config.total_env_steps, initial=env_steps, desc="ppo", unit="step", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    if config.eval_every and resume_from is None:  # where the curves start: the SFT policy itself
        result = _evaluate_checkpoint(Path(config.init_policy), tasks, config, write_into_checkpoint=False)
        atomic_write_json(out_dir / "evals" / "iteration_000000.json", result)
        writer.add_scalar("eval/success_rate", result["average"]["success_rate"], 0)
    with EnvPool(slots, num_workers=config.num_workers) as pool:
        rollout = ChunkedRollout(pool, [s.task for s in slots], config.gamma, h, next_index, config.rollout_groups,
                                 shaping_coef=config.shaping_coef)
        while env_steps < config.total_env_steps:
            iteration += 1
            t0 = time.perf_counter()
            torch.set_num_threads(config.rollout_threads)
            batch, finished = rollout.collect(act, value, config.horizon)
            torch.set_num_threads(config.threads)
            rollout_time = time.perf_counter() - t0
            steps_now = int(batch.steps.sum())
            env_steps += steps_now
            for ep in finished:
                recent.append(ep)
                if ep.trajectory is not None:
                    buffer.offer(ep.trajectory)
            t1 = time.perf_counter()
            stats = _update(model, optimizer, batch, buffer, bc_weight, tokenizer, policy_config, config, rng,
                            critic_only=iteration <= config.value_warmup_iterations, reference_model=reference_model,
                            advantage_scale=advantage_scale)
            nonfinite += stats.pop("nonfinite")
            if ema is not None and iteration > config.value_warmup_iterations:  # the warm-up leaves the actor as SFT left it
                ema.update_parameters(model)
            if nonfinite > config.max_nonfinite_updates:
                raise FloatingPointError(
                    f"{nonfinite} updates had non-finite losses or gradients; stopped. The last good checkpoint is in "
                    f"{out_dir / 'checkpoints'}; lower lr or raise max_grad_norm's strictness and resume"
                )
            learn_time = time.perf_counter() - t1
            succ = [e for e in recent if e.success]
            row = {
                "iteration": iteration, "env_steps": env_steps,
                "train_success": len(succ) / len(recent) if recent else float("nan"),
                "train_steps_to_success": float(np.mean([e.steps for e in succ])) if succ else float("nan"),
                "bc_weight": bc_weight.value, **stats, **{f"buffer_{k}": v for k, v in buffer.stats().items()},
                "rollout_env_steps_per_s": steps_now / rollout_time, "learn_time_s": learn_time,
                "wall_time_s": time.perf_counter() - start,
            }
            history.append(row)
            for k, v in row.items():
                if isinstance(v, (int, float)) and math.isfinite(v) and k != "iteration":
                    writer.add_scalar(f"ppo/{k}", v, env_steps)
            bar.update(steps_now)
            bar.set_postfix(it=iteration, succ=f"{row['train_success']:.2f}", steps=f"{row['train_steps_to_success']:.0f}",
                            lam=f"{bc_weight.value:.3f}", kl=f"{stats['approx_kl']:.3f}")
            log.info("iteration %s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
            done = env_steps >= config.total_env_steps
            if iteration % config.checkpoint_every == 0 or done:
                ckpt = _checkpoint(out_dir, iteration, env_steps, model, optimizer, rng, sample_gen, buffer, bc_weight,
                                   advantage_scale, rollout.next_index, history, ema)
                if config.eval_every and (iteration % config.eval_every == 0 or done):
                    result = _evaluate_checkpoint(ckpt, tasks, config)
                    atomic_write_json(out_dir / "evals" / f"iteration_{iteration:06d}.json", result)
                    avg = result["average"]
                    row.update({"eval_success": avg["success_rate"], "eval_steps_to_success": avg["steps_to_success"] or float("nan")})
                    _record_history(ckpt, history)  # the checkpoint was written before its evaluation
                    writer.add_scalar("eval/success_rate", avg["success_rate"], env_steps)
                    if avg["steps_to_success"] is not None:
                        writer.add_scalar("eval/steps_to_success", avg["steps_to_success"], env_steps)
                    log.info("eval at %d env steps:\n%s", env_steps, format_table(result))
    bar.close()
    writer.close()
    final = out_dir / "policy"
    save_pretrained(model, final, metadata={"trained_by": "vlapt train (chunked PPO + self-BC)", "env_steps": env_steps,
                                            "iterations": iteration})
    _save_weight_average(ema, out_dir / "policy_ema", config.ema_decay, env_steps, iteration)
    atomic_write_json(out_dir / "history.json", history)
    return final


def _save_weight_average(ema, path: Path, decay: float, env_steps: int, iteration: int) -> None:
    """Write the average as a policy, or remove one left by an earlier invocation that it would no longer describe."""
    if ema is not None and int(ema.n_averaged) > 0:
        save_pretrained(ema.module, path, metadata={
            "trained_by": "vlapt train (chunked PPO + self-BC), weight average", "env_steps": env_steps,
            "iterations": iteration, "ema_decay": decay, "iterates_averaged": int(ema.n_averaged)})
        return
    why = "ema_decay=0" if ema is None else "every iteration so far was a critic warm-up iteration"
    if path.exists():
        log.warning("removing %s: it is not the weight average of this run's final policy (%s)", path, why)
        shutil.rmtree(path)
    elif ema is not None:
        log.warning("no weight average written: %s", why)


def _update(model, optimizer, batch: RolloutBatch, buffer, bc_weight, tokenizer, policy_config, config, rng, critic_only,
            reference_model=None, advantage_scale: TaskAdvantageScale | None = None):
    T, S = batch.rewards.shape
    advantages, returns = chunk_gae(batch.rewards, batch.values, batch.discounts, batch.dones, batch.last_values, config.gae_lambda)
    advantage_std = {f"advantage_std/{t}": float(advantages[:, cols].std()) for t, cols in task_columns(batch.tasks).items()}
    per_task = config.normalize_advantages and config.advantage_norm == "task"
    per_minibatch = config.normalize_advantages and config.advantage_norm == "minibatch"
    if per_task and not critic_only:  # the critic-only warm-up's advantages (an untrained critic) would skew the scale
        advantages = (advantage_scale or TaskAdvantageScale(config.advantage_norm_decay)).normalize(advantages, batch.tasks)
    n = T * S
    flat = {
        "image": batch.images.reshape(n, *batch.images.shape[2:]),
        "proprio": batch.proprio.reshape(n, -1),
        "instruction": [instruction_for(t) for _ in range(T) for t in batch.tasks],
    }
    actions = torch.from_numpy(batch.actions.reshape(n, *batch.actions.shape[2:]))
    old_logp = torch.from_numpy(batch.log_probs.reshape(n))
    old_values = torch.from_numpy(batch.values.reshape(n))
    adv = torch.from_numpy(advantages.reshape(n))
    ret = torch.from_numpy(returns.reshape(n))
    model.train()
    sums = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "approx_kl": 0.0, "clipfrac": 0.0, "bc_loss": 0.0}
    updates, nonfinite, reference_bc = 0, 0, 0.0
    for _ in range(config.epochs):
        order = rng.permutation(n)
        epoch_kl = []
        for startk in range(0, n, config.minibatch_size):
            idx = order[startk : startk + config.minibatch_size]
            mb = make_batch({k: (v[idx] if not isinstance(v, list) else [v[i] for i in idx]) for k, v in flat.items()},
                            tokenizer, policy_config)
            mb_adv = adv[idx]
            if per_minibatch and len(idx) > 1:
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
            reference = 0.0
            pl, vl, ent, kl, cf = ppo_losses(model, mb, actions[idx], old_logp[idx], old_values[idx], mb_adv, ret[idx],
                                             config.clip_coef, config.value_clip_coef, config.execute_steps)
            if critic_only:
                loss = config.vf_coef * vl
                bc = torch.zeros(())
            else:
                loss = pl + config.vf_coef * vl - config.ent_coef * ent
                bc = torch.zeros(())
                if bc_weight.value > 0:
                    demo = buffer.sample(config.bc_batch_size, rng)
                    demo_batch = make_batch(demo, tokenizer, policy_config)
                    demo_actions = model.normalize_actions(demo["actions"])
                    bc, _ = chunk_bc_loss(model, demo_batch, demo_actions, demo["action_pad"])
                    loss = loss + bc_weight.value * bc
                    if reference_model is not None:
                        with torch.no_grad():  # the SFT policy's means under the current exploration std
                            reference_model.log_std.copy_(model.log_std)
                            if model.config.correlated_noise:
                                reference_model.correlated_log_std.copy_(model.correlated_log_std)
                            reference = float(chunk_bc_loss(reference_model, demo_batch, demo_actions, demo["action_pad"])[0])
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                nonfinite += 1
                log.warning("non-finite loss (%s); minibatch skipped", loss.item())
                continue
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            if not torch.isfinite(grad_norm):
                nonfinite += 1
                optimizer.zero_grad(set_to_none=True)
                log.warning("non-finite gradient norm; minibatch skipped")
                continue
            optimizer.step()
            updates += 1
            reference_bc += reference
            for k, v in zip(sums, (pl, vl, ent, kl, cf, bc)):
                sums[k] += float(v.detach())
            epoch_kl.append(float(kl))
        if not critic_only and config.target_kl and epoch_kl and np.mean(epoch_kl) > config.target_kl:
            break
    stats = {k: (v / updates if updates else float("nan")) for k, v in sums.items()}
    if reference_model is not None:
        stats["bc_reference_loss"] = reference_bc / updates if updates and not critic_only else float("nan")
    if not critic_only and bc_weight.value > 0 and updates:  # only a measured BC loss moves the weight
        bc_weight.update(stats["bc_loss"], stats.get("bc_reference_loss"))
    correlated = model.clamped_correlated_log_std()
    if correlated is not None:
        stats["correlated_std"] = float(correlated.detach().exp().mean())
    stats.update({"updates": updates, "nonfinite": nonfinite, "action_std": float(model.clamped_log_std().detach().exp().mean()),
                  "explained_variance": _explained_variance(batch.values.reshape(-1), returns.reshape(-1)), **advantage_std})
    return stats


def _explained_variance(pred: np.ndarray, target: np.ndarray) -> float:
    var = np.var(target)
    return float("nan") if var == 0 else float(1 - np.var(target - pred) / var)


def _checkpoint(out_dir, iteration, env_steps, model, optimizer, rng, sample_gen, buffer, bc_weight, advantage_scale,
                next_index, history, ema=None):
    tensors, meta = capture_state(optimizer, rng, {"sample": sample_gen})
    buffer_tensors, buffer_meta = buffer.state()
    tensors.update(buffer_tensors)
    if ema is not None:
        tensors.update({f"{EMA_PREFIX}{k}": v for k, v in ema.state_dict().items()})
    meta.update({"buffer": buffer_meta, "bc_weight": bc_weight.state(), "advantage_scale": advantage_scale.state(), "iteration": iteration,
                 "env_steps": env_steps, "next_index": dict(next_index), "history": history})
    return save_training_checkpoint(out_dir, iteration, model, tensors, meta)


EMA_PREFIX = "ema."


def _load_ema(ema, tensors: dict, checkpoint: Path) -> None:
    state = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
    if not state:  # a run started without the average: the first update after the resume starts it
        log.warning("%s holds no weight average; ema_decay starts one with the iterates after it", checkpoint)
        return
    ema.load_state_dict(state)


def _record_history(checkpoint: Path, history: list[dict]) -> None:
    state_path = checkpoint / "state.json"
    state = json.loads(state_path.read_text())
    state["history"] = history
    atomic_write_text(state_path, json.dumps(state))


def _evaluate_checkpoint(path: Path, tasks, config: PPOConfig, write_into_checkpoint: bool = True) -> dict:
    """Periodic held-out evaluation reads the checkpoint just written, like any evaluation."""
    from vlapt.evaluation import CheckpointAgent, evaluate

    agent = CheckpointAgent(str(path), deterministic=True, seed=config.seed)
    result = evaluate(agent, EvalConfig(tasks=list(tasks), episodes_per_task=config.eval_episodes,
                                        num_workers=config.num_workers, execute_steps=config.execute_steps), progress=False)
    if write_into_checkpoint:
        atomic_write_json(path / "eval.json", result)
    return result
