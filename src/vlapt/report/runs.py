"""What a run directory holds, read for the report (only files: nothing is run or loaded).

A pipeline ``output_dir`` has ``config.yaml``, ``eval_<row>.json`` (one per results row, with
``videos`` where the row was filmed), ``results.md``, ``timings.json``, ``run.json``
(command, commit, machine, wall time, and ``post_training_dir``) and the post-training run in
that directory, ``ppo/`` by default (``history.json``, ``evals/iteration_*.json``). A ``vlapt train`` ``output_dir`` has
``config.yaml``, ``history.json``, ``evals/`` (and ``run.json``). A policy directory that
``vlapt eval`` wrote into has ``eval*.json``. Any of them can be reported; what is missing is
left out of the page.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from vlapt.evaluation.curves import load_evaluations, load_history

# the pipeline's rows (eval_<key>.json), in the order its results table has them
ROW_ORDER = ("scripted", "sft", "dagger", "post_trained", "post_trained_average", "post_trained_swa")
ROW_LABELS = {"scripted": "scripted expert", "sft": "SFT", "dagger": "SFT + DAgger",
              "post_trained": "post-trained", "post_trained_average": "post-trained, weight average",
              "post_trained_swa": "post-trained, uniform tail average"}


@dataclasses.dataclass
class Row:
    """One evaluated policy of a run: its label and its evaluation result (as `evaluate` returns it)."""

    key: str
    label: str
    result: dict
    path: Path  # the JSON it was read from (video paths are relative to its directory)

    def video_path(self, name: str) -> Path | None:
        """Where a video the result names lies; None for a name that is not a plain video file name (a result
        from elsewhere must not make the report embed ``../../secret`` or ``/home/me/.ssh/id_rsa``)."""
        if not isinstance(name, str) or Path(name).name != name or Path(name).suffix not in (".mp4", ".gif"):
            return None
        directory = Path(self.result.get("video_dir", ""))
        return (directory if directory.is_absolute() else self.path.parent / directory) / name


@dataclasses.dataclass
class Run:
    path: Path
    name: str
    kind: str  # "pipeline", "train" or "evaluation"
    config_text: str = ""
    rows: list[Row] = dataclasses.field(default_factory=list)
    history: list[dict] = dataclasses.field(default_factory=list)
    evaluations: list[tuple[int, dict]] = dataclasses.field(default_factory=list)  # (env_steps, average)
    provenance: dict = dataclasses.field(default_factory=dict)  # command, commit, machine, wall_time_s, ...
    timings: dict = dataclasses.field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        seen: list[str] = []
        for row in self.rows:
            seen += [t for t in row.result.get("per_task", {}) if t not in seen]
        return seen


def read_run(path: str | Path, name: str | None = None) -> Run:
    """Everything the report shows about the run in ``path``; a ValueError if it is not a run directory."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory; give a run's output_dir (vlapt pipeline, vlapt train)")
    provenance = _json(path / "run.json") or {}
    recorded_dir = provenance.get("post_training_dir") if isinstance(provenance, dict) else None
    post_training = path / Path(str(recorded_dir or "ppo")).name
    training = post_training if post_training.is_dir() else path
    has_history = (training / "history.json").is_file() or (training / "checkpoints" / "latest").is_file()
    evals = sorted(path.glob("eval*.json"))
    kind = "pipeline" if post_training.is_dir() or (path / "sft").is_dir() else "train" if has_history else "evaluation"
    run = Run(path=path, name=name or path.resolve().name, kind=kind)
    if not (evals or has_history or (path / "config.yaml").is_file() or (path / "run.json").is_file()):
        raise ValueError(f"{path} holds no run: no config.yaml, history.json or eval*.json; give the output_dir of "
                         "`vlapt pipeline` or `vlapt train`, or a policy directory `vlapt eval` wrote into")
    if (path / "config.yaml").is_file():
        run.config_text = (path / "config.yaml").read_text()
    run.provenance = provenance
    run.timings = _json(path / "timings.json") or {}
    for file in sorted(evals, key=_row_rank):
        result = _json(file)
        if isinstance(result, dict) and "average" in result:
            key = file.stem.removeprefix("eval_").removeprefix("eval")
            run.rows.append(Row(key or "eval", result.get("row") or ROW_LABELS.get(key) or file.stem, result, file))
    if has_history:
        run.history = load_history(training)
        run.evaluations = load_evaluations(training, run.history)
        if not run.rows:  # a training run alone: its first and last held-out evaluations stand for it
            run.rows = _periodic_rows(training, run.history)
        if "wall_time_s" not in run.provenance and run.history:
            run.provenance.setdefault("training_wall_time_s", run.history[-1].get("wall_time_s"))
    return run


def _periodic_rows(training: Path, history: list[dict]) -> list[Row]:
    files = sorted(training.glob("evals/iteration_*.json"))
    if not files:
        return []
    picked = [files[0]] + ([files[-1]] if len(files) > 1 else [])
    rows = []
    steps_at = {0: 0, **{r["iteration"]: r["env_steps"] for r in history}}
    for file in picked:
        iteration = int(file.stem.split("_")[1])
        steps = steps_at.get(iteration)
        label = ("starting policy" if iteration == 0 else
                 f"iteration {iteration}" + (f" ({steps:,} env steps)" if steps is not None else ""))
        result = _json(file)
        if isinstance(result, dict) and "average" in result:
            rows.append(Row(file.stem, label, result, file))
    return rows


def _row_rank(file: Path) -> tuple[int, str]:
    key = file.stem.removeprefix("eval_")
    return (ROW_ORDER.index(key) if key in ROW_ORDER else len(ROW_ORDER), file.name)


def _json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
