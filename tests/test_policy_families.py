"""Each policy family end to end through the command line: `vlapt sft`, `vlapt train`, `vlapt eval`, `load_policy`.

Tiny: one task, two demonstrations, 32-px images, a few SFT steps and PPO iterations in process.
"""

import importlib.util
import json

import numpy as np
import pytest

import vlapt  # noqa: F401  (sets the headless GL backend before mujoco is imported)
from vlapt.cli.main import main
from vlapt.data.collect import CollectConfig, collect
from vlapt.policies import load_policy, read_config

TASK = "reach-v3"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("families") / "demos.hdf5"
    collect(CollectConfig(tasks=[TASK], demos_per_task=2, image_size=32, num_workers=0, output=str(path)), progress=False)
    return path


def _hf_model(tmp_path, family):
    pytest.importorskip("transformers")
    from tests.test_backbones import save_tiny_model
    from vlapt.envs import get_suite

    path = tmp_path / family
    if not path.exists():
        save_tiny_model(family, path, words=get_suite("mt10").vocabulary())
    return str(path)


FAMILIES = {
    # name: (SFT model options, PPO options, what must hold of the post-trained policy)
    "conv": (lambda tmp: [], ["freeze=[vision]"], "none"),
    "hf-clip-frozen": (lambda tmp: ["model.vision_backbone=hf", f"model.vision_backbone_path={_hf_model(tmp, 'clip')}",
                                    "model.vision_trainable=none"], [], "none"),
    "hf-smolvlm-lora": (lambda tmp: ["model.vision_backbone=hf", f"model.vision_backbone_path={_hf_model(tmp, 'smolvlm')}",
                                     "model.vision_trainable=none", "model.vision_lora_rank=2"], [], "none"),
    # a small VLM as the VLA's vision and language towers, both frozen (features cached)
    "hf-smolvlm-vla": (lambda tmp: ["model.vision_backbone=hf", f"model.vision_backbone_path={_hf_model(tmp, 'smolvlm')}",
                                    "model.vision_trainable=none", "model.language_backbone=hf",
                                    f"model.language_backbone_path={_hf_model(tmp, 'smolvlm')}",
                                    "model.language_trainable=none"], ["ema_decay=0.5"], "none"),
    "efficientnet-last2": (lambda tmp: ["model.vision_backbone=efficientnet_lite0", "model.vision_backbone_path=random",
                                        "model.vision_input_size=64", "model.vision_trainable=last_2"], [], "last_2"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_evaluates_and_serves_by_path(family, dataset, tmp_path, capsys):
    if family.startswith("efficientnet") and importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        pytest.skip("the efficientnet extra is not installed")
    model_options, ppo_options, trainable = FAMILIES[family]
    sft_dir, ppo_dir = tmp_path / "sft", tmp_path / "ppo"
    assert main(["sft", "--quiet", f"dataset={dataset}", f"output_dir={sft_dir}", "model.size=tiny", "model.chunk_len=5",
                 "steps=3", "batch_size=8", "warmup_steps=1", "checkpoint_every=3", "log_every=3", "threads=1",
                 *model_options(tmp_path)]) == 0
    recorded = json.loads((sft_dir / "run.json").read_text())  # how the SFT run was made, as `vlapt train` records
    assert recorded["command"].startswith("vlapt sft --quiet") and recorded["wall_time_s"] > 0 and recorded["commit"]
    assert main(["train", "--quiet", f"init_policy={sft_dir / 'policy'}", f"demos={dataset}", f"output_dir={ppo_dir}",
                 f"tasks=[{TASK}]", "envs_per_task=1", "horizon=2", "num_workers=0", "total_env_steps=20", "epochs=1",
                 "minibatch_size=4", "bc_batch_size=4", "eval_every=0", "value_warmup_iterations=1", "threads=1",
                 *(ppo_options or ["ema_decay=0"])]) == 0
    final = ppo_dir / "policy"
    assert read_config(final)["policy"]["vision_trainable"] == trainable
    assert main(["eval", "--quiet", "--policy", str(final), "--tasks", TASK, "--episodes", "1", "--workers", "0",
                 "max_episode_steps=10", "--output", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["per_task"][TASK]["episodes"] == 1
    policy = load_policy(final)
    observation = {"image": np.zeros((32, 32, 3), np.uint8), "proprio": np.zeros(len(policy.config.proprio_fields), np.float32),
                   "instruction": "reach the goal"}
    chunk = policy.predict(observation)
    assert chunk.shape == (5, policy.action_dim) and np.all(np.abs(chunk) <= 1)
