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


@pytest.fixture
def load_script():
    """Import a file of scripts/ as a module: they are command-line tools, not part of the package."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
