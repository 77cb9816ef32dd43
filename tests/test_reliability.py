"""What vlapt guarantees when runs collide, crash, get killed or are given bad input (docs/reliability.md)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import vlapt  # noqa: F401
import vlapt.config
from vlapt.algorithms import checkpointing
from vlapt.algorithms.checkpointing import CheckpointWriteError, latest_checkpoint, warn_if_busy
from vlapt.algorithms.ppo_sbc import PPOConfig, train_ppo
from vlapt.algorithms.sft import ModelConfig, SFTConfig, train_sft
from vlapt.cli.main import main
from vlapt.config import ConfigError, load_config
from vlapt.data.collect import CollectConfig, collect
from vlapt.pipeline import PipelineConfig, run_pipeline
from vlapt.policies import load_policy
from vlapt.rundir import RunInUseError, clean_stale_temporaries, open_run

TASK = "reach-v3"
OTHER_TASK = "drawer-close-v3"
VLAPT = str(Path(sys.executable).with_name("vlapt"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("reliability") / "demos.hdf5"
    collect(CollectConfig(tasks=[TASK, OTHER_TASK], demos_per_task=2, image_size=32, num_workers=0, output=str(path)),
            progress=False)
    return path


@pytest.fixture(scope="module")
def sft_policy(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("reliability_sft")
    return train_sft(_sft_config(dataset, out), progress=False)


def _sft_config(dataset, out, **kwargs) -> SFTConfig:
    return SFTConfig(dataset=str(dataset), output_dir=str(out), **{
        "model": ModelConfig(size="tiny", chunk_len=5), "steps": 4, "batch_size": 8, "warmup_steps": 1,
        "checkpoint_every": 2, "log_every": 2, "threads": 1, **kwargs})


def _ppo_config(dataset, sft_policy, out, **kwargs) -> PPOConfig:
    return PPOConfig(**{**dict(init_policy=str(sft_policy), demos=str(dataset), tasks=[TASK], output_dir=str(out),
                               envs_per_task=1, horizon=4, num_workers=0, total_env_steps=40, epochs=1, minibatch_size=8,
                               bc_batch_size=8, checkpoint_every=1, eval_every=0, value_warmup_iterations=1, threads=1),
                          **kwargs})


# -- two runs, one directory ----------------------------------------------------------------------------
def test_a_second_run_on_a_directory_in_use_is_refused_with_the_holder(tmp_path):
    with open_run(tmp_path / "run", {"lr": 1}, log_file=None):
        with pytest.raises(RunInUseError, match=f"in use by pid {os.getpid()} on host"):
            open_run(tmp_path / "run", {"lr": 1}, log_file=None)
    with open_run(tmp_path / "run", {"lr": 1}, log_file=None):  # released when the first run ended
        pass


def test_a_started_run_without_its_recorded_options_is_not_resumed_blind(tmp_path):
    run = tmp_path / "run"
    with open_run(run, {"lr": 1}, log_file=None):
        (run / "checkpoints" / "iter_000001").mkdir(parents=True)
    for record in (None, "", "[not, a, mapping]", "lr: [unclosed"):  # deleted, empty, or not options at all
        if record is None:
            (run / "config.yaml").unlink()
        else:
            (run / "config.yaml").write_text(record)
        with pytest.raises(ConfigError, match="no readable record of its options \\(config.yaml\\).*resume=false"):
            open_run(run, {"lr": 2}, log_file=None)
        assert (run / "checkpoints" / "iter_000001").is_dir()  # refused before anything changed
        assert not (run / "config.yaml").exists() if record is None else (run / "config.yaml").read_text() == record
    with open_run(run, {"lr": 2}, log_file=None, resume=False):  # the way out the error names
        pass
    assert yaml.safe_load((run / "config.yaml").read_text()) == {"lr": 2}
    # a record may be missing where nothing has started: the run simply begins (also where nothing marks progress)
    with open_run(tmp_path / "fresh", {"lr": 1}, log_file=None):
        pass
    with open_run(tmp_path / "unmarked", {"lr": 1}, has_progress="", log_file=None):
        pass


def test_two_cli_runs_on_one_output_dir_the_second_refused(dataset, tmp_path, capsys):
    out = tmp_path / "sft"
    holder = open_run(out, {}, log_file=None, resume=False)  # stands for a run still going in another process
    try:
        code = main(["sft", "--dataset", str(dataset), "--output-dir", str(out), "steps=2", "model.size=tiny"])
    finally:
        holder.close()
    assert code == 2 and "is in use by pid" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()


# -- runs that meet their own earlier state ----------------------------------------------------------------
def test_resuming_with_other_options_is_refused_before_the_recorded_config_changes(dataset, sft_policy, tmp_path):
    out = tmp_path / "ppo"
    train_ppo(_ppo_config(dataset, sft_policy, out), progress=False)
    recorded = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"other options \(lr: 2e-05 -> 0.001\)"):
        train_ppo(_ppo_config(dataset, sft_policy, out, lr=1e-3), progress=False)
    with pytest.raises(ConfigError, match=r"tasks: \['reach-v3'\] -> \['reach-v3', 'drawer-close-v3'\]"):
        train_ppo(_ppo_config(dataset, sft_policy, out, tasks=[TASK, OTHER_TASK]), progress=False)
    assert (out / "config.yaml").read_text() == recorded
    # a larger budget is the same run, resumed
    train_ppo(_ppo_config(dataset, sft_policy, out, total_env_steps=80), progress=False)
    assert yaml.safe_load((out / "config.yaml").read_text())["total_env_steps"] == 80


def test_resuming_from_a_starting_policy_that_changed_since_is_refused(dataset, sft_policy, tmp_path):
    start = tmp_path / "sft_policy"
    shutil.copytree(sft_policy, start)
    out = tmp_path / "ppo"
    train_ppo(_ppo_config(dataset, start, out), progress=False)
    trained_further = load_policy(start)  # as if its SFT run went on after post-training began
    with torch.no_grad():
        next(trained_further.parameters()).add_(0.01)
    trained_further.save(start)
    with pytest.raises(ConfigError, match="has changed since this run began.*resume=false"):
        train_ppo(_ppo_config(dataset, start, out, total_env_steps=80), progress=False)
    train_ppo(_ppo_config(dataset, start, out, total_env_steps=80, resume=False), progress=False)  # the way out


def test_sft_resumed_with_another_model_is_refused(dataset, tmp_path):
    out = tmp_path / "sft"
    train_sft(_sft_config(dataset, out), progress=False)
    with pytest.raises(ConfigError, match="model.size: 'tiny' -> 'default'"):
        train_sft(_sft_config(dataset, out, model=ModelConfig(size="default", chunk_len=5)), progress=False)


def _tiny_pipeline(tmp_path, *extra) -> PipelineConfig:
    return load_config(PipelineConfig, overrides=[
        f"output_dir={tmp_path / 'run'}", f"collect.tasks=[{TASK}]", "collect.demos_per_task=2", "collect.image_size=32",
        "collect.num_workers=0", "sft.steps=2", "sft.batch_size=8", "sft.model.size=tiny", "sft.threads=1",
        "ppo.envs_per_task=1", "ppo.horizon=2", "ppo.minibatch_size=8", "ppo.total_env_steps=20", "ppo.num_workers=0",
        "ppo.eval_every=0", "ppo.threads=1", "eval.episodes_per_task=1", "eval.num_workers=0", "eval.max_episode_steps=20",
        "evaluate_scripted=false", *extra])


def test_a_pipeline_rerun_with_changed_stage_options_refuses_or_redoes_them(tmp_path):
    run_pipeline(_tiny_pipeline(tmp_path), progress=False)
    run = tmp_path / "run"
    config_before = (run / "config.yaml").read_text()
    demos_before = (run / "demos.hdf5").stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"collect stage made with other options \(demos_per_task: 2 -> 3\).*rerun_stale"):
        run_pipeline(_tiny_pipeline(tmp_path, "collect.demos_per_task=3"), progress=False)
    with pytest.raises(ConfigError, match=r"sft stage made with other options \(batch_size: 8 -> 4\)"):
        run_pipeline(_tiny_pipeline(tmp_path, "sft.batch_size=4"), progress=False)
    assert (run / "config.yaml").read_text() == config_before  # nothing recorded before the check
    sft_record = (run / "sft" / "config.yaml").read_text()
    (run / "sft" / "config.yaml").unlink()  # a started stage that no longer says what it was made with
    with pytest.raises(ConfigError, match=r"started sft stage but no readable record.*rerun_stale"):
        run_pipeline(_tiny_pipeline(tmp_path), progress=False)
    assert (run / "config.yaml").read_text() == config_before
    (run / "sft" / "config.yaml").write_text(sft_record)
    holder = open_run(run, {}, has_progress="", log_file=None, resume=False)  # the run, still going in another process
    try:
        with pytest.raises(RunInUseError):
            run_pipeline(_tiny_pipeline(tmp_path, "sft.batch_size=4", "rerun_stale=true"), progress=False)
    finally:
        holder.close()
    assert (run / "sft" / "policy").is_dir(), "no stage is removed from under a live run"
    (run / "eval_dagger.json").write_text("{}")  # the row of an earlier run with a DAgger round
    # asked to, the stale stage and every stage after it run again
    run_pipeline(_tiny_pipeline(tmp_path, "sft.batch_size=4", "rerun_stale=true"), progress=False)
    assert not (run / "eval_dagger.json").exists(), "rows this run has not are not left for the report"
    assert (run / "demos.hdf5").stat().st_mtime_ns == demos_before
    assert yaml.safe_load((run / "sft" / "config.yaml").read_text())["batch_size"] == 4
    assert yaml.safe_load((run / "ppo" / "config.yaml").read_text())["init_policy"] == str(run / "sft" / "policy")


def test_a_pipeline_says_which_options_it_wires_over(tmp_path, caplog):
    config = _tiny_pipeline(tmp_path, "ppo.init_policy=mine/policy", "eval.tasks=[push-v3]")
    with caplog.at_level(logging.WARNING, logger="vlapt.pipeline"):
        config.resolved()
    assert "ppo.init_policy='mine/policy' is ignored" in caplog.text and "eval.tasks=['push-v3'] is ignored" in caplog.text
    assert config.ppo.init_policy == str(tmp_path / "run" / "sft" / "policy") and config.eval.tasks == [TASK]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlapt.pipeline"):
        config.resolved()  # wired once, it stays quiet
        _tiny_pipeline(tmp_path).resolved()
    assert caplog.text == ""


# -- bad input: a message, exit 2, nothing written ---------------------------------------------------------
@pytest.mark.parametrize("where", ["file", "under_file"])
def test_an_output_dir_that_is_a_file_or_under_one(dataset, tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    out = blocker if where == "file" else blocker / "run"
    assert main(["sft", "--dataset", str(dataset), "--output-dir", str(out), "steps=2"]) == 2
    assert "is a file" in capsys.readouterr().err and blocker.is_file()


@pytest.mark.parametrize("command", [["sft", "checkpoint_every=0", 1], ["sft", "log_every=0", 1],
                                     ["train", "checkpoint_every=0", 1], ["sft", "keep_checkpoints=-1", 0],
                                     ["train", "keep_checkpoints=-1", 0],
                                     ["train", "algorithm=grpo keep_checkpoints=-1", 0]])
def test_out_of_range_intervals_and_counts_are_refused(dataset, sft_policy, tmp_path, capsys, command):
    name, options, least = command
    inputs = (["--dataset", str(dataset)] if name == "sft" else ["--init-policy", str(sft_policy), "--demos", str(dataset)])
    assert main([name, *inputs, "--output-dir", str(tmp_path / "run"), *options.split()]) == 2
    assert f"must be >= {least}" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_failing_inputs_leave_no_stub_output_dir(dataset, sft_policy, tmp_path, capsys):
    missing = str(tmp_path / "missing.hdf5")
    assert main(["train", "--init-policy", str(sft_policy), "--demos", missing, "--output-dir", str(tmp_path / "a")]) == 2
    assert main(["train", "--init-policy", str(tmp_path / "nope"), "--demos", str(dataset), "--output-dir",
                 str(tmp_path / "b")]) == 2
    assert main(["sft", "--dataset", missing, "--output-dir", str(tmp_path / "c")]) == 2
    assert not any((tmp_path / name).exists() for name in "abc")


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(dataset, sft_policy, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from vlapt.algorithms import checkpointing

    out = tmp_path / "ppo"
    train_ppo(_ppo_config(dataset, sft_policy, out, total_env_steps=10), progress=False)
    previous = latest_checkpoint(out)

    def no_space(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(checkpointing, "save_file", no_space)
    with pytest.raises(CheckpointWriteError, match=f"previous checkpoint {previous} is intact"):
        train_ppo(_ppo_config(dataset, sft_policy, out, total_env_steps=40), progress=False)
    assert latest_checkpoint(out) == previous and not list((out / "checkpoints").glob(".*"))
    assert isinstance(CheckpointWriteError("x"), OSError)  # the CLI reports it as a message with exit status 2


# -- leftovers of runs that died ---------------------------------------------------------------------------
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporaries_of_dead_writers_are_removed_on_start(dataset, sft_policy, tmp_path):
    out = tmp_path / "ppo"
    train_ppo(_ppo_config(dataset, sft_policy, out, total_env_steps=10), progress=False)
    dead = _dead_pid()
    leftovers = [out / "checkpoints" / f".step_000000009.tmp{dead}", out / f".policy.tmp-{dead}", out / f".policy.old-{dead}"]
    for path in leftovers:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"\0" * 1024)
    (out / "checkpoints" / f".latest.tmp{dead}").write_text("step_000000009\n")
    mine = out / f".policy.tmp-{os.getppid()}"  # a live writer's: kept
    mine.mkdir()
    train_ppo(_ppo_config(dataset, sft_policy, out, total_env_steps=10), progress=False)
    assert not any(p.exists() for p in leftovers) and not (out / "checkpoints" / f".latest.tmp{dead}").exists()
    assert mine.exists()


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_the_curves_of_an_attempt_stopped_before_its_first_checkpoint_are_not_kept(dataset, sft_policy, tmp_path,
                                                                                   stage):
    out = tmp_path / stage
    stale = out / "tb" / "events.out.tfevents.1.stopped-attempt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\0" * 64)
    if stage == "sft":
        train_sft(_sft_config(dataset, out), progress=False)
    else:
        train_ppo(_ppo_config(dataset, sft_policy, out, total_env_steps=10), progress=False)
    assert not stale.exists() and len(list((out / "tb").glob("events.out.tfevents.*"))) == 1


def test_a_killed_collection_leaves_nothing_the_next_one_keeps(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".demos.hdf5.tmp{dead}"
    stale.write_bytes(b"\0" * 4096)
    collect(CollectConfig(tasks=[TASK], demos_per_task=1, image_size=32, num_workers=0, output=str(tmp_path / "demos.hdf5")),
            progress=False)
    assert not stale.exists() and (tmp_path / "demos.config.yaml").is_file()
    assert clean_stale_temporaries(tmp_path) == []


def test_a_writer_killed_between_its_renames_gets_its_old_version_back(tmp_path):
    dead = _dead_pid()
    retired = tmp_path / f".policy.old-{dead}"  # the old version moved aside, the new one not yet renamed in
    retired.mkdir()
    (retired / "config.json").write_text("{}")
    staged = tmp_path / f".policy.tmp-{dead}"
    staged.mkdir()
    superseded = tmp_path / f".policy_ema.old-{dead}"  # the new version is in place: the old one goes
    superseded.mkdir()
    (tmp_path / "policy_ema").mkdir()
    half_removed = tmp_path / f".demos.old-{dead}"  # killed while removing it after publishing; then demos was deleted
    half_removed.mkdir()
    assert clean_stale_temporaries(tmp_path) == [half_removed, staged, superseded]
    assert (tmp_path / "policy" / "config.json").read_text() == "{}" and not retired.exists()
    assert not superseded.exists() and (tmp_path / "policy_ema").is_dir()
    assert not half_removed.exists() and not (tmp_path / "demos").exists()


# -- signals -----------------------------------------------------------------------------------------------
def test_a_stop_swallowed_on_its_way_still_stops_the_run_at_its_next_step(dataset, tmp_path):
    import vlapt.rundir as rundir

    try:  # the KeyboardInterrupt of a signal that lands in a garbage-collector callback is printed and dropped
        rundir.request_stop()
    except KeyboardInterrupt:
        pass
    try:
        with pytest.raises(KeyboardInterrupt):
            train_sft(_sft_config(dataset, tmp_path / "sft"), progress=False)
        assert not (tmp_path / "sft" / "policy").exists(), "stopped before its first step"
    finally:
        rundir.clear_stop_request()
    train_sft(_sft_config(dataset, tmp_path / "sft"), progress=False)  # cleared: the same run goes on


def test_sigterm_stops_training_cleanly_and_says_where_to_resume(dataset, sft_policy, tmp_path):
    out = tmp_path / "ppo"
    command = [VLAPT, "train", "--quiet", "--init-policy", str(sft_policy), "--demos", str(dataset), "--output-dir", str(out),
               f"tasks=[{TASK}]", "envs_per_task=1", "horizon=4", "num_workers=1", "total_env_steps=100000",
               "minibatch_size=8", "bc_batch_size=8", "checkpoint_every=1", "eval_every=0", "threads=1"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while latest_checkpoint(out) is None and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert latest_checkpoint(out) is not None, "no checkpoint within two minutes"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "interrupted; the last checkpoint is" in err and "run the same command again" in err
    assert "Traceback" not in err
    assert json.loads((latest_checkpoint(out) / "state.json").read_text())["iteration"] >= 1


def test_an_option_added_after_a_run_was_made_counts_as_unchanged_at_its_default(tmp_path):
    from vlapt.rundir import check_recorded_config

    recorded = tmp_path / "config.yaml"
    old = yaml.safe_load(yaml.safe_dump(vlapt.config.to_dict(PPOConfig())))
    del old["precision"]  # a run from before the option existed
    recorded.write_text(yaml.safe_dump(old))
    check_recorded_config(recorded, PPOConfig())
    with pytest.raises(ConfigError, match="precision: '<unset>' -> 'bf16'"):
        check_recorded_config(recorded, PPOConfig(precision="bf16"))


def test_a_run_made_with_a_since_removed_option_resumes_if_it_used_the_behaviour_that_remains(tmp_path):
    from vlapt.algorithms.grpo import GRPOConfig
    from vlapt.config import load_config
    from vlapt.rundir import check_recorded_config

    for cls in (PPOConfig, GRPOConfig):
        recorded = tmp_path / f"{cls.__name__}.yaml"
        old = yaml.safe_load(yaml.safe_dump(vlapt.config.to_dict(cls())))
        recorded.write_text(yaml.safe_dump({**old, "ratio": "chunk"}))  # a run from before ratio=action was removed
        check_recorded_config(recorded, cls())
        recorded.write_text(yaml.safe_dump({**old, "ratio": "action"}))
        with pytest.raises(ConfigError, match="ratio: 'action' -> removed \\(only 'chunk' remains\\)"):
            check_recorded_config(recorded, cls())
        assert load_config(cls, None, ["ratio=chunk", "seed=3"]).seed == 3  # a recorded config.yaml still loads
        with pytest.raises(ConfigError, match="option 'ratio' was removed: only its 'chunk' behaviour remains"):
            load_config(cls, None, ["ratio=action"])
    from vlapt.pipeline import load_pipeline_config

    with pytest.raises(ConfigError, match="option 'grpo.ratio' was removed"):
        load_pipeline_config(None, ["post_training=grpo", "grpo.ratio=action"])
    assert load_pipeline_config(None, ["post_training=grpo", "grpo.ratio=chunk", "grpo.seed=4"]).grpo.seed == 4


def test_starting_over_in_a_directory_removes_the_earlier_runs_outputs(dataset, sft_policy, tmp_path):
    out = tmp_path / "ppo"
    train_ppo(_ppo_config(dataset, sft_policy, out, total_env_steps=80), progress=False)
    earlier = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert earlier[-1] > "step_000000002"
    train_ppo(_ppo_config(dataset, sft_policy, out, total_env_steps=20, lr=1e-3, resume=False), progress=False)
    # the new run's checkpoints only, and `latest` names one of them; the earlier run's never mix in
    now = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert now[-1] <= "step_000000002" and latest_checkpoint(out).name == now[-1]
    assert json.loads((out / "history.json").read_text())[-1]["env_steps"] < 80
    with pytest.raises(ValueError, match="eval_every .* must be a multiple of checkpoint_every"):
        _ppo_config(dataset, sft_policy, out, eval_every=3, checkpoint_every=2).validate()


@pytest.mark.parametrize("busy, threads, warned", [(1.2, 2, True), (0.2, 2, False), (1.9, 1, False)])
def test_training_warns_only_when_other_work_takes_the_cores_its_threads_need(monkeypatch, capsys, busy, threads, warned):
    monkeypatch.setattr(checkpointing, "busy_cores", lambda: busy)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    warn_if_busy(threads)
    err = capsys.readouterr().err
    assert ("threads=1 trains faster" in err) is warned, err


def test_busy_cores_are_measured_now_not_read_from_the_lagging_load_average(monkeypatch, tmp_path):
    stat = tmp_path / "stat"

    def write(busy, idle):
        stat.write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 0 0 1 0 0 0 0 0 0\ncpu1 1 0 0 1 0 0 0 0 0 0\nintr 0\n")

    write(100, 1000)
    monkeypatch.setattr(checkpointing.time, "sleep", lambda s: write(100 + 150, 1000 + 50))
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))  # a job that has just ended
    assert checkpointing.busy_cores(stat=str(stat)) == pytest.approx(2 * 150 / 200)
    write(100, 1000)
    monkeypatch.setattr(checkpointing.time, "sleep", lambda s: write(100, 1000 + 200))
    assert checkpointing.busy_cores(stat=str(stat)) == 0.0  # idle now, whatever the load average says
    assert checkpointing.busy_cores(stat=str(tmp_path / "missing")) == 2.0  # no /proc/stat: the load average
