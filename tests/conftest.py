import pytest
import torch

import vlapt  # noqa: F401  (sets the headless GL backend before any test imports mujoco)


@pytest.fixture(autouse=True)
def _few_threads():
    """One torch thread per test: tiny models gain nothing from more, and CI shares its 2 cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
