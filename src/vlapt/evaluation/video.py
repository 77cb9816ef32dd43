"""Episode videos: the env's frames with the task, the step and the outcome drawn above them.

Frames come from the env (`EnvConfig.video_size`: a camera frame after reset and after every
env step, larger than the policy's image); this module only annotates them (Pillow) and encodes
them: MP4 (H.264, yuv420p, through PyAV, which plays in every browser) and, where asked, GIF
(Pillow). Files are written atomically, so a reader never finds half a video.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from vlapt.config import staged_file
from vlapt.interfaces import Episode

VIDEO_FORMATS: tuple[str, ...] = ("mp4", "gif")
_SUCCESS = (46, 160, 67)
_FAILURE = (204, 51, 51)
_BAND = (24, 24, 28)


def video_name(episode: Episode) -> str:
    """The file stem of an episode's video: task, split, configuration and outcome."""
    outcome = "success" if episode.success else "failure"
    return f"{episode.task}_{episode.split}{max(episode.config_index, 0):03d}_{outcome}"


def annotate_frames(frames: np.ndarray, task: str, success: bool, steps: int, max_episode_steps: int | None = None,
                    hold: int = 0) -> np.ndarray:
    """``frames`` ``(T, H, W, 3)`` uint8 (frame k: after step k) under a band naming the task, the step and the
    outcome; the last frame is repeated ``hold`` more times with a border in the outcome's colour."""
    from PIL import Image, ImageDraw, ImageFont

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 (T, H, W, 3) with T >= 1, got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    size = max(10, min(width, height) // 18)  # by the shorter side: several views side by side keep the same text
    font, small = ImageFont.load_default(size=size + 2), ImageFont.load_default(size=size)
    band = 2 * size + 20
    colour = _SUCCESS if success else _FAILURE
    outcome = f"success at step {steps}" if success else f"failure ({steps} steps)"
    limit = f" / {max_episode_steps}" if max_episode_steps else ""

    base = Image.new("RGB", (width, height + band), _BAND)
    draw = ImageDraw.Draw(base)
    draw.text((6, 4), task, font=font, fill=(240, 240, 240))
    badge = draw.textbbox((0, 0), outcome, font=small)
    x = width - (badge[2] - badge[0]) - 12
    y = size + 12
    draw.rounded_rectangle((x - 4, y - 1, width - 6, y + badge[3] + 3), radius=4, fill=colour)
    draw.text((x, y), outcome, font=small, fill=(255, 255, 255))

    out = np.empty((len(frames) + hold, height + band, width, 3), dtype=np.uint8)
    for k, frame in enumerate(frames):
        image = base.copy()
        ImageDraw.Draw(image).text((6, y), f"step {min(k, steps)}{limit}", font=small, fill=(200, 200, 200))
        image.paste(Image.fromarray(frame), (0, band))
        out[k] = np.asarray(image)
    if hold:
        last = out[len(frames) - 1].copy()
        edge = max(2, width // 64)
        last[band:band + edge], last[-edge:], last[band:, :edge], last[band:, -edge:] = colour, colour, colour, colour
        out[len(frames):] = last
    return out


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int = 30, crf: int = 23) -> Path:
    """H.264 MP4 (yuv420p, ``+faststart`` so browsers play it before it has all loaded), written atomically."""
    import av

    frames = _even(np.asarray(frames))
    path = Path(path)
    height, width = frames.shape[1:3]
    with staged_file(path) as staging:
        with av.open(str(staging), "w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=int(fps))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf), "preset": "veryfast"}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
    return path


def write_gif(frames: np.ndarray, path: str | os.PathLike, fps: int = 30) -> Path:
    """An endlessly looping GIF (Pillow), written atomically."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in np.asarray(frames)]
    path = Path(path)
    with staged_file(path) as staging:
        images[0].save(staging, format="GIF", save_all=True, append_images=images[1:],
                       duration=max(20, round(1000 / fps)), loop=0, optimize=False)
    return path


def write_episode_video(episode: Episode, directory: str | os.PathLike, formats: Sequence[str] = ("mp4",),
                        fps: int = 30, max_episode_steps: int | None = None) -> dict[str, str]:
    """Annotate ``episode.frames`` and write them to ``directory`` in each format; the file names by format."""
    if episode.frames is None:
        raise ValueError(f"episode of {episode.task} on configuration {episode.config_index} has no frames; "
                         "run it with EnvConfig.video_size > 0")
    unknown = sorted(set(formats) - set(VIDEO_FORMATS))
    if unknown:
        raise ValueError(f"unknown video format(s) {unknown}; choose from {list(VIDEO_FORMATS)}")
    frames = annotate_frames(episode.frames, episode.task, episode.success, episode.steps, max_episode_steps,
                             hold=max(1, int(fps)))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for fmt in formats:
        name = f"{video_name(episode)}.{fmt}"
        (write_mp4 if fmt == "mp4" else write_gif)(frames, directory / name, fps)
        written[fmt] = name
    return written


def _even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides: repeat the last row/column where one is odd."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames
