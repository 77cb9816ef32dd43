"""Supervised fine-tuning (behaviour cloning) of the VLA policy on demonstration chunks.

The baseline that RL post-training starts from. Each sample is the observation at step t
and the expert's actions t..t+h-1; the loss is the chunk's Gaussian negative
log-likelihood (padding past the episode end masked out), which trains the mean and a
calibrated exploration std in one go. Random-shift image augmentation (pad + random
crop, as in DrQ) matters with few demonstrations from pixels.

Optionally (``aux_state_coef > 0``) an auxiliary head regresses privileged simulator state
(by default the object and goal positions) from the features the action head reads. Cloning
actions alone gives a weak, indirect signal for where a small goal marker is; the auxiliary
target says it directly, during training only: the head is not part of the saved policy, and
the policy never sees the state.

``init_policy`` continues from a saved policy and ``extra_datasets`` adds episodes such as
`vlapt relabel`'s expert-labelled rollouts of the policy itself: together, one DAgger round.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vlapt.data.dataset import ChunkDataset
from vlapt.data.format import env_args, read_episodes
from vlapt.envs.tasks import MT50, instruction_for
from vlapt.models import PolicyConfig, Tokenizer, VLAPolicy, load_pretrained, make_batch, policy_config_for_size
from vlapt.algorithms.checkpointing import (
    capture_state,
    latest_checkpoint,
    load_training_checkpoint,
    restore_state,
    save_training_checkpoint,
    start_run,
)

log = logging.getLogger("vlapt.sft")


@dataclasses.dataclass
class ModelConfig:
    """The policy architecture: a named size preset plus the knobs people change most."""

    size: str = "default"  # tiny | default | large (vlapt.models.MODEL_SIZES)
    chunk_len: int = 10  # 10 beat 5 and 1 before and after post-training (docs/results.md, "Chunk length")
    image_size: int = 0  # 0: the dataset's image size
    init_log_std: float = -1.0
    dropout: float = 0.0
    vision_backbone: str = "conv"  # "hf": a pretrained Hugging Face vision model from vision_backbone_path
    vision_backbone_path: str = ""
    image_keypoints: int = 16  # spatial-softmax keypoint tokens on top of the pooled grid ("conv" only; 0: none)
    image_film: bool = False  # condition the conv stages on the instruction (FiLM; "conv" only)


@dataclasses.dataclass
class SFTConfig:
    dataset: str = "datasets/mt10_scripted_fovy30.hdf5"
    extra_datasets: list[str] = dataclasses.field(default_factory=list)  # e.g. `vlapt relabel` output: one DAgger round
    tasks: list[str] = dataclasses.field(default_factory=list)  # default: every task in the dataset
    demos_per_task: int = 0  # 0: all; the paper's small set is 10, the large set 50
    output_dir: str = "runs/sft"
    # > 0: only the first k actions of a relabelled chunk are targets (vlapt.data.dataset.ChunkDataset);
    # 0: whole chunks. MT10, one DAgger round: 0.880 with 1, 0.844 with 0 (docs/results.md)
    relabelled_label_steps: int = 1
    init_policy: str = ""  # continue from a saved policy (its architecture and normalisation; `model` is then unused)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    steps: int = 8000  # 3000 underfits the 50-demo MT10 set (docs/results.md)
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    grad_clip: float = 1.0
    loss: str = "nll"  # "nll": chunk Gaussian NLL (mean and std); "mse": mean only
    augment_shift: int = 4  # pixels of random shift; 0 disables
    checkpoint_every: int = 1000
    log_every: int = 50
    seed: int = 0
    threads: int = 2
    resume: bool = True
    # auxiliary state prediction (training only; the policy never sees the state)
    aux_state_coef: float = 1.0  # weight of the auxiliary loss; 0 disables it (MT10 SFT: 0.722 without, 0.818 with)
    aux_state_dims: list[int] = dataclasses.field(default_factory=lambda: [4, 5, 6, 36, 37, 38])  # MetaWorld state: object xyz, goal xyz

    def validate(self) -> "SFTConfig":
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.loss not in ("nll", "mse"):
            raise ValueError(f"loss must be 'nll' or 'mse', got {self.loss!r}")
        if self.demos_per_task < 0 or self.augment_shift < 0 or self.relabelled_label_steps < 0:
            raise ValueError("demos_per_task, augment_shift and relabelled_label_steps must be >= 0")
        if self.model.chunk_len < 1:
            raise ValueError(f"model.chunk_len must be >= 1, got {self.model.chunk_len}")
        if self.aux_state_coef < 0:
            raise ValueError(f"aux_state_coef must be >= 0, got {self.aux_state_coef}")
        if self.aux_state_coef > 0 and (not self.aux_state_dims or not all(0 <= d < STATE_DIM for d in self.aux_state_dims)):
            raise ValueError(f"aux_state_dims must be a non-empty list of indices into the {STATE_DIM}-d MetaWorld state, "
                             f"got {self.aux_state_dims}")
        return self


STATE_DIM = 39  # MetaWorld's observation vector, stored as obs/state in vlapt datasets


class StatePredictionHead(nn.Module):
    """Auxiliary regressor: action readout features -> chosen privileged state entries, normalised.

    Lives only in SFT training checkpoints (under ``aux.``), so the saved policy is unchanged.
    """

    def __init__(self, d_model: int, dims: list[int], mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.register_buffer("dims", torch.tensor(dims, dtype=torch.long))
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.net = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, len(dims)))

    def loss(self, features: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        target = (state[:, self.dims] - self.mean) / self.std
        return (self.net(features) - target).square().mean()


def build_policy_config(model: ModelConfig, image_size: int, camera: str, stats: dict, camera_fovy: float = 0.0) -> PolicyConfig:
    """The policy's full config: preset + knobs + normalisation + a vocabulary of all task instructions."""
    vocab = Tokenizer.build([instruction_for(t) for t in MT50]).vocab
    return policy_config_for_size(
        model.size,
        chunk_len=model.chunk_len,
        image_size=model.image_size or image_size,
        init_log_std=model.init_log_std,
        dropout=model.dropout,
        vision_backbone=model.vision_backbone,
        vision_backbone_path=model.vision_backbone_path,
        image_keypoints=model.image_keypoints,
        image_film=model.image_film,
        camera=camera,
        camera_fovy=camera_fovy,
        vocab=list(vocab),
        **stats,
    )


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Pad by replicating edges and crop back at a random offset per image (uint8 in, uint8 out)."""
    if pad == 0:
        return images
    n, h, w, _ = images.shape
    padded = F.pad(images.permute(0, 3, 1, 2).float(), (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, :].expand(n, h, w)
    batch = torch.arange(n)[:, None, None].expand(n, h, w)
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]
    return out.to(torch.uint8)


def chunk_bc_loss(model: VLAPolicy, batch: dict, actions: torch.Tensor, pad: torch.Tensor, kind: str = "nll", out=None):
    """Masked behaviour-cloning loss on normalised chunks; returns (loss, mse of the mean).

    ``out``: the model's output on ``batch``, when the caller already has it.
    """
    out = model(batch) if out is None else out
    valid = (~pad).unsqueeze(-1).float().expand_as(actions)
    count = valid.sum().clamp_min(1.0)
    sq = (out.mean - actions).square()
    mse = (sq * valid).sum() / count
    if kind == "mse":
        return mse, mse.detach()
    # Per-entry Gaussian NLL. With correlated chunk noise each entry's marginal variance is
    # s_t^2 + c^2 (a composite likelihood: padded entries simply drop out).
    log_var = 2.0 * out.log_std
    if out.correlated_log_std is not None:
        log_var = torch.logaddexp(log_var, 2.0 * out.correlated_log_std)
    nll = 0.5 * sq * torch.exp(-log_var) + 0.5 * log_var + 0.5 * math.log(2 * math.pi)
    return (nll * valid).sum() / count, mse.detach()


def train_sft(config: SFTConfig, progress: bool = True) -> Path:
    """Train, checkpoint periodically (resuming from the last checkpoint), return the final policy dir."""
    config.validate()
    out_dir = start_run(config, config.output_dir, config.threads)

    meta = env_args(config.dataset)
    episodes = read_episodes(config.dataset, config.tasks or None, config.demos_per_task or None)
    for extra in config.extra_datasets:
        keys = ("camera", "camera_fovy", "image_size", "proprio_fields")
        extra_meta = env_args(extra)
        _check_same_observations(f"extra dataset {extra}", {k: extra_meta.get(k) for k in keys}, config.dataset,
                                 {k: meta.get(k) for k in keys}, "collect both with the same camera settings")
        episodes += read_episodes(extra, config.tasks or None)
    init = load_pretrained(config.init_policy) if config.init_policy else None
    chunk_len = init.config.chunk_len if init is not None else config.model.chunk_len
    dataset = ChunkDataset(episodes, chunk_len, config.relabelled_label_steps)
    if init is not None:
        policy_config = init.config
        seen = {"camera": meta["camera"], "camera_fovy": meta.get("camera_fovy", 0.0), "image_size": meta["image_size"]}
        _check_same_observations(f"init_policy {config.init_policy}", {k: getattr(policy_config, k) for k in seen},
                                 config.dataset, seen, "fine-tune on a dataset collected with the policy's camera settings")
    else:
        policy_config = build_policy_config(
            config.model, meta["image_size"], meta["camera"], dataset.statistics(), meta.get("camera_fovy", 0.0)
        )
    if policy_config.image_size != meta["image_size"]:
        raise ValueError(f"model.image_size {policy_config.image_size} differs from the dataset's {meta['image_size']}")
    tokenizer = Tokenizer(policy_config.vocab)
    log.info("datasets %s: %d episodes, %d samples", [config.dataset, *config.extra_datasets], len(episodes), len(dataset))

    torch.manual_seed(config.seed)
    model = VLAPolicy(policy_config)
    if init is not None:
        model.load_state_dict(init.state_dict())
        del init
    aux_head = None
    if config.aux_state_coef > 0:
        if dataset.states is None:
            raise ValueError(f"aux_state_coef > 0 needs obs/state in every demo of {[config.dataset, *config.extra_datasets]}; "
                             "collect the dataset with `vlapt collect` (it stores the state), or set aux_state_coef=0")
        targets = dataset.states[:, config.aux_state_dims]
        aux_head = StatePredictionHead(policy_config.d_model, config.aux_state_dims, targets.mean(0), np.maximum(targets.std(0), 1e-3))
    parameters = list(model.parameters()) + (list(aux_head.parameters()) if aux_head is not None else [])
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    aug_gen = torch.Generator().manual_seed(config.seed + 1)
    step = 0
    resume_from = latest_checkpoint(out_dir) if config.resume else None
    if resume_from is not None:
        loaded, tensors, state = load_training_checkpoint(resume_from)
        model.load_state_dict(loaded.state_dict())
        aux_state = {k[len("aux."):]: v for k, v in tensors.items() if k.startswith("aux.")}
        if bool(aux_state) != (aux_head is not None):
            raise ValueError(f"checkpoint {resume_from} was trained with aux_state_coef "
                             f"{'> 0' if aux_state else '= 0'}, this config has {config.aux_state_coef}; "
                             "resume with the run's own config (its config.yaml), or start a new output_dir")
        restore_state(optimizer, rng, {"augment": aug_gen}, tensors, state)
        if aux_head is not None:
            aux_head.load_state_dict(aux_state)
        step = int(state["step"])
        log.info("resumed from %s at step %d", resume_from, step)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out_dir / "tb"), purge_step=step)
    model.train()
    bar = tqdm(total=config.steps, initial=step, desc="sft", unit="step", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    while step < config.steps:
        lr = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, step / config.steps)))  # cosine decay to zero
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = rng.integers(0, len(dataset), size=config.batch_size)
        sample = dataset.batch(indices)
        sample["image"] = random_shift(sample["image"], config.augment_shift, aug_gen)
        batch = make_batch(
            {"image": sample["image"].numpy(), "proprio": sample["proprio"].numpy(), "instruction": sample["instruction"]},
            tokenizer,
            policy_config,
        )
        actions = model.normalize_actions(sample["actions"])
        out = model(batch)
        loss, mse = chunk_bc_loss(model, batch, actions, sample["action_pad"], config.loss, out=out)
        aux_loss = None
        if aux_head is not None:
            aux_loss = aux_head.loss(out.features, sample["state"])
            loss = loss + config.aux_state_coef * aux_loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"SFT loss is {loss.item()} at step {step}; lower lr or check the dataset")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
        optimizer.step()
        step += 1
        bar.update(1)
        if step % config.log_every == 0 or step == config.steps:
            std = model.clamped_log_std().exp().mean().item()
            writer.add_scalar("sft/loss", loss.item(), step)
            writer.add_scalar("sft/mse", mse.item(), step)
            writer.add_scalar("sft/action_std", std, step)
            writer.add_scalar("sft/grad_norm", float(grad_norm), step)
            writer.add_scalar("sft/lr", lr, step)
            if aux_loss is not None:
                writer.add_scalar("sft/aux_state_loss", aux_loss.item(), step)
            bar.set_postfix(loss=f"{loss.item():.3f}", mse=f"{mse.item():.4f}", std=f"{std:.3f}")
            log.info("step %d loss %.4f mse %.5f std %.4f%s", step, loss.item(), mse.item(), std,
                     f" aux_state {aux_loss.item():.4f}" if aux_loss is not None else "")
        if step % config.checkpoint_every == 0 or step == config.steps:
            _checkpoint(out_dir, step, model, optimizer, rng, aug_gen, aux_head)
    bar.close()
    writer.close()
    final = out_dir / "policy"
    from vlapt.models import save_pretrained

    save_pretrained(model, final, metadata={
        "trained_by": "vlapt sft", "steps": step, "dataset": str(config.dataset),
        "extra_datasets": [str(d) for d in config.extra_datasets], "init_policy": config.init_policy,
        "demos_per_task": config.demos_per_task, "samples": len(dataset),
        "wall_time_s_this_session": time.perf_counter() - start,
    })
    log.info("final policy written to %s", final)
    return final


def _check_same_observations(what: str, observed: dict, dataset: str, expected: dict, fix: str) -> None:
    """Every dataset of one SFT run, and the policy it continues, must see the scene the same way."""
    differ = [k for k in observed if observed[k] != expected[k]]
    if differ:
        raise ValueError(f"{what} differs from {dataset} in " + ", ".join(
            f"{k} ({observed[k]} vs {expected[k]})" for k in differ) + f"; {fix}")


def _checkpoint(out_dir, step, model, optimizer, rng, aug_gen, aux_head=None):
    tensors, state = capture_state(optimizer, rng, {"augment": aug_gen})
    if aux_head is not None:
        tensors.update({f"aux.{k}": v for k, v in aux_head.state_dict().items()})
    save_training_checkpoint(out_dir, step, model, tensors, state)
