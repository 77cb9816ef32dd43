"""The main job: collect demonstrations -> SFT -> post-training -> evaluate.

Post-training is chunked PPO with self-BC by default; ``post_training=NAME`` runs another
algorithm of `vlapt.algorithms` (``grpo``, or a module of your own) in its place, configured by
the section of its name (``ppo.*``, ``grpo.*``) and written to ``output_dir/NAME``.

Optionally (``dagger_rounds > 0``) rounds of expert relabelling sit between SFT and
post-training: the SFT policy's own rollouts are labelled by the scripted expert and SFT
continues on demonstrations plus every relabelled set so far.

Each stage writes under ``output_dir`` and is skipped or resumed when its output already
exists, so an interrupted pipeline continues where it stopped. The evaluation rows are
the ones every results table carries: the scripted expert, the SFT policy and the
post-trained policy, on the same held-out configurations. Post-training's last iterate and,
when it keeps one (``ema_decay > 0``, the default), the moving average of its weights
are both rows: the same run, two ways of reading a policy off it; a run with ``swa_start_env_steps > 0``
adds another, the uniform average of its late iterates.

At the end the pipeline films a few evaluation episodes of the post-trained policy
(``video_episodes`` per task, into ``videos/``), records how the run was made (``run.json``:
command, commit, machine, wall time) and writes ``report.html`` (`vlapt.report`), whose path it
prints.
"""

from __future__ import annotations

import dataclasses
import keyword
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from vlapt.algorithms import PIPELINE_FIELDS, Algorithm, built_in, get_algorithm
from vlapt.algorithms.ppo_sbc import PPOConfig
from vlapt.algorithms.sft import SFTConfig, train_sft
from vlapt.config import ConfigError, atomic_write_json, atomic_write_text, load_config, peek_option
from vlapt.data.collect import CollectConfig, collect
from vlapt.data.relabel import RelabelConfig, relabel
from vlapt.envs import get_suite
from vlapt.envs.experts import make_experts
from vlapt.evaluation import CheckpointAgent, EvalConfig, checkpoint_evaluator, evaluate, format_table
from vlapt.report import build_report
from vlapt.report.runs import ROW_ORDER
from vlapt.rundir import CONFIG_FILE, RunRecord, check_output_dir, check_recorded_config, open_run

log = logging.getLogger("vlapt.pipeline")


@dataclasses.dataclass
class PipelineStages:
    """Every option of the pipeline but the post-training algorithm's own (see PipelineConfig)."""

    output_dir: str = "runs/pipeline"
    suite: str = "mt10"
    collect: CollectConfig = dataclasses.field(default_factory=CollectConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    # the post-training algorithm (as `vlapt train --algorithm`); its options are the section of its name
    post_training: str = "ppo"
    # every row; the scripted experts decide at every step whatever eval.execute_steps says
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    evaluate_scripted: bool = True
    dagger_rounds: int = 0  # expert-relabelling rounds between SFT and post-training (0: none)
    relabel: RelabelConfig = dataclasses.field(default_factory=RelabelConfig)
    dagger_sft: SFTConfig = dataclasses.field(  # continues from the previous round's policy
        default_factory=lambda: SFTConfig(steps=3000, lr=1e-4, warmup_steps=100))
    # a stage already made with other options: refuse, naming them (false), or redo it and every stage after it (true)
    rerun_stale: bool = False
    # film the first N evaluation episodes per task of the post-trained policy (eval.video_* set size, fps, formats;
    # eval.video_episodes > 0 films every row); 0: none
    video_episodes: int = 2
    report: bool = True  # write report.html (vlapt report) at the end

    def algorithm(self) -> Algorithm:
        """The post-training algorithm ``post_training`` names."""
        return get_algorithm(self.post_training)

    @property
    def post_train(self) -> Any:
        """The post-training algorithm's config: the section named after it."""
        name = self.algorithm().name
        if not hasattr(self, name):
            raise ConfigError(f"post_training={self.post_training} needs a '{name}' section: load the config with "
                              "vlapt.pipeline.load_pipeline_config (or build it from pipeline_config_class)")
        return getattr(self, name)

    def resolved(self) -> "PipelineStages":
        """Wire the stages together: paths live under output_dir, every stage runs the same suite."""
        out = Path(self.output_dir)
        demos = str(out / ("demos_lerobot" if self.collect.format == "lerobot" else "demos.hdf5"))
        post_train, post = self.post_train, self.algorithm().name
        wiring = [("collect", "suite", self.suite), ("collect", "output", demos), ("sft", "dataset", demos),
                  ("sft", "output_dir", str(out / "sft")), (post, "suite", self.suite),
                  (post, "init_policy", str(self.dagger_policy(self.dagger_rounds))), (post, "demos", demos),
                  (post, "output_dir", str(self.post_training_dir())), ("eval", "suite", self.suite),
                  ("relabel", "suite", self.suite)]
        if self.collect.tasks:
            wiring += [(section, "tasks", list(self.collect.tasks))
                       for section in ("sft", post, "eval", "relabel", "dagger_sft")]
        for section, field, value in wiring:
            config = post_train if section == post else getattr(self, section)
            given, default = getattr(config, field), getattr(type(config)(), field)
            if given not in (default, value):
                log.warning("%s.%s=%r is ignored: the pipeline sets it to %r (stage paths follow output_dir, "
                            "every stage runs suite, and collect.tasks when given)", section, field, given, value)
            setattr(config, field, value)
        if self.dagger_rounds < 0:
            raise ValueError(f"dagger_rounds must be >= 0, got {self.dagger_rounds}")
        if self.video_episodes < 0:
            raise ValueError(f"video_episodes must be >= 0 (0: no videos), got {self.video_episodes}")
        if self.eval.execute_steps > self.sft.model.chunk_len:  # found here, not after an hour of collect and SFT
            raise ValueError(f"eval.execute_steps={self.eval.execute_steps} exceeds sft.model.chunk_len="
                             f"{self.sft.model.chunk_len}; use 1..{self.sft.model.chunk_len} (0: the whole chunk)")
        return self

    def post_training_dir(self) -> Path:
        return Path(self.output_dir) / self.algorithm().name

    def dagger_policy(self, round_: int) -> Path:
        """The policy after ``round_`` relabelling rounds (0: the SFT policy)."""
        out = Path(self.output_dir)
        return out / "sft" / "policy" if round_ == 0 else out / f"sft_dagger_{round_}" / "policy"

    def dagger_round(self, round_: int) -> tuple[RelabelConfig, SFTConfig]:
        """Round r labels the policy of round r-1 and trains on the demos plus relabelled sets 1..r."""
        out = Path(self.output_dir)
        relabel_config = dataclasses.replace(self.relabel, policy=str(self.dagger_policy(round_ - 1)),
                                             output=str(out / f"relabelled_{round_}.hdf5"))
        sft_config = dataclasses.replace(
            self.dagger_sft, dataset=self.collect.output, init_policy=str(self.dagger_policy(round_ - 1)),
            extra_datasets=[str(out / f"relabelled_{r}.hdf5") for r in range(1, round_ + 1)],
            output_dir=str(self.dagger_policy(round_).parent))
        return relabel_config, sft_config


@dataclasses.dataclass
class PipelineConfig(PipelineStages):
    """The pipeline's options, post-training with chunked PPO + self-BC (the default, ``post_training=ppo``).

    ``pipeline_config_class(name)`` gives the class for another post-training algorithm, with a
    section of that algorithm's options in place of ``ppo``; ``load_pipeline_config`` picks it.
    """

    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)


def pipeline_config_class(post_training: str = "ppo") -> type[PipelineStages]:
    """The pipeline config class whose post-training section is ``post_training``'s config (named after it)."""
    algorithm = get_algorithm(post_training)
    if algorithm.config is PPOConfig:
        return PipelineConfig
    name = algorithm.name
    if not name.isidentifier() or keyword.iskeyword(name):
        raise ConfigError(f"algorithm {post_training!r} is named {name!r}, which cannot name the pipeline's section of "
                          "its options; give its Algorithm a name that is a Python identifier")
    if hasattr(PipelineStages, name) or name in {field.name for field in dataclasses.fields(PipelineStages)}:
        raise ConfigError(f"algorithm {post_training!r} is named {name!r}, which the pipeline's config already "
                          "uses; give its Algorithm another name")
    fields = {field.name for field in dataclasses.fields(algorithm.config)}
    missing = [f for f in PIPELINE_FIELDS if f not in fields and not hasattr(algorithm.config, f)]
    if missing:
        raise ConfigError(f"algorithm {post_training!r} cannot be the pipeline's post-training: its config "
                          f"{algorithm.config.__name__} lacks {', '.join(missing)} (vlapt.algorithms.PIPELINE_FIELDS)")
    cls = dataclasses.make_dataclass(
        "PipelineConfig", [("post_training", str, dataclasses.field(default=post_training)),
                           (name, algorithm.config, dataclasses.field(default_factory=algorithm.config))],
        bases=(PipelineStages,))
    cls.__module__ = __name__
    return cls


def load_pipeline_config(path=None, overrides=()) -> PipelineStages:
    """The pipeline's config from YAML files and ``key=value`` overrides, with the post-training they choose."""
    chosen = peek_option("post_training", path, overrides) or "ppo"
    try:
        cls = pipeline_config_class(chosen)
    except ValueError as exc:
        raise ConfigError(f"post_training: {exc}") from None
    try:
        return load_config(cls, path, overrides)
    except ConfigError as exc:
        section = (exc.key or "").split(".")[0]
        if section and section != get_algorithm(chosen).name and section in built_in():
            hint = f"add post_training={section} (vlapt pipeline --post-training {section})"
            raise ConfigError(f"{exc}; the '{section}' options apply when {section} is the post-training: {hint}",
                              key=exc.key) from None
        raise


def stages(config: PipelineStages) -> list[tuple[str, Path, Any, tuple[str, ...], Path]]:
    """Each stage's name, output, config, options that may change between invocations, and what shows it started."""
    from vlapt.algorithms import sft

    out = Path(config.output_dir)
    demos = Path(config.collect.output)
    found = [("collect", demos, config.collect, COLLECT_RESUMABLE, demos),
             ("sft", out / "sft", config.sft, sft.RESUMABLE, out / "sft" / "checkpoints")]
    for round_ in range(1, config.dagger_rounds + 1):
        relabel_config, sft_config = config.dagger_round(round_)
        labels = Path(relabel_config.output)
        found.append((f"relabel {round_}", labels, relabel_config, COLLECT_RESUMABLE, labels))
        sft_dir = Path(sft_config.output_dir)
        found.append((f"DAgger SFT {round_}", sft_dir, sft_config, sft.RESUMABLE, sft_dir / "checkpoints"))
    post_dir = config.post_training_dir()
    found.append(("post-training", post_dir, config.post_train, config.algorithm().resumable, post_dir / "checkpoints"))
    return found


COLLECT_RESUMABLE = ("num_workers", "env_backend", "overwrite", "output")


def check_stages(config: PipelineStages) -> None:
    """Stop before anything runs when a finished stage was made with other options (or, with rerun_stale, redo it)."""
    listed = stages(config)
    for k, (name, output, stage_config, exempt, started) in enumerate(listed):
        if not started.exists():
            continue
        dataset = output.suffix == ".hdf5"  # a dataset may come without its record; a started stage directory may not
        recorded = output.with_suffix(".config.yaml") if dataset else output / CONFIG_FILE
        try:
            check_recorded_config(recorded, stage_config, exempt, what=f"{name} stage", required=not dataset)
        except ConfigError as exc:
            if not config.rerun_stale:
                raise ConfigError(f"{exc}; or pass rerun_stale=true to redo the {name} stage and the stages after it") from None
            for _, later, *_ in listed[k:]:
                log.warning("rerun_stale: removing %s", later)
                if later.is_dir():
                    shutil.rmtree(later)
                else:
                    later.unlink(missing_ok=True)
                    later.with_suffix(".config.yaml").unlink(missing_ok=True)
            return


def validate_stages(config: PipelineStages) -> None:
    """Check every stage's options (each DAgger round's included) before the first one runs."""
    for _, _, stage_config, _, _ in stages(config):
        stage_config.validate()
    config.eval.validate()


def run_pipeline(config: PipelineStages, progress: bool = True, command: str | None = None) -> dict:
    """Run (or resume) every stage; ``command`` is recorded in run.json (default: this process's argv)."""
    config.resolved()
    validate_stages(config)  # a bad option of a late stage is found now, not after an hour of collect and SFT
    check_output_dir(config.output_dir)
    with open_run(config.output_dir, config, has_progress="", log_file=None, resume=False,
                  check=lambda: check_stages(config)):
        return _run_stages(config, progress, command or " ".join(sys.argv))


def _run_stages(config: PipelineStages, progress: bool, command: str) -> dict:
    out = Path(config.output_dir)
    timings: dict[str, float] = {}
    record = RunRecord(out, command,
                       post_training_dir=config.post_training_dir().name).start()  # where `vlapt report` finds its curves

    t = time.perf_counter()
    if Path(config.collect.output).exists():
        log.info("demonstrations exist at %s: reusing them", config.collect.output)
    else:
        collect(config.collect, progress=progress)
    timings["collect_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sft_policy = train_sft(config.sft, progress=progress)
    timings["sft_s"] = time.perf_counter() - t

    if config.dagger_rounds:
        t = time.perf_counter()
        for round_ in range(1, config.dagger_rounds + 1):
            relabel_config, sft_config = config.dagger_round(round_)
            if Path(relabel_config.output).exists():
                log.info("relabelled episodes exist at %s: reusing them", relabel_config.output)
            else:
                relabel(relabel_config, CheckpointAgent(relabel_config.policy), progress=progress)
            dagger_policy = train_sft(sft_config, progress=progress)
        timings["dagger_s"] = time.perf_counter() - t

    t = time.perf_counter()
    algorithm, post = config.algorithm(), config.post_train
    evaluator = checkpoint_evaluator(post.tasks or get_suite(post.suite).tasks, post.eval_episodes, post.num_workers,
                                     post.suite, post.seed, post.env_backend)
    post_trained_policy = algorithm.train(post, progress=progress, evaluator=evaluator)
    timings["post_train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    rows = {}
    protocol = config.eval

    def policy_agent(path) -> CheckpointAgent:
        return CheckpointAgent(str(path), deterministic=protocol.deterministic, seed=protocol.seed)

    suite = get_suite(protocol.suite)
    # the reference row: the experts whose demonstrations SFT learned from
    expert = make_experts(suite, config.collect.expert, config.collect.expert_per_task)
    expert_row = "scripted expert" if expert.name == suite.expert_names[0] else f"scripted expert ({expert.name})"
    agents = [(expert_row, "scripted", expert, dataclasses.replace(protocol, execute_steps=0))
              ] if config.evaluate_scripted else []
    agents.append(("SFT", "sft", policy_agent(sft_policy), protocol))
    if config.dagger_rounds:
        rounds = f"{config.dagger_rounds} round" + ("s" if config.dagger_rounds > 1 else "")
        agents.append((f"SFT + DAgger ({rounds})", "dagger", policy_agent(dagger_policy), protocol))
    title = algorithm.title(post) if callable(algorithm.title) else algorithm.title or algorithm.name
    post_trained = ("SFT + DAgger + " if config.dagger_rounds else "SFT + ") + title
    agents.append((post_trained, "post_trained", policy_agent(post_trained_policy), protocol))
    for directory, label, file_key in (("policy_ema", "weight average", "post_trained_average"),
                                       ("policy_swa", "uniform tail average", "post_trained_swa")):
        weight_average = Path(post_trained_policy).parent / directory  # left only when it belongs to this run
        if weight_average.is_dir():
            agents.append((f"{post_trained}, {label}", file_key, policy_agent(weight_average), protocol))
    for file_key in set(ROW_ORDER) - {key for _, key, _, _ in agents}:  # an earlier run's row that this one has not
        (out / f"eval_{file_key}.json").unlink(missing_ok=True)
    for name, file_key, agent, eval_config in agents:
        if eval_config.execute_steps:
            name = f"{name} (first {eval_config.execute_steps} actions of each chunk)"
        if not protocol.deterministic and file_key != "scripted":
            name = f"{name}, sampled chunks"
        if file_key == "post_trained" and config.video_episodes and not eval_config.video_episodes:
            eval_config = dataclasses.replace(eval_config, video_episodes=config.video_episodes)
        video_dir = out / "videos" / file_key
        rows[name] = evaluate(agent, eval_config, progress=progress, video_dir=video_dir)
        rows[name]["row"] = name
        if "video_dir" in rows[name]:
            rows[name]["video_dir"] = os.path.relpath(video_dir, out)
        atomic_write_json(out / f"eval_{file_key}.json", rows[name])
    timings["eval_s"] = time.perf_counter() - t

    report = results_markdown(rows, timings)
    atomic_write_text(out / "results.md", report)
    atomic_write_json(out / "timings.json", timings)
    record.finish()
    print(report)
    page = None
    if config.report:
        try:
            page = build_report([out], out / "report.html")
            print(f"report: {page}")
        except (ValueError, OSError) as exc:  # the results are written; a report can be made again later
            log.warning("report.html could not be written (%s); make it with: vlapt report %s", exc, out)
    return {"rows": rows, "timings": timings, "report": page}


def results_markdown(rows: dict[str, dict], timings: dict[str, float] | None = None) -> str:
    limit = next(iter(rows.values()))["protocol"]["max_episode_steps"] if rows else 500
    within = list(next(iter(rows.values()))["average"].get("success_within", {})) if rows else []
    lines = [f"| policy | success | steps to success | steps (failures = {limit}) |"
             + "".join(f" success within {n} |" for n in within), "|---|---|---|---|" + "---|" * len(within)]
    for name, result in rows.items():
        avg = result["average"]
        steps = "-" if avg["steps_to_success"] is None else f"{avg['steps_to_success']:.1f}"
        lines.append(f"| {name} | {avg['success_rate']:.3f} | {steps} | {avg['steps_failures_as_limit']:.1f} |"
                     + "".join(f" {avg['success_within'][n]:.3f} |" for n in within))
    parts = ["\n".join(lines)]
    for name, result in rows.items():
        parts.append(format_table(result, title=name))
    if timings:
        parts.append("wall time (s): " + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in timings.items()))
    return "\n\n".join(parts) + "\n"
