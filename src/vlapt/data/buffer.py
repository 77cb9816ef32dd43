"""The self behaviour-cloning buffer: per task, a bounded store of successful episodes as BC samples.

It is seeded with demonstrations and may take the policy's own successes; which ones enter is
the algorithm's rule (`vlapt.algorithms.ppo_sbc.keep_shortest`), built on `put` and `entries`.
Each stored episode is kept as BC samples: the observation at each decision and the action
chunk that followed it (`vlapt.data.chunks.chunk_targets`). Demonstrations give a sample at
every step; a chunked policy's episodes give one per decision, where an image was rendered.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from vlapt.data.chunks import chunk_targets
from vlapt.interfaces import Episode


@dataclasses.dataclass
class Stored:
    """An episode in the buffer with its BC samples (chunks in env units, padding flagged)."""

    episode: Episode
    targets: np.ndarray  # (N, h, A)
    pad: np.ndarray  # (N, h) bool
    demo_key: int = -1  # index in the seeding list for demonstrations (re-read on resume, not stored)

    @property
    def length(self) -> int:
        return self.episode.steps

    @property
    def is_demo(self) -> bool:
        return self.demo_key >= 0


class DemoBuffer:
    def __init__(self, tasks: Sequence[str], capacity: int, chunk_len: int):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.tasks = list(tasks)
        self.capacity = capacity
        self.chunk_len = chunk_len
        self._entries: dict[str, list[Stored]] = {t: [] for t in self.tasks}
        self.admitted = 0  # the policy's own episodes that entered
        self.replaced = 0  # ... and took the place of another

    def entries(self, task: str) -> list[Stored]:
        return self._entries[task]

    def has_room(self, task: str) -> bool:
        return len(self._entries[task]) < self.capacity

    def put(self, episode: Episode, replace: int | None = None, demo_key: int = -1) -> None:
        """Store a successful episode, at the end or in place of entry ``replace`` of its task."""
        if not episode.success:
            raise ValueError("only successful episodes are imitated; this one failed")
        if episode.task not in self._entries:
            raise ValueError(f"the buffer holds tasks {self.tasks}, not {episode.task!r}")
        targets, pad = chunk_targets(episode.actions, episode.decisions, self.chunk_len)
        entry = Stored(episode, targets, pad, demo_key)
        stored = self._entries[episode.task]
        if replace is None:
            if len(stored) >= self.capacity:
                raise ValueError(f"the buffer of {episode.task} is full ({self.capacity}); name an entry to replace")
            stored.append(entry)
        else:
            stored[replace] = entry
        if demo_key < 0:
            self.admitted += 1
            self.replaced += replace is not None

    # -- sampling -------------------------------------------------------------------------------------
    def sample(self, batch_size: int, rng: np.random.Generator) -> dict:
        """Uniform over tasks, then episodes, then samples: long episodes and easy tasks don't dominate."""
        tasks = [t for t in self.tasks if self._entries[t]]
        if not tasks:
            raise ValueError("the buffer is empty")
        images, proprio, actions, pad, instructions = [], [], [], [], []
        for task_i in rng.integers(0, len(tasks), size=batch_size):
            stored = self._entries[tasks[task_i]]
            entry = stored[rng.integers(0, len(stored))]
            j = rng.integers(0, len(entry.targets))
            images.append(entry.episode.images[j])
            proprio.append(entry.episode.proprio[j])
            actions.append(entry.targets[j])
            pad.append(entry.pad[j])
            instructions.append(entry.episode.instruction)
        return {
            "image": np.stack(images),
            "proprio": np.stack(proprio),
            "instruction": instructions,
            "actions": torch.from_numpy(np.stack(actions)),
            "action_pad": torch.from_numpy(np.stack(pad)),
        }

    # -- reporting and checkpoints --------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        entries = [e for stored in self._entries.values() for e in stored]
        return {
            "episodes": len(entries),
            "self_fraction": sum(not e.is_demo for e in entries) / max(1, len(entries)),
            "mean_length": float(np.mean([e.length for e in entries])) if entries else float("nan"),
            "admitted": self.admitted,
        }

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The policy's own episodes as tensors; demonstrations by reference (they are re-read from the dataset)."""
        tensors: dict[str, torch.Tensor] = {}
        layout = {}
        for task, stored in self._entries.items():
            rows = []
            for k, entry in enumerate(stored):
                if entry.is_demo:
                    rows.append({"demo_key": entry.demo_key})
                    continue
                prefix, ep = f"buffer.{task}.{k}", entry.episode
                for name, array in (("images", ep.images), ("proprio", ep.proprio), ("actions", ep.actions),
                                    ("decision_steps", ep.decisions)):
                    tensors[f"{prefix}.{name}"] = torch.from_numpy(np.ascontiguousarray(array))
                rows.append({"prefix": prefix, "steps": ep.steps, "instruction": ep.instruction, "source": ep.source,
                             "config_index": ep.config_index})
            layout[task] = rows
        return tensors, {"layout": layout, "admitted": self.admitted, "replaced": self.replaced, "version": 2}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict, demos: Sequence[Episode]) -> None:
        if meta.get("version") != 2:
            raise ValueError("the checkpoint's buffer was written by an earlier vlapt version; resume the run with that "
                             "version, or start a new run in another output_dir")
        self._entries = {t: [] for t in self.tasks}
        admitted, replaced = int(meta["admitted"]), int(meta["replaced"])
        for task, rows in meta["layout"].items():
            for row in rows:
                if "demo_key" in row:
                    self.put(demos[row["demo_key"]], demo_key=row["demo_key"])
                    continue
                p = row["prefix"]
                self.put(Episode(
                    task=task, instruction=row["instruction"], success=True, steps=int(row["steps"]),
                    config_index=int(row["config_index"]), source=row["source"],
                    images=tensors[f"{p}.images"].numpy(), proprio=tensors[f"{p}.proprio"].numpy(),
                    actions=tensors[f"{p}.actions"].numpy(), decision_steps=tensors[f"{p}.decision_steps"].numpy()))
        self.admitted, self.replaced = admitted, replaced
