"""``vlapt report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page about one or more runs.

The page holds the results (every evaluated row of each run, and per task), the learning
curves, the episode videos, the resolved config and how the run was made (command, commit,
machine, wall time). Figures and videos are embedded as data URIs, so the file can be mailed or
archived alone; it loads nothing from anywhere. Templates: jinja2 (``templates/report.html.j2``),
with autoescaping, so a config or task name is shown as text, never run as markup.
"""

from __future__ import annotations

import base64
import datetime
import os
from pathlib import Path
from typing import Sequence

from vlapt.config import staged_file
from vlapt.report.figures import learning_curves
from vlapt.report.runs import Run, finite, read_run

_MIME = {"mp4": "video/mp4", "gif": "image/gif"}


def build_report(run_dirs: Sequence[str | os.PathLike], output: str | os.PathLike, labels: Sequence[str] | None = None,
                 title: str | None = None, max_video_mb: float = 64.0) -> Path:
    """Write the report of ``run_dirs`` to ``output`` (atomically) and return its path.

    Videos are embedded until their total passes ``max_video_mb``; the rest are listed by name.
    """
    import jinja2

    if not run_dirs:
        raise ValueError("no run directories to report on")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs; "
                         "give --labels one comma-separated label per run")
    output = Path(output)
    if output.is_dir():
        raise ValueError(f"output {output} is a directory; give a file path such as {output / 'report.html'}")
    runs = [read_run(path, labels[i] if labels else None) for i, path in enumerate(run_dirs)]
    _unique_names(runs)
    curves = learning_curves(runs)
    budget = [int(max_video_mb * 2**20)]
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                                     autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                                     lstrip_blocks=True)
    environment.filters.update(rate=_rate, steps=_steps, seconds=_seconds)
    views = [_run_view(run, budget) for run in runs]
    page = environment.get_template("report.html.j2").render(
        title=title or ("vlapt run: " + runs[0].name if len(runs) == 1 else f"vlapt: {len(runs)} runs"),
        runs=views,
        any_training_split=any(row["split"] == "train" for view in views for row in view["rows"]),
        curves=_data_uri(curves, "image/png") if curves else None,
        within=_within(runs),
        generated=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    )
    with staged_file(output) as staging:
        staging.write_text(page, encoding="utf-8")
    return output


def _run_view(run: Run, budget: list[int]) -> dict:
    rows = []
    for row in run.rows:
        protocol = row.result.get("protocol", {})
        rows.append({"label": row.label, "average": row.result["average"], "per_task": row.result.get("per_task", {}),
                     "episodes_per_task": protocol.get("episodes_per_task"), "limit": protocol.get("max_episode_steps"),
                     "deterministic": protocol.get("deterministic"), "split": protocol.get("split"),
                     "agent": row.result.get("agent", ""),
                     "wall_time_s": row.result.get("wall_time_s")})
    videos, left_out = [], []
    for row in run.rows:
        for video in row.result.get("videos", []):
            files = video.get("files", {})
            fmt = "mp4" if "mp4" in files else "gif" if "gif" in files else None
            if fmt is None:
                continue
            path = row.video_path(files[fmt])
            if path is None:
                left_out.append(f"{str(files[fmt])[:80]!r} (not a video file name)")
                continue
            entry = {"row": row.label, "task": video.get("task", "?"), "success": bool(video.get("success")),
                     "steps": video.get("steps"), "config_index": video.get("config_index"), "name": path.name,
                     "kind": "video" if fmt == "mp4" else "image"}
            size = path.stat().st_size if path.is_file() else None
            if size is None:
                left_out.append(f"{path.name} (missing)")
            elif size > budget[0]:
                left_out.append(f"{path.name} (over the report's video budget)")
            else:
                budget[0] -= size
                entry["src"] = _data_uri(path.read_bytes(), _MIME[fmt])
                videos.append(entry)
    provenance = dict(run.provenance)
    facts = [(name, provenance.get(key)) for key, name in
             (("command", "command"), ("commit", "commit"), ("machine", "machine"), ("started", "started"),
              ("finished", "finished"))]
    wall = provenance.get("wall_time_s", provenance.get("training_wall_time_s"))
    facts.append(("wall time", _seconds(wall) if finite(wall) else None))
    if run.timings:
        facts.append(("stages", ", ".join(f"{k.removesuffix('_s')} {_seconds(v)}" for k, v in run.timings.items()
                                          if finite(v))))
    return {"name": run.name, "path": str(run.path), "kind": run.kind, "rows": rows, "tasks": run.tasks,
            "facts": [(k, v) for k, v in facts if v not in (None, "")], "config": run.config_text,
            "videos": videos, "left_out": left_out, "has_history": bool(run.history),
            "iterations": len(run.history), "env_steps": run.history[-1]["env_steps"] if run.history else None}


def _unique_names(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        count = seen.get(run.name, 0)
        seen[run.name] = count + 1
        if count:
            run.name = f"{run.name} ({count + 1})"


def _within(runs: list[Run]) -> list[str]:
    for run in runs:
        for row in run.rows:
            return list(row.result["average"].get("success_within", {}))
    return []


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _rate(value) -> str:
    return f"{value:.3f}" if finite(value) else "-"


def _steps(value) -> str:
    return f"{value:.1f}" if finite(value) else "-"


def _seconds(value) -> str:
    if not finite(value):
        return "-"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.2f} h"
