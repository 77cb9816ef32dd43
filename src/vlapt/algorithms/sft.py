"""Supervised fine-tuning (behaviour cloning) of the VLA policy on demonstration chunks.

The baseline that RL post-training starts from. Each sample is the observation at step t
and the expert's actions t..t+h-1; the loss is the chunk's Gaussian negative
log-likelihood (padding past the episode end masked out), which trains the mean and a
calibrated exploration std in one go. Random-shift image augmentation (pad + random
crop, as in DrQ) matters with few demonstrations from pixels.

Optionally (``aux_state_coef > 0``) an auxiliary head regresses privileged simulator state
(by default the suite's auxiliary targets, e.g. object and goal positions) from the features
the action head reads. Cloning
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

from vlapt.algorithms.bookkeeping import open_tensorboard
from vlapt.algorithms.checkpointing import (
    capture_state, latest_checkpoint, load_training_checkpoint, restore_state, save_training_checkpoint, start_run,
)
from vlapt.config import check_at_least
from vlapt.data.dataset import ChunkDataset
from vlapt.data.format import check_observed_as, dataset_suite, env_args, read_episodes
from vlapt.interfaces import EnvConfig, ObservationSpec, camera_views, join_views, split_views
from vlapt.policies import load_policy, resolve_device
from vlapt.policies.vla import PolicyConfig, Tokenizer, VLAPolicy, policy_config_for_size
from vlapt.policies.vla.network import vision_backbone_builder
from vlapt.rundir import stop_if_requested

log = logging.getLogger("vlapt.sft")


@dataclasses.dataclass
class ModelConfig:
    """The policy architecture: a named size preset plus the knobs people change most (defaults: PolicyConfig's)."""

    size: str = "default"  # tiny | default | large (vlapt.policies.vla.MODEL_SIZES)
    chunk_len: int = PolicyConfig.chunk_len
    image_size: int = 0  # 0: the dataset's image size
    init_log_std: float = PolicyConfig.init_log_std
    dropout: float = PolicyConfig.dropout
    # "conv" | "hf" (a Hugging Face vision model or VLM tower from vision_backbone_path) | "efficientnet_lite0"
    # (ImageNet weights); see docs/policies.md
    vision_backbone: str = PolicyConfig.vision_backbone
    vision_backbone_path: str = ""
    vision_input_size: int = PolicyConfig.vision_input_size
    vision_trainable: str = PolicyConfig.vision_trainable  # "all" | "none" (frozen, features cached) | "last_<k>"
    vision_lora_rank: int = PolicyConfig.vision_lora_rank
    feature_cache_mb: int = PolicyConfig.feature_cache_mb
    image_keypoints: int = PolicyConfig.image_keypoints  # spatial-softmax keypoint tokens ("conv" only; others get 0)
    # "words" | "hf" (a Hugging Face text model or a CLIP / SigLIP / VLM text tower, with its tokenizer, from the path)
    language_backbone: str = PolicyConfig.language_backbone
    language_backbone_path: str = ""
    language_trainable: str = PolicyConfig.language_trainable  # "hf": "all" | "none" | "last_<k>"


@dataclasses.dataclass
class SFTConfig:
    dataset: str = "datasets/mt10_scripted_fovy30.hdf5"
    extra_datasets: list[str] = dataclasses.field(default_factory=list)  # e.g. `vlapt relabel` output: one DAgger round
    tasks: list[str] = dataclasses.field(default_factory=list)  # default: every task in the dataset
    demos_per_task: int = 0  # 0: all; the paper's small set is 10, the large set 50
    output_dir: str = "runs/sft"
    # > 0: only the first k actions of a relabelled chunk are targets (vlapt.data.dataset.ChunkDataset); 0: whole
    # chunks, whose later labels react to open-loop actions the observation cannot show
    relabelled_label_steps: int = 1
    init_policy: str = ""  # continue from a saved policy (its architecture and normalisation; `model` is then unused)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    steps: int = 8000
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    grad_clip: float = 1.0
    augment_shift: int = 4  # pixels of random shift; 0 disables
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2  # training checkpoints kept on disk, newest first (0: all)
    log_every: int = 50
    seed: int = 0
    threads: int = 2
    device: str = "cpu"  # cpu, cuda, cuda:N, mps, or auto (cuda where there is one)
    precision: str = "fp32"  # fp32, or bf16 (autocast the forward passes; likelihoods stay float32)
    resume: bool = True
    # auxiliary state prediction (training only; the policy never sees the state)
    aux_state_coef: float = 1.0  # weight of the auxiliary loss; 0 disables it
    aux_state_dims: list[int] = dataclasses.field(default_factory=list)  # indices into the state; []: the suite's targets

    def validate(self) -> "SFTConfig":
        check_at_least(self, 1, "steps", "batch_size", "checkpoint_every", "log_every")
        check_at_least(self, 0, "demos_per_task", "augment_shift", "relabelled_label_steps", "keep_checkpoints")
        if self.model.chunk_len < 1:
            raise ValueError(f"model.chunk_len must be >= 1, got {self.model.chunk_len}")
        if self.aux_state_coef < 0 or any(d < 0 for d in self.aux_state_dims):
            raise ValueError(f"aux_state_coef and aux_state_dims must be >= 0, got {self.aux_state_coef}, {self.aux_state_dims}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        resolve_device(self.device)
        return self


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


def build_policy_config(model: ModelConfig, spec: ObservationSpec, stats: dict, vocabulary: list[str]) -> PolicyConfig:
    """The policy's full config: preset + knobs + normalisation + a vocabulary of every instruction of the suite."""
    vision_backbone_builder(model.vision_backbone, option="model.vision_backbone")  # named before anything is built
    return policy_config_for_size(
        model.size,
        chunk_len=model.chunk_len,
        image_size=model.image_size or spec.image_size,
        init_log_std=model.init_log_std,
        dropout=model.dropout,
        vision_backbone=model.vision_backbone,
        vision_backbone_path=model.vision_backbone_path,
        vision_input_size=model.vision_input_size,
        vision_trainable=model.vision_trainable,
        vision_lora_rank=model.vision_lora_rank,
        feature_cache_mb=model.feature_cache_mb,
        image_keypoints=model.image_keypoints if model.vision_backbone == "conv" else 0,  # keypoints are the conv's
        language_backbone=model.language_backbone,
        language_backbone_path=model.language_backbone_path,
        language_trainable=model.language_trainable,
        camera=spec.camera,
        camera_fovy=spec.camera_fovy,
        proprio_dim=len(spec.proprio_fields),
        proprio_fields=list(spec.proprio_fields),
        action_dim=spec.action_dim,
        vocab=list(Tokenizer.build(vocabulary).vocab),
        **stats,
    )


def dataset_spec(meta: dict) -> ObservationSpec:
    """How a dataset's episodes were observed, from its env_args (older datasets lack the dimensions: their suite's)."""
    suite = dataset_suite(meta)
    own = suite.observation_spec(EnvConfig(camera=meta["camera"], image_size=meta["image_size"],
                                           camera_fovy=meta.get("camera_fovy", 0.0)))
    return dataclasses.replace(own, proprio_fields=tuple(meta.get("proprio_fields", own.proprio_fields)),
                               action_dim=int(meta.get("action_dim", own.action_dim)))


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator, views: int = 1) -> torch.Tensor:
    """Pad by replicating edges and crop back at a random offset per image (uint8 in, uint8 out); images of
    ``views`` square views side by side are shifted view by view, each by its own offset."""
    if pad == 0:
        return images
    if views > 1:
        return join_views(random_shift(split_views(images, views), pad, generator), views)
    n, h, w, _ = images.shape
    padded = F.pad(images.permute(0, 3, 1, 2).float(), (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, :].expand(n, h, w)
    batch = torch.arange(n)[:, None, None].expand(n, h, w)
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]
    return out.to(torch.uint8)


def train_sft(config: SFTConfig, progress: bool = True) -> Path:
    """Train, checkpoint periodically (resuming from the last checkpoint), return the final policy dir."""
    config.validate()
    meta = env_args(config.dataset)
    spec = dataset_spec(meta)
    init = load_policy(config.init_policy) if config.init_policy else None
    if init is not None:  # before any demonstration is read
        check_observed_as(config.dataset, init.observation_config(), dataset_suite(meta), f"init_policy {config.init_policy}")
    elif (config.model.image_size or spec.image_size) != spec.image_size:
        raise ValueError(f"model.image_size {config.model.image_size} differs from the dataset's {spec.image_size}")
    episodes = read_episodes(config.dataset, config.tasks or None, config.demos_per_task or None)
    for extra in config.extra_datasets:
        keys = ("camera", "camera_fovy", "image_size", "proprio_fields")
        extra_meta = env_args(extra)
        _check_same_observations(f"extra dataset {extra}", {k: extra_meta.get(k) for k in keys}, config.dataset,
                                 {k: meta.get(k) for k in keys}, "collect both with the same camera settings")
        episodes += read_episodes(extra, config.tasks or None)
    chunk_len = init.chunk_len if init is not None else config.model.chunk_len
    dataset = ChunkDataset(episodes, chunk_len, config.relabelled_label_steps)
    aux_dims = list(config.aux_state_dims or spec.aux_targets)
    if config.aux_state_coef > 0:
        if dataset.states is None:
            raise ValueError(f"aux_state_coef > 0 needs obs/state in every demo of {[config.dataset, *config.extra_datasets]}; "
                             "collect the dataset with `vlapt collect` (it stores the state), or set aux_state_coef=0")
        if not aux_dims or max(aux_dims) >= dataset.states.shape[1]:
            raise ValueError(f"aux_state_dims {aux_dims} must index the dataset's {dataset.states.shape[1]}-d state "
                             "(or set aux_state_coef=0)")
    with start_run(config, config.output_dir, config.threads, exempt=RESUMABLE) as run:
        return _fine_tune(config, run.directory, meta, spec, episodes, dataset, init, aux_dims, progress)


# options that may differ when a run is resumed: its budget, bookkeeping and resources, not what it learns
RESUMABLE = ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "threads", "resume", "device")


def _fine_tune(config: SFTConfig, out_dir: Path, meta: dict, spec: ObservationSpec, episodes: list, dataset: ChunkDataset,
               init, aux_dims: list[int], progress: bool) -> Path:
    log.info("datasets %s: %d episodes, %d samples", [config.dataset, *config.extra_datasets], len(episodes), len(dataset))

    torch.manual_seed(config.seed)
    if init is not None:
        model = init.train()
    else:
        vocabulary = dataset_suite(meta).vocabulary()
        model = VLAPolicy(build_policy_config(config.model, spec, dataset.statistics(), vocabulary))
    aux_head = None
    if config.aux_state_coef > 0:
        targets = dataset.states[:, aux_dims]
        aux_head = StatePredictionHead(_feature_dim(model, dataset), aux_dims, targets.mean(0), np.maximum(targets.std(0), 1e-3))
    device = resolve_device(config.device)
    model.to(device)
    if aux_head is not None:
        aux_head.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
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

    writer = open_tensorboard(out_dir, step)
    model.train()
    bar = tqdm(total=config.steps, initial=step, desc="sft", unit="step", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    views = len(camera_views(spec.camera))  # shifted one by one
    while step < config.steps:
        stop_if_requested()
        lr = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, step / config.steps)))  # cosine decay to zero
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = rng.integers(0, len(dataset), size=config.batch_size)
        sample = dataset.batch(indices)
        sample["image"] = random_shift(sample["image"], config.augment_shift, aug_gen, views)
        observations = {"image": sample["image"].numpy(), "proprio": sample["proprio"].numpy(),
                        "instruction": sample["instruction"]}
        with autocast:
            loss, mse, features = model.bc_loss(observations, sample["actions"], sample["action_pad"])
            aux_loss = None
            if aux_head is not None:
                aux_loss = aux_head.loss(features.float(), sample["state"].to(device))
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
            std = model.exploration_std()
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
            _checkpoint(out_dir, step, model, optimizer, rng, aug_gen, config.keep_checkpoints, aux_head)
    bar.close()
    writer.close()
    final = out_dir / "policy"
    model.save(final, metadata={
        "trained_by": "vlapt sft", "steps": step, "dataset": str(config.dataset),
        "extra_datasets": [str(d) for d in config.extra_datasets], "init_policy": config.init_policy,
        "demos_per_task": config.demos_per_task, "samples": len(dataset),
        "wall_time_s_this_session": time.perf_counter() - start,
    })
    log.info("final policy written to %s", final)
    return final


def _feature_dim(model, dataset: ChunkDataset) -> int:
    """Width of the features the policy's action head reads (what the auxiliary head regresses from)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        sample = dataset.batch(np.arange(1))
        features = model.bc_loss({"image": sample["image"].numpy(), "proprio": sample["proprio"].numpy(),
                                  "instruction": sample["instruction"]}, sample["actions"], sample["action_pad"]).features
    model.train(was_training)
    if features is None:
        raise ValueError(f"{type(model).__name__} exposes no features for the auxiliary state loss; set aux_state_coef=0")
    return int(features.shape[-1])


def _check_same_observations(what: str, observed: dict, dataset: str, expected: dict, fix: str) -> None:
    """Every dataset of one SFT run must see the scene the same way (the policy it continues: check_observed_as)."""
    differ = [k for k in observed if observed[k] != expected[k]]
    if differ:
        raise ValueError(f"{what} differs from {dataset} in " + ", ".join(
            f"{k} ({observed[k]} vs {expected[k]})" for k in differ) + f"; {fix}")


def _checkpoint(out_dir, step, model, optimizer, rng, aug_gen, keep: int, aux_head=None):
    tensors, state = capture_state(optimizer, rng, {"augment": aug_gen})
    if aux_head is not None:
        tensors.update({f"aux.{k}": v for k, v in aux_head.state_dict().items()})
    save_training_checkpoint(out_dir, step, model, tensors, state, keep=keep)
