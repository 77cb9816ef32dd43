"""The seams of vlapt: the types every package shares and the protocols it is extended through.

Data flows one way: an `EnvSuite` builds chunked envs, an `EnvPool` runs them in slots, a
rollout turns slots and a `ChunkPolicy` into `Episode`s and batches, a buffer keeps episodes,
an algorithm turns batches and buffers into updates of the policy, and evaluation reads saved
policies. A new env suite, pool backend, policy family or algorithm is one new module that
implements one of these protocols (docs/architecture.md shows each).

Everything here is plain data and typing: this module imports nothing else of vlapt.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np

# An observation as envs emit it and policies read it:
#   "image": uint8 (H, W, 3) RGB, upright; "proprio": float32 (P,); "instruction": str;
#   "state": float32 (S,) privileged simulator state, only when an env is asked for it (experts read
#   it, policies never do). A batch holds the same keys with a leading batch dimension, and
#   "instruction" a list of B strings.
Observation = Mapping[str, Any]

SPLITS: tuple[str, ...] = ("train", "eval")  # configurations that training draws from, and held-out ones


class UnknownTaskError(ValueError):
    """A task or suite name that does not exist; the message lists valid ones."""


def stack_observations(observations: list[Observation]) -> dict[str, Any]:
    """A list of per-env observation dicts -> one batched dict (strings stay a list)."""
    out: dict[str, Any] = {}
    for key in observations[0].keys():
        values = [obs[key] for obs in observations]
        out[key] = values if isinstance(values[0], str) else np.stack(values)
    return out


# -- env side -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class EnvConfig:
    """How an episode is observed and run; shared by collection, training and evaluation."""

    # the suite's camera name; "": the suite's default view. Several names joined by "+" ("corner+corner2") are
    # rendered image_size x image_size each and placed side by side: the image is (image_size, views * image_size)
    camera: str = ""
    image_size: int = 96
    camera_fovy: float = 0.0  # vertical field of view in degrees; 0 keeps the camera's own
    render: bool = True  # False for state-only agents (e.g. scripted experts)
    privileged_state: bool = False  # add observation["state"] for experts and auxiliary targets
    max_episode_steps: int = 500
    fast_render: bool = True  # no MSAA, shadows or reflections: much cheaper in software, the same at policy sizes
    # > 0: also render a (video_size, views * video_size) frame of the same camera after every env step, for people to
    # watch (reset and step report them in info["frames"]; reset option "video": False skips an episode);
    # the policy's observations are unchanged. 0: none
    video_size: int = 0


VIEW_SEPARATOR = "+"


def camera_views(camera: str) -> tuple[str, ...]:
    """The views a camera setting names, left to right in the image: ``"corner+corner2"`` is two; ``""`` is one
    (the suite's default)."""
    return tuple(camera.split(VIEW_SEPARATOR)) if camera else ("",)


def split_views(images, views: int):
    """Images of ``views`` square views side by side, ``(N, S, V*S, C)``, -> the views one by one, ``(N*V, S, S, C)``
    (each image's views consecutive, left to right); numpy arrays or torch tensors. ``join_views`` undoes it."""
    n, height, width, channels = images.shape
    if views < 1 or width != views * height:
        raise ValueError(f"images of shape {tuple(images.shape)} are not {views} square view(s) side by side")
    return images.reshape(n, height, views, height, channels).swapaxes(1, 2).reshape(n * views, height, height, channels)


def join_views(images, views: int):
    """The views one by one, ``(N*V, S, S, C)``, -> side by side, ``(N, S, V*S, C)``: the inverse of ``split_views``."""
    n_views, height, width, channels = images.shape
    if views < 1 or n_views % views or width != height:
        raise ValueError(f"images of shape {tuple(images.shape)} are not square views in groups of {views}")
    n = n_views // views
    return images.reshape(n, views, height, width, channels).swapaxes(1, 2).reshape(n, height, views * width, channels)


@dataclasses.dataclass(frozen=True)
class ObservationSpec:
    """What a suite's envs emit under one `EnvConfig`, as policies and datasets record it."""

    camera: str
    image_size: int
    camera_fovy: float
    proprio_fields: tuple[str, ...]
    action_dim: int
    state_dim: int = 0  # length of observation["state"] (privileged; never a policy input)
    # indices into the state that are worth predicting as auxiliary targets (e.g. object and goal positions)
    aux_targets: tuple[int, ...] = ()


@runtime_checkable
class ChunkedEnv(Protocol):
    """A gymnasium env over one task whose action is a chunk of actions.

    ``reset(options={"split": "train" | "eval", "index": i})`` starts configuration i of that
    split (objects and goals placed from the suite's own seeded stream); ``step(chunk)`` runs
    the chunk's ``(n, action_dim)`` actions one by one, clipped to the action bounds, stops at
    the first success or the step limit, renders once, and reports in ``info``: ``rewards``
    (per executed step), ``steps`` (executed), ``success`` and ``episode_steps`` (so far).
    """

    task: str
    instruction: str

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]: ...

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]: ...

    def render(self) -> np.ndarray: ...

    def close(self) -> None: ...


@runtime_checkable
class Agent(Protocol):
    """Anything that acts on a batch of observations: scripted experts, saved policies, served ones."""

    name: str
    chunk_len: int

    def observation_config(self) -> EnvConfig:
        """The camera, image size and state the agent needs to see."""

    def act(self, observations: Sequence[Observation], tasks: Sequence[str]) -> list[np.ndarray]:
        """One action chunk ``(n, action_dim)`` per observation."""


@runtime_checkable
class EnvSuite(Protocol):
    """A benchmark as a VLA sees it: tasks with instructions, chunked envs, configurations, experts.

    Suites must be picklable (env workers in other processes build their envs from it).
    """

    name: str  # what configs and datasets call it, e.g. "mt10"
    family: str  # the simulator family, e.g. "metaworld": suites of one family share tasks and datasets
    tasks: tuple[str, ...]  # the default task list
    max_episode_steps: int  # the simulator's own limit
    expert_names: tuple[str, ...]

    def check_task(self, task: str) -> str:
        """``task`` if the family has it; else a ValueError naming valid tasks."""

    def resolve_tasks(self, tasks: Sequence[str] | str | None = None) -> tuple[str, ...]:
        """An explicit task list (checked), or the suite's own."""

    def instruction(self, task: str) -> str: ...

    def vocabulary(self) -> list[str]:
        """Every instruction of the family: what a policy's tokenizer is built from."""

    def check_env_config(self, config: EnvConfig) -> EnvConfig:
        """The config with the suite's defaults filled in (e.g. the camera), or a ValueError."""

    def observation_spec(self, config: EnvConfig) -> ObservationSpec: ...

    def make_env(self, task: str, config: EnvConfig, chunk_len: int = 1, config_seed: int = 0) -> ChunkedEnv: ...

    def configuration(self, task: str, split: str, index: int, seed: int = 0) -> dict:
        """A JSON-able description of configuration ``index`` of ``split`` (what reset places)."""

    def make_expert(self, name: str) -> Agent: ...


class StepResult(NamedTuple):
    observation: dict
    reward: float
    terminated: bool
    truncated: bool
    info: dict
    reset_observation: dict | None = None  # the next episode's first observation, when the slot was reset


@dataclasses.dataclass(frozen=True)
class SlotSpec:
    """One env slot of a pool: which suite and task, observed how."""

    suite: EnvSuite
    task: str
    env: EnvConfig
    chunk_len: int = 1
    config_seed: int = 0

    def build(self) -> ChunkedEnv:
        return self.suite.make_env(self.task, self.env, chunk_len=self.chunk_len, config_seed=self.config_seed)


@runtime_checkable
class EnvPool(Protocol):
    """Env slots (any mix of tasks) addressed by index; only the slots named in a call are touched.

    ``submit`` steps slots without waiting for them, so a caller can compute the next chunks of
    one group of slots while another group's envs run; each slot answers in submission order.
    """

    def __len__(self) -> int: ...

    def reset(self, requests: dict[int, dict]) -> dict[int, tuple[dict, dict]]:
        """Reset slots with their reset options; ``(observation, info)`` per slot."""

    def submit(self, actions: dict[int, np.ndarray], reset_options: dict[int, dict] | None = None) -> Any:
        """Step slots with one chunk each; a slot whose episode ends is reset at once with its
        ``reset_options`` (when given). Returns a ticket for `wait`."""

    def wait(self, ticket: Any) -> dict[int, StepResult]: ...

    def groups(self, count: int) -> list[list[int]]:
        """The slots split into ``count`` groups, each spread over every worker (empty groups dropped)."""

    def close(self) -> None: ...


# -- episodes -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Episode:
    """One episode: where it ran, how it ended and, when recorded, what was seen and done.

    A recorded trajectory has one row of ``images``/``proprio``/``states`` per *decision* (the
    observation the agent acted on) and one row of ``actions``/``rewards`` per *env step*;
    ``decision_steps[k]`` is the env step at which decision k began (0, n_0, n_0 + n_1, ...).
    For per-step data (demonstrations) every step is a decision. ``actions`` are the labels:
    what the agent chose (the env clips them to the action bounds when it executes them).
    """

    task: str
    instruction: str
    success: bool
    steps: int  # env steps executed: to the first success, or to the step limit
    split: str = "train"
    config_index: int = -1
    config_seed: int = 0
    source: str = "policy"  # who acted: "scripted", "policy", "relabelled" (expert labels on a policy's states)
    images: np.ndarray | None = None  # (N, H, W, 3) uint8
    proprio: np.ndarray | None = None  # (N, P) float32
    states: np.ndarray | None = None  # (N, S) float32 privileged state
    actions: np.ndarray | None = None  # (steps, A) float32
    rewards: np.ndarray | None = None  # (steps,) float32
    decision_steps: np.ndarray | None = None  # (N,) int; None: every step is a decision
    frames: np.ndarray | None = None  # (steps + 1, H, W, 3) uint8 video frames (EnvConfig.video_size), when asked

    def __len__(self) -> int:
        return self.steps

    @property
    def decisions(self) -> np.ndarray:
        return np.arange(self.steps) if self.decision_steps is None else self.decision_steps

    def summary(self) -> dict:
        """The fields an evaluation result keeps per episode."""
        return {"task": self.task, "config_index": self.config_index, "success": bool(self.success), "steps": int(self.steps)}

    def record(self, observations: Sequence[Observation], chunks: Sequence[np.ndarray]) -> "Episode":
        """Fill in the trajectory from the observation each decision acted on and the actions it ran (a chunk each)."""
        lengths = np.array([len(c) for c in chunks])
        self.images = np.stack([o["image"] for o in observations]) if "image" in observations[0] else None
        self.proprio = np.stack([o["proprio"] for o in observations]).astype(np.float32)
        self.states = np.stack([o["state"] for o in observations]).astype(np.float32) if "state" in observations[0] else None
        self.actions = np.concatenate(chunks).astype(np.float32)
        self.decision_steps = np.cumsum(lengths) - lengths
        return self


# -- policies -----------------------------------------------------------------------------------------
class ChunkSample(NamedTuple):
    actions: Any  # (B, h, A) tensor in the policy's own action space: what `evaluate` scores
    env_actions: np.ndarray  # (B, h, A) the same chunks in env units, unclipped (the env clips)
    log_prob: np.ndarray  # (B,) of each whole chunk
    value: np.ndarray  # (B,)


class ChunkEvaluation(NamedTuple):
    log_prob: Any  # (B,) tensor: of each whole chunk, or of its first `steps` actions
    entropy: Any  # (B,)
    value: Any  # (B,)


class BCLoss(NamedTuple):
    loss: Any  # scalar tensor to minimise
    mse: Any  # scalar, detached: squared error of the mean, for logs
    features: Any = None  # (B, F) what the action head read, for auxiliary heads (may be None)


@runtime_checkable
class ChunkPolicy(Protocol):
    """A policy over action chunks, as every algorithm, buffer and evaluation sees it.

    Implementations are torch modules (parameters, ``state_dict``, ``train()``/``eval()``). They
    take raw observation batches (numpy images, proprio, instruction strings) and own all their
    preprocessing, their action normalisation and their likelihood, so chunked PPO needs from
    them only what is below. ``load_policy(path)`` rebuilds any family from what ``save`` wrote.
    """

    chunk_len: int
    action_dim: int

    def observation_config(self) -> EnvConfig:
        """The env settings that render what this policy was trained on."""

    def act(self, observations: Observation, deterministic: bool = False, generator: Any = None) -> ChunkSample:
        """Sample (or, deterministic, take the mode of) one chunk per observation, with log-probs and values."""

    def evaluate(self, observations: Observation, actions: Any, steps: int = 0) -> ChunkEvaluation:
        """Score given chunks (in the policy's action space); ``steps`` > 0: their first ``steps`` actions only."""

    def value(self, observations: Observation) -> np.ndarray:
        """The critic's value of each observation, ``(B,)``."""

    def bc_loss(self, observations: Observation, actions: Any, pad: Any) -> BCLoss:
        """Behaviour cloning of env-unit chunks ``(B, h, A)``; ``pad`` ``(B, h)`` marks entries to ignore."""

    def param_groups(self) -> dict[str, list]:
        """Parameters by role for the optimiser: ``"actor"`` (incl. shared trunk) and ``"critic"``."""

    def reset_exploration(self, log_std: float) -> None:
        """Set the exploration noise (log standard deviation, in the policy's action units)."""

    def exploration_std(self) -> float: ...

    def predict_batch(self, observations: Observation, deterministic: bool = True) -> np.ndarray:
        """Executable chunks ``(B, h, A)``, float32, clipped to the action bounds."""

    def save(self, path: str | Path, metadata: dict | None = None) -> Path: ...
