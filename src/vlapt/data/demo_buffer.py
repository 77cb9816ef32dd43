"""The self behaviour-cloning demonstration buffer.

Per task it holds up to ``capacity`` successful episodes, seeded with the SFT
demonstrations (the shortest ``capacity`` of them). Which of the policy's own successes
enter is the ``admission`` rule:

- ``"shorter"`` (the default): a success enters when the task's buffer has room, or when it
  is shorter (fewer env steps to success) than the longest stored episode, which it
  replaces. So the buffer drifts from the experts' solutions towards the policy's own,
  faster ones, and BC on it pulls the policy towards its best behaviour rather than back to
  the experts'. Lengths are compared across configurations, though, and some configurations
  are solved in half the steps of others whatever the strategy: the buffer fills with the
  easiest configurations, and a success on a hard one never enters.
- ``"advantage"``: a success enters when its discounted return beats the critic's value of
  its first observation, i.e. when it went better than the policy expected on *that*
  configuration (self-imitation learning's criterion); when the buffer is full it replaces
  the oldest stored episode (the demos go first). So the buffer follows the policy as it
  improves, holds its better-than-usual solutions of hard configurations as well as easy
  ones, and each new entry only has to beat the current policy, not the best episode ever
  stored.
- ``"pace"``: lengths are compared as a ratio to the scripted expert's steps on the *same*
  configuration (``reference_steps``, which the env measures at reset with
  ``EnvConfig.expert_reference``; a demonstration is the expert, so its ratio is 1). A success
  enters when the buffer has room or when its ratio is below the highest stored one, which it
  replaces. So only solutions faster than the experts' own replace the demos, on hard
  configurations as on easy ones, and the buffer keeps the fastest-for-their-configuration
  episodes the policy has found. It needs the simulator's expert, so it is for training in
  simulation.

Each episode is stored as BC samples: an observation and the action chunk that followed it
(raw action space, padded past the episode's end). Demonstrations give a sample at every
step; the policy's episodes give one per decision, where the image was rendered.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import torch

from vlapt.data.format import EpisodeData
from vlapt.envs.tasks import instruction_for


@dataclasses.dataclass
class BufferEpisode:
    task: str
    length: int  # env steps to success: what "shorter is better" compares
    images: np.ndarray  # (N, H, W, 3) uint8
    proprio: np.ndarray  # (N, P) float32
    actions: np.ndarray  # (N, h, A) float32, raw action space
    pad: np.ndarray  # (N, h) bool, True past the episode's end
    source: str  # "demo" or "self"
    demo_key: int = -1  # index in the seeding list for demos (they are re-read on resume, not stored)
    # self episodes: discounted return minus the critic's value of the first observation (what "advantage" admits on)
    advantage: float = math.nan
    # the scripted expert's steps to success on the same configuration (what "pace" divides by)
    reference_steps: float = math.nan

    @property
    def pace(self) -> float:
        """Steps to success relative to the expert's on the same configuration (NaN without a reference)."""
        return self.length / self.reference_steps if self.reference_steps > 0 else math.nan


def episode_from_demo(demo: EpisodeData, chunk_len: int, key: int) -> BufferEpisode:
    n = len(demo)
    idx = np.arange(n)[:, None] + np.arange(chunk_len)[None]
    pad = idx >= n
    return BufferEpisode(
        task=demo.task, length=n, images=demo.images, proprio=demo.proprio.astype(np.float32),
        actions=demo.actions[np.minimum(idx, n - 1)].astype(np.float32), pad=pad, source="demo", demo_key=key,
        reference_steps=float(n),  # the demo is the expert's own solution of its configuration
    )


ADMISSION_RULES = ("shorter", "advantage", "pace")


class DemoBuffer:
    def __init__(self, tasks: Sequence[str], capacity: int = 50, admit_self: bool = True, admission: str = "shorter"):
        if capacity < 1:
            raise ValueError(f"demo buffer capacity must be >= 1, got {capacity}")
        if admission not in ADMISSION_RULES:
            raise ValueError(f"buffer admission must be one of {', '.join(ADMISSION_RULES)}, got {admission!r}")
        self.admission = admission
        self.tasks = list(tasks)
        self.capacity = capacity
        self.admit_self = admit_self
        self.episodes: dict[str, list[BufferEpisode]] = {t: [] for t in self.tasks}
        self.admitted = 0
        self.replaced = 0

    # -- filling ------------------------------------------------------------------------------
    def seed(self, demos: Sequence[EpisodeData], chunk_len: int) -> None:
        for key, demo in enumerate(demos):  # the shortest demos, whatever the rule (all have pace 1)
            if demo.task in self.episodes:
                self._insert(episode_from_demo(demo, chunk_len, key), count=False, key=lambda e: e.length)

    def offer(self, episode: BufferEpisode) -> bool:
        """Admit a successful self-collected episode under the buffer's admission rule; True if it entered."""
        if episode.source == "self" and not self.admit_self:
            return False
        if self.admission == "advantage":
            if not episode.advantage > 0:  # NaN (no critic value recorded) never enters
                return False
            stored = self.episodes[episode.task]
            if len(stored) >= self.capacity:
                stored.pop(0)  # the oldest: entries are kept in the order they entered
                self.replaced += 1
            stored.append(episode)
            self.admitted += 1
            return True
        if self.admission == "pace":
            if not episode.pace >= 0:  # NaN (no expert reference recorded) never enters
                return False
            return self._insert(episode, count=True, key=lambda e: e.pace)
        return self._insert(episode, count=True, key=lambda e: e.length)

    def _insert(self, episode: BufferEpisode, count: bool, key) -> bool:
        """Append while there is room; else replace the stored episode with the largest key if this one's is smaller."""
        stored = self.episodes[episode.task]
        if len(stored) < self.capacity:
            stored.append(episode)
        else:
            worst = max(range(len(stored)), key=lambda i: key(stored[i]))
            if not key(episode) < key(stored[worst]):
                return False
            stored[worst] = episode
            self.replaced += count
        self.admitted += count
        return True

    # -- sampling -----------------------------------------------------------------------------
    def sample(self, batch_size: int, rng: np.random.Generator) -> dict:
        """Uniform over tasks, then episodes, then samples: long episodes and easy tasks don't dominate."""
        tasks = [t for t in self.tasks if self.episodes[t]]
        if not tasks:
            raise ValueError("the demo buffer is empty")
        images, proprio, actions, pad, instructions = [], [], [], [], []
        for task_i in rng.integers(0, len(tasks), size=batch_size):
            task = tasks[task_i]
            stored = self.episodes[task]
            ep = stored[rng.integers(0, len(stored))]
            j = rng.integers(0, len(ep.actions))
            images.append(ep.images[j])
            proprio.append(ep.proprio[j])
            actions.append(ep.actions[j])
            pad.append(ep.pad[j])
            instructions.append(instruction_for(task))
        return {
            "image": np.stack(images),
            "proprio": np.stack(proprio),
            "instruction": instructions,
            "actions": torch.from_numpy(np.stack(actions)),
            "action_pad": torch.from_numpy(np.stack(pad)),
        }

    # -- reporting and checkpoints ------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        eps = [e for stored in self.episodes.values() for e in stored]
        paces = [e.pace for e in eps if math.isfinite(e.pace)]
        return {
            "episodes": len(eps),
            "self_fraction": sum(e.source == "self" for e in eps) / max(1, len(eps)),
            "mean_length": float(np.mean([e.length for e in eps])) if eps else float("nan"),
            # mean steps relative to the expert's on the same configurations, over the episodes that have a reference
            # (all of them under "pace"; under the other rules only the demos, at 1)
            "mean_pace": float(np.mean(paces)) if paces else float("nan"),
            "admitted": self.admitted,
        }

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Self-collected episodes as tensors; demos by reference (they are re-read from the dataset)."""
        tensors: dict[str, torch.Tensor] = {}
        layout = {}
        for task, stored in self.episodes.items():
            entries = []
            for k, ep in enumerate(stored):
                if ep.source == "demo":
                    entries.append({"source": "demo", "demo_key": ep.demo_key})
                    continue
                prefix = f"buffer.{task}.{k}"
                tensors[f"{prefix}.images"] = torch.from_numpy(np.ascontiguousarray(ep.images))
                tensors[f"{prefix}.proprio"] = torch.from_numpy(ep.proprio)
                tensors[f"{prefix}.actions"] = torch.from_numpy(ep.actions)
                tensors[f"{prefix}.pad"] = torch.from_numpy(ep.pad)
                entries.append({"source": "self", "length": ep.length, "prefix": prefix,
                                "advantage": ep.advantage if math.isfinite(ep.advantage) else None,
                                "reference_steps": ep.reference_steps if math.isfinite(ep.reference_steps) else None})
            layout[task] = entries
        return tensors, {"layout": layout, "admitted": self.admitted, "replaced": self.replaced}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict, demos: Sequence[EpisodeData], chunk_len: int) -> None:
        self.episodes = {t: [] for t in self.tasks}
        for task, entries in meta["layout"].items():
            for entry in entries:
                if entry["source"] == "demo":
                    key = entry["demo_key"]
                    self.episodes[task].append(episode_from_demo(demos[key], chunk_len, key))
                else:
                    p = entry["prefix"]
                    self.episodes[task].append(BufferEpisode(
                        task=task, length=int(entry["length"]), images=tensors[f"{p}.images"].numpy(),
                        proprio=tensors[f"{p}.proprio"].numpy(), actions=tensors[f"{p}.actions"].numpy(),
                        pad=tensors[f"{p}.pad"].numpy(), source="self",
                        advantage=math.nan if entry.get("advantage") is None else float(entry["advantage"]),  # older checkpoints: none
                        reference_steps=math.nan if entry.get("reference_steps") is None else float(entry["reference_steps"]),
                    ))
        self.admitted = int(meta["admitted"])
        self.replaced = int(meta["replaced"])
