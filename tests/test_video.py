"""Episode videos: frames from the env at every step, the same episodes with and without them, the files."""

import json

import av
import numpy as np
import pytest
from PIL import Image

import vlapt  # noqa: F401  (sets the headless GL backend before mujoco is imported)
from vlapt.cli.main import main
from vlapt.envs.metaworld.env import MetaWorldVLAEnv
from vlapt.evaluation import CheckpointAgent, EvalConfig, evaluate
from vlapt.evaluation.video import annotate_frames, video_name, write_episode_video, write_gif, write_mp4
from vlapt.interfaces import EnvConfig, Episode

TASKS = ["reach-v3", "drawer-close-v3"]


def _run(env, chunks, options=None):
    obs, info = env.reset(options={"split": "eval", "index": 1, **(options or {})})
    images, frames, steps = [obs["image"]], [info.get("frames")], []
    for chunk in chunks:
        obs, _, terminated, truncated, info = env.step(chunk)
        images.append(obs["image"])
        frames.append(info.get("frames"))
        steps.append(info["steps"])
        if terminated or truncated:
            break
    return np.stack(images), frames, steps


def test_env_renders_a_larger_frame_after_every_step_and_leaves_the_policy_image_alone():
    chunks = np.random.default_rng(0).uniform(-1, 1, size=(4, 5, 4)).astype(np.float32)
    plain = MetaWorldVLAEnv("reach-v3", EnvConfig(image_size=32), chunk_len=5)
    filmed = MetaWorldVLAEnv("reach-v3", EnvConfig(image_size=32, video_size=64), chunk_len=5)
    try:
        images, frames, steps = _run(plain, chunks)
        assert all(f is None for f in frames), "no video unless asked"
        filmed_images, filmed_frames, filmed_steps = _run(filmed, chunks)
        np.testing.assert_array_equal(filmed_images, images)  # what the policy sees is unchanged
        assert filmed_steps == steps
        assert filmed_frames[0].shape == (1, 64, 64, 3) and filmed_frames[0].dtype == np.uint8
        for frame, n in zip(filmed_frames[1:], filmed_steps):
            assert frame.shape == (n, 64, 64, 3), "one frame per executed env step"
        # the same camera, larger: the last frame shrunk looks like the policy's last image
        small = np.asarray(Image.fromarray(filmed_frames[-1][-1]).resize((32, 32), Image.BILINEAR), dtype=np.float32)
        assert np.abs(small - images[-1]).mean() < 20
        assert len({f.tobytes() for f in np.concatenate(filmed_frames[1:])}) > 1, "frames follow the motion"
        _, skipped, _ = _run(filmed, chunks, {"video": False})
        assert all(f is None for f in skipped), "reset option video=False films nothing"
    finally:
        plain.close()
        filmed.close()


def test_env_rejects_a_bad_video_size():
    with pytest.raises(ValueError, match="video_size"):
        MetaWorldVLAEnv("reach-v3", EnvConfig(video_size=8))


def _frames(count=12, size=48):
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def test_annotation_adds_a_band_above_the_frames_and_holds_the_last():
    frames = _frames()
    out = annotate_frames(frames, "reach-v3", success=True, steps=11, max_episode_steps=500, hold=5)
    assert out.dtype == np.uint8 and out.shape[0] == 12 + 5 and out.shape[2] == 48
    band = out.shape[1] - 48
    assert band > 0
    np.testing.assert_array_equal(out[3, band:], frames[3])  # the scene itself is untouched
    assert not np.array_equal(out[0, :band], out[5, :band]), "the step counter changes"
    assert np.array_equal(out[-1], out[-5]), "the last frame is held"
    green = annotate_frames(frames[:1], "t", success=True, steps=3)[0, :band].reshape(-1, 3)
    red = annotate_frames(frames[:1], "t", success=False, steps=3)[0, :band].reshape(-1, 3)
    assert (green[:, 1] > green[:, 0] + 60).sum() > 20 and (red[:, 0] > red[:, 1] + 60).sum() > 20, "outcome colours"
    with pytest.raises(ValueError, match="uint8"):
        annotate_frames(frames.astype(np.float32), "t", True, 1)


def test_mp4_and_gif_files_decode_to_the_frames_written(tmp_path):
    frames = _frames(count=9, size=47)  # odd sides are padded for yuv420p
    mp4 = write_mp4(frames, tmp_path / "a.mp4", fps=10)
    with av.open(str(mp4)) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.codec_context.name == "h264" and stream.average_rate == 10
    assert len(decoded) == 9 and decoded[0].shape == (48, 48, 3)
    gif = write_gif(frames, tmp_path / "a.gif", fps=10)
    with Image.open(gif) as image:
        assert image.n_frames == 9 and image.size == (47, 47) and image.info["duration"] == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "a.mp4"], "no temporaries left"


def test_episode_video_names_the_outcome_and_refuses_unknown_formats(tmp_path):
    episode = Episode("reach-v3", "reach", False, 11, split="eval", config_index=3, frames=_frames())
    files = write_episode_video(episode, tmp_path, ["mp4", "gif"], fps=20, max_episode_steps=11)
    assert files == {"mp4": "reach-v3_eval003_failure.mp4", "gif": "reach-v3_eval003_failure.gif"}
    assert video_name(episode) == "reach-v3_eval003_failure"
    with pytest.raises(ValueError, match="unknown video format"):
        write_episode_video(episode, tmp_path, ["avi"])
    with pytest.raises(ValueError, match="no frames"):
        write_episode_video(Episode("reach-v3", "reach", True, 3), tmp_path)


def _eval_config(**overrides):
    return EvalConfig(tasks=TASKS, episodes_per_task=2, num_workers=0, max_episode_steps=20, **overrides)


def test_evaluation_films_the_first_episodes_of_each_task_and_runs_the_same_episodes(tmp_path, tiny_policy_dir):
    agent = CheckpointAgent(str(tiny_policy_dir))
    plain = evaluate(agent, _eval_config(), progress=False)
    seen = []
    filmed = evaluate(CheckpointAgent(str(tiny_policy_dir)), _eval_config(video_episodes=1, video_size=48,
                                                                          video_formats=["mp4", "gif"]),
                      progress=False, video_dir=tmp_path / "videos", on_episode=lambda e: seen.append(e.frames))
    assert filmed["episodes"] == plain["episodes"], "filming changes no episode"
    assert filmed["per_task"] == plain["per_task"] and filmed["env_steps"] == plain["env_steps"]
    assert "videos" not in plain
    videos = filmed["videos"]
    assert [(v["task"], v["config_index"]) for v in videos] == [(t, 0) for t in TASKS], "the first of each task"
    by_episode = {(e["task"], e["config_index"]): e for e in filmed["episodes"]}
    for video in videos:
        episode = by_episode[video["task"], video["config_index"]]
        assert video["success"] == episode["success"] and video["steps"] == episode["steps"]
        for fmt in ("mp4", "gif"):
            assert (tmp_path / "videos" / video["files"][fmt]).is_file()
    assert len(list((tmp_path / "videos").iterdir())) == 4
    # the callback sees the frames of filmed episodes: one after reset and one per step
    filmed_frames = [f for f in seen if f is not None]
    assert len(filmed_frames) == 2 and len([f for f in seen if f is None]) == 2
    assert all(f.shape[1:] == (48, 48, 3) for f in filmed_frames)
    assert sorted(len(f) for f in filmed_frames) == sorted(v["steps"] + 1 for v in videos)


def test_eval_config_checks_the_video_options(tmp_path, tiny_policy_dir):
    for bad, match in [({"video_episodes": -1}, "video_episodes"), ({"video_episodes": 1, "video_size": 8}, "video_size"),
                       ({"video_episodes": 1, "video_formats": ["webm"]}, "video_formats"),
                       ({"video_episodes": 1, "video_fps": 0}, "video_fps")]:
        with pytest.raises(ValueError, match=match):
            _eval_config(**bad).validate()
    with pytest.raises(ValueError, match="video_dir"):
        evaluate(CheckpointAgent(str(tiny_policy_dir)), _eval_config(video_episodes=1), progress=False)


def test_cli_eval_video_writes_mp4_and_gif_beside_the_results(tmp_path, capsys):
    output = tmp_path / "out" / "eval.json"
    code = main(["eval", "--policy", "scripted", "--tasks", "reach-v3", "--episodes", "2", "--workers", "0", "--quiet",
                 "--video", "1", "--gif", "--output", str(output), "max_episode_steps=20", "video_size=64"])
    assert code == 0
    result = json.loads(output.read_text())
    assert result["video_dir"] == "eval_videos" and len(result["videos"]) == 1
    files = result["videos"][0]["files"]
    assert set(files) == {"mp4", "gif"}
    assert all((output.parent / "eval_videos" / name).is_file() for name in files.values())
    assert "1 episode videos written" in capsys.readouterr().out
