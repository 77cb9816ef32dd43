"""Object/goal configurations that never leak from training into evaluation.

A MetaWorld configuration is the task's random vector (object and goal positions).
MetaWorld's own benchmarks draw 50 fixed configurations per task from one global seed,
and `reset(seed=...)` does not change them, so a held-out set has to be built on purpose.

Here every configuration has an identity ``(seed, task, split, index)`` and is drawn from
its own random stream, ``SeedSequence([seed, task_index, split_id, index])``. Training
(demonstrations and RL) only ever draws from the ``train`` split and evaluation only from
the ``eval`` split, so the two sets come from disjoint streams by construction, are
reproducible one by one (no need to draw the first 999 to get the 1000th), and do not
shift when a run asks for more of one split. MetaWorld's rejection sampling (e.g. a goal
too close to the object) is reused by letting the env draw from our stream.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import numpy as np

from vlapt.envs.metaworld._raw import make_raw_env
from vlapt.envs.metaworld.tasks import check_task, task_index
from vlapt.interfaces import SPLITS


@dataclasses.dataclass(frozen=True)
class Configuration:
    task: str
    split: str
    index: int
    seed: int
    rand_vec: tuple[float, ...]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown configuration split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


def _stream(seed: int, task: str, split: str, index: int) -> np.random.Generator:
    if index < 0:
        raise ValueError(f"configuration index must be >= 0, got {index}")
    if not 0 <= int(seed) < 2**32:  # two seeds must never share a stream
        raise ValueError(f"config_seed must be in [0, 2**32), got {seed}")
    entropy = [int(seed), task_index(task), SPLITS.index(check_split(split)), int(index)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


@lru_cache(maxsize=64)
def _sampler_env(task: str):
    """A render-less env of the task, kept per process, used only to draw valid configurations."""
    return make_raw_env(task)


def draw_configuration(raw_env, task: str, split: str, index: int, seed: int = 0) -> Configuration:
    """Reset a raw MetaWorld env of ``task`` into configuration (seed, split, index) and return it.

    The env is left in that configuration, but reset it once more before an episode: after the reset that draws
    it the simulator state is the configuration's, yet the rendered image can differ from that of the same
    configuration replayed (a few pixels of a red site marker); a second reset makes the two the same.
    """
    check_task(task)
    stream = _stream(seed, task, split, index)
    raw_env._freeze_rand_vec = False
    raw_env.seeded_rand_vec = True
    raw_env.np_random = stream
    raw_env.reset()
    raw_env._freeze_rand_vec = True
    rand_vec = tuple(float(x) for x in np.asarray(raw_env._last_rand_vec, dtype=np.float64))
    return Configuration(task=task, split=split, index=int(index), seed=int(seed), rand_vec=rand_vec)


def make_configuration(task: str, split: str, index: int, seed: int = 0) -> Configuration:
    return draw_configuration(_sampler_env(check_task(task)), task, split, index, seed)


def make_configurations(task: str, split: str, count: int, seed: int = 0, start: int = 0) -> list[Configuration]:
    if count < 0:
        raise ValueError(f"configuration count must be >= 0, got {count}")
    return [make_configuration(task, split, start + i, seed) for i in range(count)]
