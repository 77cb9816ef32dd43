"""Every env slot in the calling process: no workers, for tests, debugging and tiny runs."""

from __future__ import annotations

from typing import Any

import numpy as np

from vlapt.envs.pools import Slots, spread_groups
from vlapt.interfaces import SlotSpec, StepResult


class InProcessPool:
    """`EnvPool` whose slots step when submitted; ``wait`` hands back the stored answer."""

    def __init__(self, slots: list[SlotSpec], num_workers: int = 0):
        self.specs = list(slots)
        self.slots = Slots(dict(enumerate(self.specs)))
        self._answers: dict[int, dict[int, StepResult]] = {}
        self._next_ticket = 0

    def __len__(self) -> int:
        return len(self.specs)

    def reset(self, requests: dict[int, dict]) -> dict[int, tuple[dict, dict]]:
        return self.slots.run("reset", _checked(requests, len(self)))

    def submit(self, actions: dict[int, np.ndarray], reset_options: dict[int, dict] | None = None) -> int:
        payload = {i: (a, None if reset_options is None else reset_options.get(i)) for i, a in _checked(actions, len(self)).items()}
        ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
        self._answers[ticket] = self.slots.run("step", payload)
        return ticket

    def wait(self, ticket: Any) -> dict[int, StepResult]:
        return self._answers.pop(ticket)

    def groups(self, count: int) -> list[list[int]]:
        return spread_groups([0] * len(self), count)

    def close(self) -> None:
        self.slots.close()

    def __enter__(self) -> "InProcessPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _checked(payload: dict, size: int) -> dict:
    unknown = [i for i in payload if not 0 <= i < size]
    if unknown:
        raise IndexError(f"no env slots {unknown}; the pool has {size}")
    return payload
