"""The `vlapt` command line, called in-process: output, and exit status 2 with a useful message on bad input."""

import json

import pytest

import vlapt  # noqa: F401  (sets the headless GL backend before mujoco is imported)
from vlapt.cli.main import main
from vlapt.envs import get_suite
from vlapt.envs.metaworld.tasks import MT10


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Run every command from an empty directory, so default outputs land (and can be looked for) there."""
    monkeypatch.chdir(tmp_path)


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _bad(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "error:" in err
    assert "Traceback" not in err
    return err


# -- tasks ----------------------------------------------------------------------------------------------
def test_tasks_lists_the_suite(capsys):
    assert main(["tasks", "--suite", "mt10"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 10
    for line, task in zip(lines, MT10):
        assert line.split()[0] == task
        assert line.endswith(get_suite("mt10").instruction(task))


def test_tasks_lists_every_task_of_mt50(capsys):
    assert main(["tasks", "--suite", "MT50"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(get_suite("mt50").tasks) and len(lines) == 50


def test_tasks_unknown_suite(capsys):
    err = _bad(capsys, ["tasks", "--suite", "mt11"])
    assert "mt11" in err and "mt10" in err and "mt50" in err


# -- eval: bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra,expected",
    [
        (["--tasks", "reach-v4"], ["reach-v4", "reach-v3", "Valid tasks"]),
        (["--suite", "mt11"], ["mt11", "valid suites", "mt10, mt50"]),
        (["--episodes", "0"], ["episodes_per_task", ">= 1"]),
        (["no_such_option=3"], ["no_such_option", "episodes_per_task"]),  # lists the valid options
        (["episodes_per_task=many"], ["episodes_per_task", "many"]),
        (["split=test"], ["split", "eval"]),
        (["env_backend=threads"], ["threads", "valid backends", "subprocess", "inprocess"]),
        (["--config", "missing.yaml"], ["missing.yaml", "not found"]),
        (["--gif"], ["--gif", "--video N"]),  # GIFs of no filmed episodes would silently be none
    ],
    ids=["unknown-task", "unknown-suite", "zero-episodes", "unknown-key", "wrong-type", "bad-split", "bad-backend",
         "missing-config", "gif-without-video"],
)
def test_eval_bad_input(capsys, tmp_path, extra, expected):
    # a valid task list unless the case is about tasks or suites (an explicit task list overrides the suite)
    tasks = [] if {"--tasks", "--suite"} & set(extra) else ["--tasks", "reach-v3"]
    err = _bad(capsys, ["eval", "--policy", "scripted", "--workers", "0", "--quiet", "--output", "x.json", *tasks, *extra])
    for text in expected:
        assert text in err, (text, err)
    assert _files(tmp_path) == [], "no results may be written for bad input"


def test_eval_invalid_yaml(capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("episodes_per_task: [1, 2\n  tasks: :\n")
    err = _bad(capsys, ["eval", "--policy", "scripted", "--config", str(config), "--output", "x.json", "--quiet"])
    assert "bad.yaml" in err and "YAML" in err
    assert _files(tmp_path) == ["bad.yaml"]


def test_eval_yaml_that_is_not_a_mapping(capsys, tmp_path):
    config = tmp_path / "list.yaml"
    config.write_text("- reach-v3\n- push-v3\n")
    err = _bad(capsys, ["eval", "--policy", "scripted", "--config", str(config), "--output", "x.json", "--quiet"])
    assert "mapping" in err
    assert _files(tmp_path) == ["list.yaml"]


def test_eval_yaml_with_wrong_type(capsys, tmp_path):
    config = tmp_path / "typed.yaml"
    config.write_text("tasks: [reach-v3]\nepisodes_per_task: lots\n")
    err = _bad(capsys, ["eval", "--policy", "scripted", "--config", str(config), "--output", "x.json", "--quiet"])
    assert "episodes_per_task" in err
    assert _files(tmp_path) == ["typed.yaml"]


def test_eval_output_is_a_directory(capsys, tmp_path):
    (tmp_path / "results").mkdir()
    err = _bad(capsys, ["eval", "--policy", "scripted", "--tasks", "reach-v3", "--episodes", "1", "--workers", "0",
                        "--output", "results", "--quiet"])
    assert "results" in err and "directory" in err
    assert _files(tmp_path) == []


def test_eval_missing_checkpoint(capsys, tmp_path):
    missing = tmp_path / "nonexistent"
    err = _bad(capsys, ["eval", "--policy", str(missing), "--tasks", "reach-v3", "--episodes", "1", "--quiet"])
    assert str(missing) in err and "does not exist" in err
    assert _files(tmp_path) == [] and not missing.exists()


# -- eval: a real run --------------------------------------------------------------------------------------
def test_eval_names_the_fast_expert(capsys, tmp_path):
    output = tmp_path / "fast.json"
    code = main(["eval", "--policy", "scripted-fast", "--tasks", "reach-v3", "--episodes", "1", "--workers", "0",
                 "--output", str(output), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(output.read_text())["agent"] == "scripted-fast"


def test_eval_scripted_writes_results(capsys, tmp_path):
    output = tmp_path / "tmp" / "x.json"
    code = main(["eval", "--policy", "scripted", "--tasks", "reach-v3", "--episodes", "2", "--workers", "0",
                 "--output", str(output), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(output.read_text())
    assert result["protocol"]["split"] == "eval"
    assert result["protocol"]["tasks"] == ["reach-v3"] and result["protocol"]["episodes_per_task"] == 2
    assert set(result["per_task"]) == {"reach-v3"}
    assert result["per_task"]["reach-v3"]["episodes"] == 2
    assert result["per_task"]["reach-v3"]["success_rate"] == 1.0
    assert result["average"]["success_rate"] == 1.0
    assert [e["config_index"] for e in result["episodes"]] == [0, 1]
    assert result["protocol"]["suite"] == "mt10"
    assert set(result["per_task"]["reach-v3"]["success_within"]) == {"100", "400"}
    assert "| reach-v3 | 2 | 1.000 |" in out
    assert "| **average** |" in out and "success within 100 | success within 400 |" in out
    assert str(output) in out
    assert _files(tmp_path) == ["tmp/x.json"], "only the results file is written (atomically, no temp left)"


def test_eval_records_the_command_it_ran(capsys, tmp_path):
    argv = ["eval", "--policy", "scripted", "--tasks", "reach-v3", "--episodes", "1", "--workers", "0",
            "--output", "r.json", "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "r.json").read_text())["command"] == "vlapt " + " ".join(argv)


# -- collect: bad input ----------------------------------------------------------------------------------
def test_collect_refuses_to_overwrite(capsys, tmp_path):
    existing = tmp_path / "d.hdf5"
    existing.write_bytes(b"keep me")
    err = _bad(capsys, ["collect", "--tasks", "reach-v3", "--demos-per-task", "1", "--workers", "0",
                        "--output", str(existing), "--quiet", "image_size=32"])
    assert "already exists" in err and "overwrite" in err
    assert existing.read_bytes() == b"keep me"
    assert _files(tmp_path) == ["d.hdf5"]


def test_collect_unknown_camera(capsys, tmp_path):
    err = _bad(capsys, ["collect", "--tasks", "reach-v3", "--output", "d.hdf5", "--quiet", "camera=ceiling"])
    assert "ceiling" in err and "valid cameras" in err
    for camera in ("corner", "topview", "gripperPOV"):
        assert camera in err
    assert _files(tmp_path) == []


def test_collect_unknown_option(capsys, tmp_path):
    err = _bad(capsys, ["collect", "--output", "d.hdf5", "--quiet", "demos=3"])
    assert "demos" in err and "demos_per_task" in err
    assert _files(tmp_path) == []


@pytest.mark.parametrize("command", ["collect", "relabel"])
def test_collect_and_relabel_name_an_unknown_env_backend(capsys, tmp_path, command):
    policy = ["--policy", "scripted"] if command == "relabel" else []
    err = _bad(capsys, [command, *policy, "--tasks", "reach-v3", "--output", "d.hdf5", "--quiet", "env_backend=threads"])
    assert "threads" in err and "valid backends" in err and "subprocess" in err
    assert _files(tmp_path) == []


def test_override_without_equals(capsys, tmp_path):
    err = _bad(capsys, ["collect", "--output", "d.hdf5", "--quiet", "camera"])
    assert "key=value" in err
    assert _files(tmp_path) == []


@pytest.mark.parametrize("override", ["tasks=[reach-v3", "dataset=*demos.hdf5", "output_dir=@runs/x"])
def test_an_override_that_is_not_valid_yaml_names_itself(capsys, tmp_path, override):
    err = _bad(capsys, ["sft", "--quiet", override])
    assert f"cannot read the overrides '{override}'" in err and "in quotes" in err
    assert _files(tmp_path) == []


def test_flag_values_are_taken_as_given_not_read_as_yaml(capsys, tmp_path):
    import yaml

    for value in ("runs/exp #3", "off", "[1]"):
        assert main(["sft", "--output-dir", value, "--dataset", value, "--print-config"]) == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["output_dir"] == printed["dataset"] == value
    assert main(["eval", "--policy", "scripted", "--tasks", "reach-v3,push-v3", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["tasks"] == ["reach-v3", "push-v3"]


def test_relabel_without_a_policy_or_with_a_missing_one(capsys, tmp_path):
    err = _bad(capsys, ["relabel", "--tasks", "reach-v3", "--output", str(tmp_path / "r.hdf5"), "--quiet"])
    assert "policy=" in err
    err = _bad(capsys, ["relabel", "--policy", str(tmp_path / "none"), "--tasks", "reach-v3",
                        "--output", str(tmp_path / "r.hdf5"), "--quiet"])
    assert "none" in err
    assert _files(tmp_path) == []


# -- train and sft: bad input ------------------------------------------------------------------------------
def test_train_unknown_algorithm(capsys, tmp_path):
    err = _bad(capsys, ["train", "--algorithm", "nope", "--output-dir", "run", "--quiet"])
    assert "unknown algorithm 'nope'" in err and "ppo" in err
    assert _files(tmp_path) == []


def test_train_names_the_algorithm_an_option_belongs_to(capsys, tmp_path):
    err = _bad(capsys, ["train", "--output-dir", "run", "--quiet", "group_size=4"])
    assert "group_size" in err and "--algorithm grpo" in err
    for option in ("no_such_option=4", "lr=abc"):  # unknown to every algorithm; PPO's own, with a bad value
        err = _bad(capsys, ["train", "--output-dir", "run", "--quiet", option])
        assert option.split("=")[0] in err and "--algorithm" not in err
    assert _files(tmp_path) == []


@pytest.mark.parametrize("argv", [["train", "--algorithm", "grpo", "seed=3"],
                                  ["pipeline", "--post-training", "grpo", "grpo.seed=3"], ["sft", "seed=3"], ["eval", "--policy", "scripted", "seed=3"],
                                  ["collect", "demos_per_task=3"], ["relabel", "episodes_per_task=3"]])
def test_print_config_prints_every_option_as_yaml_that_loads_back(capsys, tmp_path, argv):
    import yaml

    from vlapt.algorithms.grpo import GRPOConfig
    from vlapt.config import load_config

    capsys.readouterr()
    assert main([*argv, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert _files(tmp_path) == [], "prints only: nothing runs, nothing is written"
    options = printed.get("grpo", printed)
    key = argv[-1].split("=")[0].split(".")[-1]
    assert options[key] == 3, "the overrides are applied"
    if argv[0] in ("train", "pipeline"):
        assert options["group_size"] == GRPOConfig().group_size, "every option, defaults included"
    if argv[0] == "train":
        (tmp_path / "printed.yaml").write_text(yaml.safe_dump(options))
        assert load_config(GRPOConfig, tmp_path / "printed.yaml") == load_config(GRPOConfig, overrides=["seed=3"])
    elif argv[0] == "pipeline":
        assert printed["grpo"]["init_policy"] == "runs/pipeline/sft/policy", "the stages as the pipeline wires them"


def test_sft_on_a_dataset_that_is_missing_or_incomplete(capsys, tmp_path):
    import h5py

    err = _bad(capsys, ["sft", "--dataset", "missing.hdf5", "--output-dir", "run", "--quiet"])
    assert "missing.hdf5" in err and "not found" in err
    damaged = tmp_path / "damaged.hdf5"
    with h5py.File(damaged, "w") as f:  # what an interrupted writer would leave: no mask/ index
        f.create_group("data").attrs["format"] = "vlapt-demos"
        f["data"].attrs["env_args"] = json.dumps({"tasks": ["reach-v3"]})
    err = _bad(capsys, ["sft", "--dataset", str(damaged), "--output-dir", "run", "--quiet"])
    assert str(damaged) in err and "mask/" in err and "collect it again" in err
    assert _files(tmp_path) == ["damaged.hdf5"], "no run directory for bad input"

