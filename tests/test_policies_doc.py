"""The worked example of docs/policies.md, a policy family of its own, through SFT, PPO, evaluation and loading."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import vlapt  # noqa: F401  (sets the headless GL backend before mujoco is imported)
from vlapt.algorithms.ppo_sbc import ppo_losses
from vlapt.cli.main import main
from vlapt.data.collect import CollectConfig, collect
from vlapt.policies import load_policy

DOC = Path(__file__).parents[1] / "docs" / "policies.md"
TASK = "reach-v3"


@pytest.fixture(scope="module")
def family():
    """The first python block under "A worked example", run as a module."""
    section = DOC.read_text().split("## A worked example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {"__name__": "docs_pixel_mlp"}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace["PixelMLPPolicy"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("doc_family") / "demos.hdf5"
    collect(CollectConfig(tasks=[TASK], demos_per_task=2, image_size=32, num_workers=0, output=str(path)), progress=False)
    return path


def _obs(batch=3, size=32):
    rng = np.random.default_rng(0)
    return {"image": rng.integers(0, 255, (batch, size, size, 3), dtype=np.uint8),
            "proprio": rng.normal(size=(batch, 4)).astype(np.float32), "instruction": ["reach the goal"] * batch}


def test_the_example_gives_chunked_ppo_consistent_likelihoods(family):
    torch.manual_seed(0)
    policy = family(image_size=32)
    sample = policy.act(_obs())
    policy.train()
    log_prob, entropy, value = policy.evaluate(_obs(), sample.actions)
    np.testing.assert_allclose(log_prob.detach().numpy(), sample.log_prob, rtol=1e-5)
    ones = torch.ones(3)
    policy_loss, value_loss, *_ = ppo_losses(policy, _obs(), sample.actions, torch.from_numpy(sample.log_prob),
                                             torch.from_numpy(sample.value), ones, ones, 0.2, 0.2)
    (policy_loss + value_loss).backward()
    assert policy.log_std.grad is not None and policy.value_head.weight.grad is not None
    first = policy.evaluate(_obs(), sample.actions, steps=2).log_prob
    assert torch.all(first > log_prob)  # a prefix's density: fewer entries, each below one at this std


def test_the_example_trains_evaluates_and_loads_through_the_command_line(family, dataset, tmp_path):
    torch.manual_seed(0)
    family(image_size=32).save(tmp_path / "init")
    assert main(["sft", "--quiet", f"dataset={dataset}", f"init_policy={tmp_path / 'init'}",
                 f"output_dir={tmp_path / 'sft'}", "steps=3", "batch_size=8", "warmup_steps=1", "checkpoint_every=3",
                 "log_every=3", "threads=1"]) == 0
    assert main(["train", "--quiet", f"init_policy={tmp_path / 'sft' / 'policy'}", f"demos={dataset}",
                 f"output_dir={tmp_path / 'ppo'}", f"tasks=[{TASK}]", "envs_per_task=1", "horizon=2", "num_workers=0",
                 "total_env_steps=20", "epochs=1", "minibatch_size=4", "bc_batch_size=4", "eval_every=0",
                 "value_warmup_iterations=1", "threads=1"]) == 0
    final = tmp_path / "ppo" / "policy"
    assert main(["eval", "--quiet", "--policy", str(final), "--tasks", TASK, "--episodes", "1", "--workers", "0",
                 "max_episode_steps=10", "--output", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["per_task"][TASK]["episodes"] == 1
    policy = load_policy(final)
    assert type(policy).__name__ == "PixelMLPPolicy"
    chunk = policy.predict({"image": np.zeros((32, 32, 3), np.uint8), "proprio": np.zeros(4, np.float32),
                            "instruction": "reach the goal"})
    assert chunk.shape == (5, 4)


def test_a_family_that_cannot_freeze_is_refused_before_a_run_starts(family, dataset, tmp_path, capsys):
    family(image_size=32).save(tmp_path / "init")
    code = main(["train", "--quiet", f"init_policy={tmp_path / 'init'}", f"demos={dataset}", f"output_dir={tmp_path / 'ppo'}",
                 f"tasks=[{TASK}]", "freeze=[vision]"])
    assert code == 2
    assert "'pixel-mlp' cannot freeze" in capsys.readouterr().err
    assert not (tmp_path / "ppo").exists()
