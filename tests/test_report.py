"""The run report: what it reads from run directories, what the page holds, and that Chromium renders it."""

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import vlapt  # noqa: F401
from vlapt.cli.main import main
from vlapt.evaluation import summarize
from vlapt.evaluation.video import write_episode_video
from vlapt.interfaces import Episode
from vlapt.report import build_report, read_run

TASKS = ["reach-v3", "drawer-close-v3"]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _result(successes: dict[str, list[int | None]], agent: str, videos_of=None, video_dir=None) -> dict:
    """An evaluation result as `evaluate` writes it; None steps are failures at the limit (100)."""
    episodes = [Episode(task, "do it", steps is not None, steps or 100, split="eval", config_index=i)
                for task, runs in successes.items() for i, steps in enumerate(runs)]
    result = {"agent": agent, "protocol": {"episodes_per_task": 2, "max_episode_steps": 100, "deterministic": True},
              **summarize(episodes, list(successes), 100), "episodes": [e.summary() for e in episodes],
              "wall_time_s": 3.5}
    if videos_of:
        rng = np.random.default_rng(0)
        result["videos"] = []
        for episode in videos_of(episodes):
            episode.frames = rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
            files = write_episode_video(episode, video_dir, ["mp4", "gif"], fps=10)
            result["videos"].append({**episode.summary(), "files": files})
        result["video_dir"] = video_dir.name
    return result


def _history(iterations: int, offset: float = 0.0) -> list[dict]:
    return [{"iteration": i, "env_steps": 100 * i, "train_success": min(1.0, 0.2 + 0.1 * i + offset),
             "train_steps_to_success": 90.0 - 3 * i, "bc_weight": 0.1 / i, "approx_kl": 0.01, "explained_variance":
             0.1 * i, "buffer_self_fraction": 0.05 * i, "wall_time_s": 10.0 * i} for i in range(1, iterations + 1)]


def fake_pipeline_run(path: Path, offset: float = 0.0) -> Path:
    """A pipeline output_dir as `vlapt pipeline` leaves it, small and made by hand."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(path), "suite": "mt10",
                                                      "note": "<script>alert('not run')</script>"}))
    (path / "run.json").write_text(json.dumps({"command": "vlapt pipeline --config configs/pipeline_quick.yaml",
                                               "commit": "0123abc", "machine": "test machine, 2 cores",
                                               "wall_time_s": 754.0}))
    (path / "timings.json").write_text(json.dumps({"collect_s": 10.0, "sft_s": 100.0, "post_train_s": 600.0,
                                                   "eval_s": 44.0}))
    rows = {"scripted": {"reach-v3": [60, 70], "drawer-close-v3": [80, 90]},
            "sft": {"reach-v3": [150, None], "drawer-close-v3": [None, None]},
            "post_trained": {"reach-v3": [90, 95], "drawer-close-v3": [120, None]}}
    for key, outcome in rows.items():
        filmed = (lambda eps: [eps[0], eps[3]]) if key == "post_trained" else None
        video_dir = path / "videos" / key
        result = _result(outcome, f"checkpoint:{key}", filmed, video_dir)
        if filmed:
            result["video_dir"] = f"videos/{key}"
        (path / f"eval_{key}.json").write_text(json.dumps(result))
    ppo = path / "ppo"
    (ppo / "evals").mkdir(parents=True)
    history = _history(6, offset)
    (ppo / "history.json").write_text(json.dumps(history))
    for iteration in (0, 3, 6):
        success = {"reach-v3": [50 + iteration, None], "drawer-close-v3": [None, None]}
        (ppo / "evals" / f"iteration_{iteration:06d}.json").write_text(json.dumps(_result(success, "x")))
    return path


def test_read_run_finds_rows_history_videos_and_provenance(tmp_path):
    run = read_run(fake_pipeline_run(tmp_path / "run"))
    assert run.kind == "pipeline" and run.name == "run"
    assert [row.label for row in run.rows] == ["scripted expert", "SFT", "post-trained"]
    assert run.tasks == TASKS and len(run.history) == 6
    assert [steps for steps, _ in run.evaluations] == [0, 300, 600]
    assert run.provenance["commit"] == "0123abc" and run.timings["sft_s"] == 100.0
    post = run.rows[2]
    assert [v["task"] for v in post.result["videos"]] == ["reach-v3", "drawer-close-v3"]
    assert post.video_path(post.result["videos"][0]["files"]["mp4"]).is_file()


def test_report_page_is_self_contained_and_escapes_what_it_shows(tmp_path):
    run = fake_pipeline_run(tmp_path / "run")
    page = build_report([run], tmp_path / "report.html").read_text()
    assert page.count('<table class="per-task">') == 1 and '<table class="results"' in page
    for label in ("scripted expert", "SFT", "post-trained"):
        assert f'<td class="name">{label}</td>' in page
    assert page.count('src="data:video/mp4;base64,') == 2 and page.count('src="data:image/png;base64,') == 1
    assert "<script>alert" not in page and "&lt;script&gt;alert" in page  # config shown as text
    assert "vlapt pipeline --config configs/pipeline_quick.yaml" in page and "0123abc" in page
    assert "12.6 min" in page  # wall time
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page, "loads nothing"


def test_a_result_naming_files_outside_its_videos_embeds_none_of_them(tmp_path):
    run = fake_pipeline_run(tmp_path / "run")
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"private bytes, not a video")
    result = json.loads((run / "eval_post_trained.json").read_text())
    result["videos"][0]["files"] = {"mp4": "../../../secret.mp4"}
    result["videos"][1]["files"] = {"mp4": str(secret)}
    (run / "eval_post_trained.json").write_text(json.dumps(result))
    page = build_report([run], tmp_path / "report.html").read_text()
    assert base64.b64encode(secret.read_bytes()).decode() not in page and 'src="data:video/mp4' not in page
    assert "not a video file name" in page


def test_a_row_evaluated_on_training_configurations_is_marked_so(tmp_path):
    run = fake_pipeline_run(tmp_path / "run")
    page = build_report([run], tmp_path / "held_out.html").read_text()
    assert "training configurations" not in page
    result = json.loads((run / "eval_sft.json").read_text())
    result["protocol"]["split"] = "train"
    (run / "eval_sft.json").write_text(json.dumps(result))
    page = build_report([run], tmp_path / "report.html").read_text()
    assert "SFT: checkpoint:sft, mean chunks, training configurations" in page
    assert page.count("training configurations") == 2  # and the table's note says where


def test_report_of_a_training_run_shows_its_periodic_evaluations(tmp_path):
    pipeline = fake_pipeline_run(tmp_path / "pipeline")
    train = tmp_path / "train"
    shutil.copytree(pipeline / "ppo", train)
    run = read_run(train)
    assert run.kind == "train"
    assert [row.label for row in run.rows] == ["starting policy", "iteration 6 (600 env steps)"]
    page = build_report([train], tmp_path / "r.html").read_text()
    assert "iteration 6 (600 env steps)" in page and "data:image/png" in page


def test_cli_report_of_several_runs_and_bad_input(tmp_path, capsys):
    a = fake_pipeline_run(tmp_path / "a")
    b = fake_pipeline_run(tmp_path / "b", offset=0.2)
    output = tmp_path / "both.html"
    assert main(["report", str(a), str(b), "--labels", "first,second", "--output", str(output)]) == 0
    assert f"report written to {output}" in capsys.readouterr().out
    page = output.read_text()
    assert page.count('<section class="run">') == 2 and "repeat(2, minmax(0, 1fr))" in page
    assert '<td class="name">first</td>' in page and '<td class="name">second</td>' in page
    assert main(["report", str(a), str(b), "--label", "first, seed 0", "--label", "second", "--output", str(output)]) == 0
    assert '<td class="name">first, seed 0</td>' in output.read_text(), "a label given with --label keeps its commas"
    assert main(["report", str(a)]) == 0 and (a / "report.html").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert main(["report", str(a), str(b), "--labels", "one"]) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and "holds no run" in err and "1 labels for 2 runs" in err


# -- in a browser ----------------------------------------------------------------------------------------
def open_in_chromium(page: Path, screenshot: Path | None = None, width: int = 1280) -> dict:
    """Load ``page`` in headless Chromium; what rendered, what failed to load, and the console's errors."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},1000", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(page.resolve().as_uri())
        driver.set_script_timeout(30)
        state = driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const videos = Array.from(document.querySelectorAll('video'));
            const loaded = videos.map(v => v.readyState >= 2 ? Promise.resolve() : new Promise(resolve => {
                v.addEventListener('loadeddata', resolve); v.addEventListener('error', resolve); v.load(); }));
            Promise.race([Promise.all(loaded), new Promise(r => setTimeout(r, 20000))]).then(() => done({
                tables: Array.from(document.querySelectorAll('table')).map(t => [t.className, t.rows.length]),
                images: Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
                videos: videos.map(v => [v.readyState, v.error ? v.error.code : null, v.videoWidth, v.duration]),
                title: document.title}));
        """)
        state["console"] = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
        if screenshot is not None:
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(width, min(height + 120, 4000))
            driver.save_screenshot(str(screenshot))
        return state
    finally:
        driver.quit()


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them: apt-get install "
                           "chromium chromium-driver)")
def test_report_renders_in_headless_chromium(tmp_path):
    pytest.importorskip("selenium")
    a = fake_pipeline_run(tmp_path / "a")
    b = fake_pipeline_run(tmp_path / "b", offset=0.2)
    page = build_report([a, b], tmp_path / "report.html")
    state = open_in_chromium(page, tmp_path / "shot.png")
    assert state["console"] == [], state["console"]
    classes = [cls for cls, _ in state["tables"]]
    assert classes.count("results") == 1 and classes.count("per-task") == 2
    results_rows = dict(state["tables"])["results"]
    assert results_rows == 1 + 2 * 3, "a header and three rows per run"
    assert state["images"], "the learning curves"
    for complete, width, height in state["images"]:
        assert complete and width > 0 and height > 0
    assert len(state["videos"]) == 4
    for ready, error, width, duration in state["videos"]:
        assert error is None and ready >= 2 and width == 64 and duration > 0
    assert (tmp_path / "shot.png").stat().st_size > 10_000


def test_vlapt_train_records_how_its_run_was_made(tmp_path, capsys):
    from test_architecture import ToyPolicy  # a policy family and algorithm of the architecture tests

    ToyPolicy(chunk_len=2).save(tmp_path / "init")
    argv = ["train", "--algorithm", "test_architecture", "--init-policy", str(tmp_path / "init"),
            "--output-dir", str(tmp_path / "toy"), "--quiet"]
    assert main(argv) == 0
    recorded = json.loads((tmp_path / "toy" / "run.json").read_text())
    assert recorded["command"] == "vlapt " + " ".join(argv)
    assert set(recorded) == {"command", "commit", "machine", "started", "finished", "wall_time_s"}
    assert recorded["wall_time_s"] > 0 and "cores" in recorded["machine"]
    assert read_run(tmp_path / "toy").provenance == recorded
