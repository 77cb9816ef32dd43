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


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    """A tiny untrained VLA that reads every MT10/MT50 instruction and sees 32 px images: for inference paths."""
    from vlapt.envs import get_suite
    from vlapt.policies.vla import Tokenizer, VLAPolicy, policy_config_for_size

    tokenizer = Tokenizer.build(get_suite("mt10").vocabulary())
    torch.manual_seed(0)
    policy = VLAPolicy(policy_config_for_size("tiny", image_size=32, vocab=tokenizer.vocab))
    return policy.save(tmp_path_factory.mktemp("policy") / "policy")
