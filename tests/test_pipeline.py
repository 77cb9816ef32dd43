import json

import pytest

import vlapt  # noqa: F401
from vlapt.cli.main import main
from vlapt.config import ConfigError, load_config
from vlapt.algorithms.ppo_sbc import PPOConfig
from vlapt.algorithms.sft import SFTConfig
from vlapt.data import read_episodes
from vlapt.pipeline import PipelineConfig, load_pipeline_config, pipeline_config_class, run_pipeline


_TINY = [
    "collect.tasks=[reach-v3]", "collect.demos_per_task=2", "collect.image_size=32", "collect.num_workers=0",
    "sft.steps=4", "sft.batch_size=8", "sft.model.size=tiny", "sft.threads=1",
    "ppo.envs_per_task=1", "ppo.horizon=4", "ppo.minibatch_size=8", "ppo.total_env_steps=30",
    "ppo.num_workers=0", "ppo.checkpoint_every=1", "ppo.eval_every=1", "ppo.eval_episodes=1", "ppo.threads=1",
    "eval.episodes_per_task=1", "eval.num_workers=0", "eval.max_episode_steps=40", "eval.video_size=64",
]


def _tiny_pipeline_with_average(tmp_path) -> PipelineConfig:
    # the one iteration is not a critic warm-up iteration, so the weight average has an iterate to average
    return load_config(PipelineConfig, overrides=[f"output_dir={tmp_path / 'run'}", *_TINY, "ppo.value_warmup_iterations=0"])


def test_the_results_table_has_a_column_per_success_within_limit():
    from vlapt.evaluation import summarize
    from vlapt.interfaces import Episode
    from vlapt.pipeline import results_markdown

    episodes = [Episode("reach-v3", "reach", True, 80, split="eval"), Episode("reach-v3", "reach", True, 300, split="eval")]
    rows = {"SFT": {**summarize(episodes, ["reach-v3"], 500), "protocol": {"max_episode_steps": 500}}}
    table = results_markdown(rows).splitlines()
    assert table[0] == ("| policy | success | steps to success | steps (failures = 500) | success within 100 |"
                        " success within 400 |")
    assert table[2] == "| SFT | 1.000 | 190.0 | 190.0 | 0.500 | 1.000 |"


def test_pipeline_runs_every_stage_and_reports_every_row(tmp_path, capsys):
    config = _tiny_pipeline_with_average(tmp_path)
    assert config.ppo.ema_decay > 0  # the default
    out = run_pipeline(config, progress=False)
    run = tmp_path / "run"
    assert (run / "demos.hdf5").is_file() and (run / "sft" / "policy" / "model.safetensors").is_file()
    assert (run / "ppo" / "policy" / "config.json").is_file() and (run / "ppo" / "history.json").is_file()
    assert list(out["rows"]) == ["scripted expert", "SFT", "SFT + chunked PPO + self-BC",
                                 "SFT + chunked PPO + self-BC, weight average"]
    report = (run / "results.md").read_text()
    for name in out["rows"]:
        assert f"| {name} |" in report
    assert "steps (failures = 40)" in report and "success within" not in report  # 40 steps speak for neither limit
    # one evaluation file per row, each holding its own policy's episodes, under the one protocol
    for file_key, agent in [("scripted", "scripted"), ("sft", str(run / "sft" / "policy")),
                            ("post_trained", str(run / "ppo" / "policy")),
                            ("post_trained_average", str(run / "ppo" / "policy_ema"))]:
        saved = json.loads((run / f"eval_{file_key}.json").read_text())
        assert saved["protocol"]["split"] == "eval" and agent in saved["agent"], (file_key, saved["agent"])
        assert saved["protocol"]["suite"] == "mt10" and saved["protocol"]["max_episode_steps"] == 40
        assert saved["protocol"]["tasks"] == ["reach-v3"] and len(saved["episodes"]) == 1
        if file_key != "scripted":
            assert saved["protocol"]["deterministic"] is True  # the default protocol: the policy's mean chunk
    assert set(json.loads((run / "timings.json").read_text())) == {"collect_s", "sft_s", "post_train_s", "eval_s"}
    # the stages are wired to each other and to the suite
    assert config.ppo.init_policy == str(run / "sft" / "policy") and config.sft.dataset == str(run / "demos.hdf5")
    assert config.ppo.tasks == config.eval.tasks == ["reach-v3"]
    assert config.ppo.suite == config.eval.suite == config.collect.suite == "mt10"
    # post-training evaluated its starting policy and its checkpoints on held-out configurations (ppo.eval_*)
    history = json.loads((run / "ppo" / "history.json").read_text())
    evals = sorted(p.name for p in (run / "ppo" / "evals").glob("iteration_*.json"))
    assert evals == [f"iteration_{i:06d}.json" for i in range(len(history) + 1)]
    periodic = json.loads((run / "ppo" / "evals" / evals[-1]).read_text())
    assert periodic["protocol"]["split"] == "eval" and periodic["protocol"]["episodes_per_task"] == 1
    assert periodic["protocol"]["tasks"] == ["reach-v3"] and str(run / "ppo" / "checkpoints") in periodic["agent"]

    # the final policy's first episodes are filmed, the run's making is recorded, and the report is written
    post_trained = json.loads((run / "eval_post_trained.json").read_text())
    assert post_trained["row"] == "SFT + chunked PPO + self-BC" and post_trained["video_dir"] == "videos/post_trained"
    assert [v["task"] for v in post_trained["videos"]] == ["reach-v3"]  # video_episodes=2, but 1 episode per task
    assert (run / "videos" / "post_trained" / post_trained["videos"][0]["files"]["mp4"]).is_file()
    assert "videos" not in json.loads((run / "eval_sft.json").read_text()), "only the final policy by default"
    provenance = json.loads((run / "run.json").read_text())
    assert set(provenance) == {"command", "commit", "machine", "started", "finished", "wall_time_s", "post_training_dir"}
    assert provenance["post_training_dir"] == "ppo"
    assert provenance["commit"] != "" and provenance["wall_time_s"] > 0
    assert out["report"] == run / "report.html"
    page = out["report"].read_text()
    assert page.count("data:video/mp4;base64,") == 1 and "data:image/png;base64," in page
    assert f"report: {run / 'report.html'}" in capsys.readouterr().out

    # a second run reuses the demonstrations and resumes the finished trainings instead of redoing them
    before = (run / "demos.hdf5").stat().st_mtime_ns
    run_pipeline(_tiny_pipeline_with_average(tmp_path), progress=False)
    assert (run / "demos.hdf5").stat().st_mtime_ns == before
    history = json.loads((run / "ppo" / "history.json").read_text())
    assert [row["iteration"] for row in history] == sorted({row["iteration"] for row in history})

    # learning curves of the RL run
    capsys.readouterr()
    assert main(["plot", str(run / "ppo"), "--output", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_pipeline_with_a_dagger_round_post_trains_the_relabelled_policy(tmp_path):
    overrides = ["dagger_rounds=1", "relabel.episodes_per_task=1", "relabel.num_workers=0", "relabel.max_episode_steps=10",
                 "dagger_sft.steps=2", "dagger_sft.batch_size=8", "dagger_sft.threads=1", "evaluate_scripted=false",
                 "ppo.eval_every=0"]
    config = load_config(PipelineConfig, overrides=[*_TINY, f"output_dir={tmp_path / 'run'}", *overrides])
    out = run_pipeline(config, progress=False)
    run = tmp_path / "run"
    # its one post-training iteration is the critic warm-up: no weight average to report
    assert list(out["rows"]) == ["SFT", "SFT + DAgger (1 round)", "SFT + DAgger + chunked PPO + self-BC"]
    assert not (run / "ppo" / "policy_ema").exists()
    assert config.ppo.init_policy == str(run / "sft_dagger_1" / "policy")
    assert read_episodes(run / "relabelled_1.hdf5")[0].source == "relabelled"
    dagger_run = load_config(SFTConfig, run / "sft_dagger_1" / "config.yaml")
    assert dagger_run.init_policy == str(run / "sft" / "policy")
    assert dagger_run.extra_datasets == [str(run / "relabelled_1.hdf5")] and dagger_run.dataset == str(run / "demos.hdf5")
    assert "dagger" in json.loads((run / "eval_dagger.json").read_text())["agent"]
    assert "dagger_s" in out["timings"]


def test_pipeline_evaluates_every_policy_row_under_the_eval_protocol(tmp_path):
    """eval.execute_steps and eval.deterministic apply to the SFT and post-trained rows alike; the scripted experts
    decide at every step whatever they say, and the reference row is the experts that made the demonstrations."""
    config = load_config(PipelineConfig, overrides=[*_TINY, f"output_dir={tmp_path / 'run'}", "eval.execute_steps=2",
                                                    "eval.deterministic=false", "ppo.eval_every=0",
                                                    "ppo.value_warmup_iterations=0", "collect.expert=scripted-fast",
                                                    "collect.expert_per_task.reach-v3=scripted"])
    out = run_pipeline(config, progress=False)
    run = tmp_path / "run"
    suffix = " (first 2 actions of each chunk), sampled chunks"
    expert = "scripted-fast; scripted on reach-v3"  # the experts that made the demonstrations, task by task
    assert list(out["rows"]) == [f"scripted expert ({expert})", f"SFT{suffix}",
                                 f"SFT + chunked PPO + self-BC{suffix}", f"SFT + chunked PPO + self-BC, weight average{suffix}"]
    assert json.loads((run / "eval_scripted.json").read_text())["agent"] == expert
    protocols = {key: json.loads((run / f"eval_{key}.json").read_text())["protocol"]
                 for key in ("scripted", "sft", "post_trained", "post_trained_average")}
    for key in ("sft", "post_trained", "post_trained_average"):
        assert protocols[key]["execute_steps"] == 2 and protocols[key]["chunk_len"] == 10, key
        assert protocols[key]["deterministic"] is False, key
    assert protocols["scripted"]["execute_steps"] == protocols["scripted"]["chunk_len"] == 1
    assert not (run / "ppo" / "evals").exists(), "ppo.eval_every=0: no periodic evaluation"

    with pytest.raises(ValueError, match="exceeds sft.model.chunk_len"):  # before any stage runs
        run_pipeline(load_config(PipelineConfig, overrides=[*_TINY, f"output_dir={tmp_path / 'bad'}",
                                                            "eval.execute_steps=11"]), progress=False)
    assert not (tmp_path / "bad").exists()
    for late in ("relabel.env_backend=no-such-pool", "dagger_sft.steps=0", "ppo.bc_coef=-1", "eval.episodes_per_task=0"):
        with pytest.raises(ValueError):  # a late stage's bad option stops the run before collect writes anything
            run_pipeline(load_config(PipelineConfig, overrides=[*_TINY, f"output_dir={tmp_path / 'late'}",
                                                                "dagger_rounds=1", late]), progress=False)
        assert not (tmp_path / "late").exists(), late
    with pytest.raises(ConfigError, match="execute_steps"):  # post-training always executes whole chunks now
        load_config(PipelineConfig, overrides=[*_TINY, "ppo.execute_steps=2"])


_TINY_GRPO = [
    "grpo.group_size=2", "grpo.max_episode_steps=10", "grpo.total_env_steps=20", "grpo.minibatch_size=8",
    "grpo.bc_batch_size=8", "grpo.num_workers=0", "grpo.checkpoint_every=1", "grpo.eval_every=1",
    "grpo.eval_episodes=1", "grpo.threads=1",
]


def test_pipeline_post_trains_with_the_algorithm_it_is_given(tmp_path, capsys):
    from vlapt.report.runs import read_run

    run = tmp_path / "run"
    common = [o for o in _TINY if not o.startswith("ppo.")]
    argv = ["pipeline", "--quiet", "--post-training", "grpo", "--output-dir", str(run), "evaluate_scripted=false",
            "video_episodes=0", *common, *_TINY_GRPO, "grpo.swa_start_env_steps=10"]
    assert main(argv) == 0
    rows = [json.loads((run / f"eval_{key}.json").read_text())["row"]
            for key in ("post_trained", "post_trained_average", "post_trained_swa")]
    assert rows == ["SFT + GRPO + self-BC", "SFT + GRPO + self-BC, weight average", "SFT + GRPO + self-BC, uniform tail average"]
    assert str(run / "grpo" / "policy_swa") in json.loads((run / "eval_post_trained_swa.json").read_text())["agent"]
    assert (run / "grpo" / "policy" / "model.safetensors").is_file() and not (run / "ppo").exists()
    assert str(run / "grpo" / "policy") in json.loads((run / "eval_post_trained.json").read_text())["agent"]
    # the recorded config holds the algorithm's own section, wired to the earlier stages, and no PPO section
    recorded = load_pipeline_config(run / "config.yaml")
    assert recorded.post_training == "grpo" and not hasattr(recorded, "ppo")
    assert recorded.grpo.init_policy == str(run / "sft" / "policy") and recorded.grpo.demos == str(run / "demos.hdf5")
    assert recorded.grpo.output_dir == str(run / "grpo") and recorded.grpo.tasks == ["reach-v3"]
    assert recorded.grpo.group_size == 2 and json.loads((run / "grpo" / "history.json").read_text())
    # the report finds the post-training curves where the pipeline put them
    assert json.loads((run / "run.json").read_text())["post_training_dir"] == "grpo"
    report_run = read_run(run)
    assert report_run.kind == "pipeline" and report_run.history and report_run.evaluations

    # the post-training stage is checked against its own options, which a rerun may not change unnoticed ...
    capsys.readouterr()
    assert main([*argv, "grpo.lr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "post-training stage" in err and "lr" in err
    # ... while its budget may grow
    assert main([*argv, "grpo.total_env_steps=40"]) == 0
    assert json.loads((run / "grpo" / "history.json").read_text())[-1]["env_steps"] >= 40
    # options of an algorithm the pipeline does not run are refused, not ignored
    capsys.readouterr()
    assert main([*argv, "ppo.lr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "Key 'ppo' not in 'PipelineConfig'" in err and "add post_training=ppo" in err, "names the option to change"


def test_pipeline_names_a_post_training_it_cannot_run(capsys):
    assert main(["pipeline", "--post-training", "nope"]) == 2
    assert "unknown algorithm 'nope'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="toy-reinforce"):  # a module of one's own, whose name cannot be a section
        pipeline_config_class("test_architecture")
    assert pipeline_config_class("ppo") is PipelineConfig
    grpo = pipeline_config_class("grpo")()  # defaults to the algorithm it was made for
    assert grpo.post_training == "grpo" and grpo.resolved().post_train is grpo.grpo and not hasattr(grpo, "ppo")
    with pytest.raises(ConfigError, match="needs a 'grpo' section"):
        load_config(PipelineConfig, overrides=["post_training=grpo"]).resolved()


def _fake_run(path, rows, evals):
    (path / "evals").mkdir(parents=True)
    (path / "history.json").write_text(json.dumps(rows))
    for iteration, rate, steps in evals:
        average = {"success_rate": rate, "steps_to_success": steps}
        (path / "evals" / f"iteration_{iteration:06d}.json").write_text(json.dumps({"average": average}))


def test_compare_runs_averages_within_the_budget(tmp_path):
    from vlapt.evaluation.curves import compare_runs

    def row(i, succ, steps, weight):
        return {"iteration": i, "env_steps": 100 * i, "train_success": succ, "train_steps_to_success": steps,
                "bc_weight": weight, "buffer_self_fraction": 0.25, "wall_time_s": 90.0 * i}

    _fake_run(tmp_path / "a", [row(1, 0.5, 80.0, 0.1), row(2, 0.7, 60.0, 0.2), row(3, 1.0, 10.0, 9.0)],
              [(0, 0.9, 50.0), (1, 0.4, 70.0), (2, 0.6, None), (3, 1.0, 5.0)])
    table = compare_runs([tmp_path / "a"], ["A"], up_to_env_steps=200, last_iterations=2).splitlines()
    # iteration 3 lies beyond the budget; the starting policy's evaluation (iteration 0) has its own column
    assert table[2] == "| A | 200 | 0.90 | 0.500 (0.40-0.60), 2 | 70.0 | 0.600 | 70.0 | 0.2 | 0.25 | 3.0 |"
    with pytest.raises(ValueError, match="no iteration within 50 env steps; its first ends at 100: raise --up-to"):
        compare_runs([tmp_path / "a"], up_to_env_steps=50)


def test_plot_cut_at_the_budget_draws_nothing_beyond_it(tmp_path, monkeypatch):
    from vlapt.evaluation import curves

    row = {"train_success": 0.5, "train_steps_to_success": 80.0, "bc_weight": 0.1}
    _fake_run(tmp_path / "a", [{**row, "iteration": i, "env_steps": 100 * i} for i in (1, 2, 3)],
              [(0, 0.5, 80.0), (2, 0.6, 70.0), (3, 0.7, 60.0)])
    drawn = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, x, *a, **k: drawn.append(list(x)) or original(ax, x, *a, **k))
    curves.plot_runs([tmp_path / "a"], tmp_path / "c.png", up_to_env_steps=200)
    assert drawn and max(max(xs) for xs in drawn) == 200
    assert (tmp_path / "c.png").is_file()


def test_config_files_layer_and_overrides_win(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("lr: 0.001\nbc_weight_rule: fixed\noutput_dir: runs/a\n")
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("bc_weight_rule: none\n")
    config = load_config(PPOConfig, [base, overlay], ["output_dir=runs/b"])
    assert (config.lr, config.bc_weight_rule, config.output_dir) == (0.001, "none", "runs/b")
    assert config.epochs == PPOConfig().epochs
    with pytest.raises(ConfigError, match="not found"):
        load_config(PPOConfig, [base, tmp_path / "missing.yaml"])


def test_plot_of_a_directory_that_is_not_a_run_fails_cleanly(tmp_path, capsys):
    assert main(["plot", str(tmp_path), "--output", str(tmp_path / "c.png")]) == 2
    assert "history.json" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_every_preset_in_configs_loads_into_its_config():
    import re
    from pathlib import Path

    from vlapt.algorithms.sft import SFTConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    presets = sorted(root.rglob("*.yaml"))
    assert presets, "configs/ holds the documented presets"
    sft_outputs = set()
    ppo_inits = {}
    for path in presets:
        # every preset its usage comment names exists
        named = [root.parent / p for p in re.findall(r"configs/[\w/]+\.yaml", path.read_text())]
        assert all(p.is_file() for p in named), (path, named)
        if path.name.startswith("pipeline"):
            config = load_pipeline_config(path).resolved()
            config.sft.validate(), config.post_train.validate(), config.eval.validate(), config.collect.validate()
        elif path.name.startswith("sft"):
            layers = [root / "sft_mt10.yaml", path] if path.name != "sft_mt10.yaml" else [path]
            config = load_config(SFTConfig, layers).validate()
            sft_outputs.add(config.output_dir)
        elif path.parent.name == "ablations" or path.name.startswith("ppo"):
            layers = [root / "ppo_mt10.yaml", path] if path.name != "ppo_mt10.yaml" else [path]
            config = load_config(PPOConfig, layers).validate()
            if path.parent.name == "ablations":
                assert config.output_dir.startswith("runs/ablation_"), path
            ppo_inits[path.name] = config.init_policy
        else:
            raise AssertionError(f"no config class known for preset {path.name}")
    # every post-training preset starts from a policy that an SFT preset writes
    for name, init_policy in ppo_inits.items():
        assert str(Path(init_policy).parent) in sft_outputs, (name, init_policy, sorted(sft_outputs))


@pytest.mark.parametrize("cls,name,minimum", [
    ("vlapt.algorithms.ppo_sbc:PPOConfig", "eval_episodes", 1), ("vlapt.algorithms.ppo_sbc:PPOConfig", "num_workers", 0),
    ("vlapt.algorithms.ppo_sbc:PPOConfig", "value_warmup_iterations", 0),
    ("vlapt.algorithms.grpo:GRPOConfig", "eval_episodes", 1), ("vlapt.algorithms.grpo:GRPOConfig", "eval_every", 0),
    ("vlapt.algorithms.sft:SFTConfig", "batch_size", 1), ("vlapt.algorithms.sft:SFTConfig", "augment_shift", 0),
    ("vlapt.algorithms.sft:SFTConfig", "log_every", 1),
    ("vlapt.data.collect:CollectConfig", "max_attempts_factor", 1), ("vlapt.data.collect:CollectConfig", "num_workers", 0),
    ("vlapt.data.relabel:RelabelConfig", "envs_per_task", 1), ("vlapt.data.relabel:RelabelConfig", "first_config_index", 0),
])
def test_every_stage_names_the_option_below_its_minimum_and_its_value(cls, name, minimum):
    import importlib

    module, _, attribute = cls.partition(":")
    config = getattr(importlib.import_module(module), attribute)()
    if hasattr(config, "policy"):
        config.policy = "runs/sft/policy"
    config.validate()  # the defaults pass
    setattr(config, name, minimum - 1)
    with pytest.raises(ValueError, match=f"^{name} must be >= {minimum}, got {minimum - 1}$"):
        config.validate()
