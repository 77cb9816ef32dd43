"""The `vlapt` command line.

Every command takes ``--config FILE.yaml`` and trailing ``key=value`` overrides of its
typed config (``vlapt sft --config configs/sft_mt10.yaml lr=1e-4``); flags such as
``--suite`` are shortcuts for the most used overrides. Each run writes its resolved config
next to its outputs. Errors in the input exit with status 2 and a message saying what to fix.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Callable

EXIT_BAD_INPUT = 2
SUITE_HELP = "a registered env suite (mt10, mt50) or module:attribute of your own"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", help="YAML file with options (see configs/); give several "
                        "to layer them (later files win); overrides follow as key=value")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override any config option, e.g. num_workers=2")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--print-config", dest="print_config", action="store_true",
                        help="print every option of the command (defaults, --config files and overrides applied) as "
                             "YAML and exit")


def _printed(args: argparse.Namespace, config) -> bool:
    """With --print-config: print ``config`` as YAML (what the run would write as config.yaml) and say so."""
    if not getattr(args, "print_config", False):
        return False
    import yaml

    from vlapt.config import to_dict

    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return True


def _shortcut(args: argparse.Namespace, mapping: dict[str, str]) -> list[str]:
    """Turn shortcut flags into overrides placed before the explicit ones (which win)."""
    out = []
    for flag, key in mapping.items():
        value = getattr(args, flag, None)
        if value is None or value is False:
            continue
        if isinstance(value, bool):
            value = "true"
        elif isinstance(value, list):
            value = "[" + ",".join(json.dumps(v) for v in value) + "]"
        elif isinstance(value, str):  # quoted, so that YAML reads a path such as "runs/a #1" or "off" as it is
            value = json.dumps(value)
        out.append(f"{key}={value}")
    return out + list(args.overrides)


def _tasks_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# -- tasks -------------------------------------------------------------------------------------
def cmd_tasks(args: argparse.Namespace) -> int:
    from vlapt.envs import get_suite

    suite = get_suite(args.suite)
    for task in suite.tasks:
        print(f"{task:32s} {suite.instruction(task)}")
    return 0


# -- collect -----------------------------------------------------------------------------------
def cmd_collect(args: argparse.Namespace) -> int:
    from vlapt.config import load_config
    from vlapt.data.collect import CollectConfig, collect

    overrides = _shortcut(args, {"suite": "suite", "tasks": "tasks", "demos_per_task": "demos_per_task",
                                 "output": "output", "overwrite": "overwrite", "workers": "num_workers"})
    config = load_config(CollectConfig, args.config, overrides)
    if _printed(args, config):
        return 0
    config.validate()
    summary = collect(config, progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    return 0


# -- relabel -----------------------------------------------------------------------------------
def cmd_relabel(args: argparse.Namespace) -> int:
    from vlapt.config import load_config
    from vlapt.data.format import check_writable
    from vlapt.data.relabel import RelabelConfig, relabel
    from vlapt.evaluation import CheckpointAgent

    overrides = _shortcut(args, {"policy": "policy", "suite": "suite", "tasks": "tasks",
                                 "episodes_per_task": "episodes_per_task", "output": "output",
                                 "overwrite": "overwrite", "workers": "num_workers"})
    config = load_config(RelabelConfig, args.config, overrides)
    if _printed(args, config):
        return 0
    config.validate()
    check_writable(config.output, config.overwrite)  # before the policy loads, as relabel itself checks it
    summary = relabel(config, CheckpointAgent(config.policy), progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    print(f"train on it with: vlapt sft extra_datasets=[{summary['output']}] ...")
    return 0


# -- eval --------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    import os

    from vlapt.config import atomic_write_json, check_output_file, load_config
    from vlapt.envs import get_suite
    from vlapt.evaluation import EvalConfig, evaluate, format_table

    overrides = _shortcut(args, {"suite": "suite", "tasks": "tasks", "episodes": "episodes_per_task",
                                 "workers": "num_workers", "seed": "seed", "video": "video_episodes"})
    if args.gif:
        overrides.insert(0, "video_formats=[mp4,gif]")
    config = load_config(EvalConfig, args.config, overrides)
    if _printed(args, config):
        return 0
    config.validate()
    if args.gif and config.video_episodes == 0:
        raise ValueError("--gif adds GIFs to the episodes that are filmed, and none are: add --video N")
    suite = get_suite(config.suite)
    if args.server:
        RemotePolicyAgent = _serving().RemotePolicyAgent
        agent = RemotePolicyAgent(args.server, deterministic=config.deterministic)
        where = "".join(c if c.isalnum() else "_" for c in args.server.split("://", 1)[-1]).strip("_")
        default_output = Path("outputs") / f"eval_server_{where}.json"
    elif args.policy in suite.expert_names:
        agent = suite.make_expert(args.policy)
        default_output = (Path("outputs") /
                          f"eval_{args.policy.replace('-', '_')}_{'_'.join(config.tasks) if config.tasks else config.suite}.json")
    else:
        from vlapt.evaluation import CheckpointAgent

        agent = CheckpointAgent(args.policy, deterministic=config.deterministic, seed=config.seed)
        default_output = Path(args.policy) / ("eval.json" if config.split == "eval" else f"eval_{config.split}.json")
    output = Path(args.output) if args.output else default_output
    check_output_file(output, "eval.json")
    video_dir = output.with_name(f"{output.stem}_videos")
    try:
        result = evaluate(agent, config, progress=not args.quiet, video_dir=video_dir)
    finally:
        if hasattr(agent, "close"):
            agent.close()
    result["command"] = "vlapt " + " ".join(args.argv)
    if "video_dir" in result:
        result["video_dir"] = os.path.relpath(video_dir, output.parent)
    atomic_write_json(output, result)
    print(format_table(result, title=f"{agent.name} on {config.split} configurations"))
    print(f"\nwall time {result['wall_time_s']:.1f} s, {result['env_steps']} env steps; results written to {output}")
    if "videos" in result:
        print(f"{len(result['videos'])} episode videos written to {video_dir}")
    return 0


# -- serve -------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from vlapt.config import load_config

    ServeConfig, serve_policy = _serving().ServeConfig, _serving().serve_policy
    paths = [item for item in args.overrides if "=" not in item]  # the policy, among the key=value overrides
    if len(paths) > 1:
        raise ValueError(f"serve takes one policy directory, got {paths}")
    args.overrides = [item for item in args.overrides if "=" in item]
    overrides = _shortcut(args, {"host": "host", "port": "port", "device": "device", "seed": "seed"})
    config = load_config(ServeConfig, args.config, overrides)
    config.policy = paths[0] if paths else config.policy
    if _printed(args, config):
        return 0
    config.validate()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s %(message)s")

    def ready(server) -> None:
        meta = server.metadata
        print(f"serving {config.policy} ({meta['policy_type']}, chunks of {meta['chunk_len']}x{meta['action_dim']}) "
              f"at {server.url}; stop with Ctrl-C or SIGTERM", flush=True)

    try:
        serve_policy(config, ready)
    except KeyboardInterrupt:
        print("vlapt serve: stopped", file=sys.stderr, flush=True)
    return 0


def _serving():
    """vlapt.serving, or a ValueError (exit 2) saying how to install it."""
    try:
        import vlapt.serving
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    return vlapt.serving


# -- report ------------------------------------------------------------------------------------
def _run_labels(args: argparse.Namespace) -> list[str] | None:
    """One label per run: from --label (repeated; a label may hold commas) or --labels (comma-separated)."""
    return args.label or (args.labels.split(",") if args.labels else None)


def cmd_report(args: argparse.Namespace) -> int:
    from vlapt.report import build_report

    labels = _run_labels(args)
    output = Path(args.output) if args.output else (Path(args.runs[0]) / "report.html" if len(args.runs) == 1
                                                     else Path("report.html"))
    path = build_report(args.runs, output, labels=labels, title=args.title, max_video_mb=args.max_video_mb)
    print(f"report written to {path}")
    return 0


# -- sft ---------------------------------------------------------------------------------------
def cmd_sft(args: argparse.Namespace) -> int:
    from vlapt.algorithms.sft import SFTConfig, train_sft
    from vlapt.config import load_config
    from vlapt.rundir import RunRecord

    overrides = _shortcut(args, {"dataset": "dataset", "output_dir": "output_dir", "demos_per_task": "demos_per_task",
                                 "steps": "steps"})
    config = load_config(SFTConfig, args.config, overrides)
    if _printed(args, config):
        return 0
    config.validate()
    args.run_dir = config.output_dir
    record = RunRecord(config.output_dir, "vlapt " + " ".join(args.argv))  # run.json, for `vlapt report`
    final = train_sft(config, progress=not args.quiet)
    record.finish()
    print(f"policy written to {final}; evaluate it with: vlapt eval --policy {final}")
    return 0


# -- train (RL post-training) ----------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from vlapt.algorithms import get_algorithm, options_of_another
    from vlapt.config import ConfigError, load_config, peek_option
    from vlapt.envs import get_suite
    from vlapt.evaluation import checkpoint_evaluator
    from vlapt.rundir import RunRecord

    overrides = _shortcut(args, {"algorithm": "algorithm", "init_policy": "init_policy", "demos": "demos",
                                 "output_dir": "output_dir", "total_env_steps": "total_env_steps"})
    algorithm = get_algorithm(peek_option("algorithm", args.config, overrides) or "ppo")
    try:
        config = load_config(algorithm.config, args.config, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{options_of_another(algorithm.name, exc.key)}", key=exc.key) from None
    if _printed(args, config):
        return 0
    config.validate()
    evaluator = checkpoint_evaluator(config.tasks or get_suite(config.suite).tasks, config.eval_episodes,
                                     config.num_workers, config.suite, config.seed, config.env_backend)
    args.run_dir = config.output_dir
    record = RunRecord(config.output_dir, "vlapt " + " ".join(args.argv))  # run.json, for `vlapt report`
    final = algorithm.train(config, progress=not args.quiet, evaluator=evaluator)
    record.finish()
    print(f"post-trained policy written to {final}; evaluate it with: vlapt eval --policy {final}")
    for directory, what in (("policy_ema", "the moving average of its weights"),
                            ("policy_swa", "the uniform average of its late iterates")):
        if (final.parent / directory).is_dir():
            print(f"{what}: {final.parent / directory}")
    return 0


# -- pipeline (the main job) -------------------------------------------------------------------
def cmd_pipeline(args: argparse.Namespace) -> int:
    from vlapt.pipeline import load_pipeline_config, run_pipeline

    overrides = _shortcut(args, {"output_dir": "output_dir", "suite": "suite", "post_training": "post_training"})
    config = load_pipeline_config(args.config, overrides)
    if _printed(args, config.resolved()):  # with the paths and suite the stages are wired to
        return 0
    args.resume_hint = (f"the finished stages and the running stage's last checkpoint are kept in {config.output_dir}; "
                        "run the same command again to go on from them")
    run_pipeline(config, progress=not args.quiet, command="vlapt " + " ".join(args.argv))
    return 0


# -- plot --------------------------------------------------------------------------------------
def cmd_plot(args: argparse.Namespace) -> int:
    from vlapt.evaluation.curves import compare_runs, plot_runs

    labels = _run_labels(args)
    table = compare_runs(args.runs, labels, args.up_to)
    path = plot_runs(args.runs, args.output, labels, up_to_env_steps=args.plot_up_to)
    print(table)
    print(f"learning curves written to {path}")
    return 0


# -- entry point -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlapt",
        description="Post-train vision-language-action policies with RL on MetaWorld.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tasks", help="list tasks and their language instructions",
                       description="List the tasks of a suite with the instruction the policy reads.")
    p.add_argument("--suite", default="mt10", help=SUITE_HELP)
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("collect", help="collect scripted-expert demonstrations (HDF5 or LeRobot)",
                       description="Run MetaWorld's scripted experts on training configurations, keep the first "
                                   "N successful episodes per task, and write them in the HDF5 format of "
                                   "docs/dataset_format.md (format=lerobot: a LeRobotDataset v3 directory). "
                                   "Options: vlapt.data.collect.CollectConfig.")
    _common(p)
    _dataset_writer_args(p)
    p.add_argument("--demos-per-task", dest="demos_per_task", type=int)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("relabel", help="label a policy's own rollouts with the scripted expert (DAgger)",
                       description="Run a saved policy on fresh training configurations and store, at every step "
                                   "it visits, the scripted expert's action as the label (HDF5, the format of "
                                   "docs/dataset_format.md). Train on it with `vlapt sft extra_datasets=[...]`. "
                                   "Options: vlapt.data.relabel.RelabelConfig.")
    _common(p)
    _dataset_writer_args(p)
    p.add_argument("--policy", help="saved policy directory whose rollouts get labelled")
    p.add_argument("--episodes-per-task", dest="episodes_per_task", type=int)
    p.set_defaults(func=cmd_relabel)

    p = sub.add_parser("eval", help="evaluate a policy on held-out configurations",
                       description="Evaluate under the published protocol (docs/evaluation.md): held-out "
                                   "configurations, 500-step limit, first success ends the episode. Prints a "
                                   "per-task table and writes it as JSON. Options: vlapt.evaluation.EvalConfig.")
    _common(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--policy", help="a checkpoint directory, or one of the suite's scripted experts "
                       "(MetaWorld: 'scripted', 'scripted-fast': the same with their corners cut)")
    which.add_argument("--server", help="a policy served by `vlapt serve`, e.g. ws://127.0.0.1:8000")
    p.add_argument("--suite", help=SUITE_HELP)
    p.add_argument("--tasks", type=_tasks_list, help="comma-separated task names (instead of a suite)")
    p.add_argument("--episodes", type=int, help="episodes per task (default 50)")
    p.add_argument("--workers", type=int, help="env worker processes")
    p.add_argument("--seed", type=int, help="policy sampling seed")
    p.add_argument("--output", help="JSON file for the results")
    p.add_argument("--video", type=int, metavar="N", help="film the first N episodes of each task (MP4, into "
                   "OUTPUT_videos/ beside the results; size: video_size=...)")
    p.add_argument("--gif", action="store_true", help="with --video: GIFs as well as MP4s")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="serve a saved policy over a websocket (loopback by default)",
                       usage="vlapt serve POLICY [--host HOST] [--port PORT] [--config FILE] [key=value ...]",
                       description="Serve a checkpoint to `vlapt.serving.PolicyClient` clients (websocket + msgpack; "
                                   "docs/serving.md): predict and predict_batch as load_policy(path) has them. Binds "
                                   "to 127.0.0.1 unless --host says otherwise; there is no authentication, so "
                                   "exposing it lets anyone who reaches the port run the policy. Options: "
                                   "vlapt.serving.ServeConfig.")
    _common(p)
    p.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port (default 8000; 0: any free port)")
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--seed", type=int, help="sampling seed (for deterministic=false requests)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("report", help="write an HTML report of one or more runs",
                       description="One self-contained HTML page (figures and videos embedded) of pipeline, train "
                                   "or eval output directories: results beside the scripted expert and SFT, per-task "
                                   "tables, learning curves, episode videos, the resolved config, and the command, "
                                   "commit, machine and wall time. Several runs are shown side by side.")
    p.add_argument("runs", nargs="+", help="run directories (vlapt pipeline / vlapt train output_dir)")
    p.add_argument("--output", help="HTML file (default: RUN_DIR/report.html for one run, ./report.html for several)")
    named = p.add_mutually_exclusive_group()
    named.add_argument("--labels", help="comma-separated labels, one per run")
    named.add_argument("--label", action="append", help="a run's label, once per run in their order (may hold commas)")
    p.add_argument("--title", help="page title")
    p.add_argument("--max-video-mb", dest="max_video_mb", type=float, default=64.0,
                   help="embed videos up to this many MB in all (default 64)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sft", help="supervised fine-tuning on demonstrations (the baseline)",
                       description="Behaviour-clone action chunks from a demonstration dataset; writes TensorBoard "
                                   "logs, periodic resumable checkpoints and the final policy to output_dir/policy. "
                                   "Re-running with the same output_dir resumes. Options: vlapt.algorithms.sft.SFTConfig.")
    _common(p)
    p.add_argument("--dataset", help="demonstrations from `vlapt collect` (HDF5 file or LeRobot directory)")
    p.add_argument("--output-dir", dest="output_dir")
    p.add_argument("--demos-per-task", dest="demos_per_task", type=int, help="first N demos of each task (0: all)")
    p.add_argument("--steps", type=int)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("train", help="RL post-training (default: action-chunked PPO with self behaviour cloning)",
                       description="Post-train an SFT checkpoint. The default algorithm (algorithm=ppo) is chunk-level "
                                   "PPO plus a self-BC loss on a demonstration buffer that admits the policy's own "
                                   "shorter successes, with an online-adapted BC weight (docs/method.md). Re-running "
                                   "with the same output_dir resumes from the last checkpoint. Options: the "
                                   "algorithm's config, e.g. vlapt.algorithms.ppo_sbc.PPOConfig.")
    _common(p)
    p.add_argument("--algorithm", help="ppo (default) or another module of vlapt.algorithms")
    p.add_argument("--init-policy", dest="init_policy", help="SFT checkpoint directory to start from")
    p.add_argument("--demos", help="demonstrations that seed the self-BC buffer (HDF5 file or LeRobot directory)")
    p.add_argument("--output-dir", dest="output_dir")
    p.add_argument("--total-env-steps", dest="total_env_steps", type=int)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pipeline", help="the main job: collect -> SFT -> post-train (PPO + self-BC) -> evaluate",
                       description="Run the whole pipeline on its default config (MT10) and print the results "
                                   "table (scripted expert, SFT, post-trained). Stages resume when re-run with the "
                                   "same output_dir. Sub-configs: collect.*, sft.*, eval.* and the post-training "
                                   "algorithm's, named after it: ppo.* (the default) or, with --post-training grpo, "
                                   "grpo.*; with dagger_rounds=N, relabel.* and dagger_sft.* for the expert-"
                                   "relabelling rounds between SFT and post-training (vlapt.pipeline.PipelineConfig); "
                                   "presets in configs/.")
    _common(p)
    p.add_argument("--output-dir", dest="output_dir")
    p.add_argument("--suite", help=SUITE_HELP)
    p.add_argument("--post-training", dest="post_training",
                   help="the post-training algorithm: ppo (default), grpo, or a module of your own (as vlapt train's)")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("plot", help="plot learning curves of `vlapt train` runs to a PNG",
                       description="Prints a table comparing the runs, then plots success and steps to success against env steps: training episodes (smoothed) "
                                   "and the periodic held-out evaluations, one colour per run.")
    p.add_argument("runs", nargs="+", help="output_dir of each `vlapt train` run")
    p.add_argument("--output", required=True, help="PNG file to write")
    named = p.add_mutually_exclusive_group()
    named.add_argument("--labels", help="comma-separated labels, one per run")
    named.add_argument("--label", action="append", help="a run's label, once per run in their order (may hold commas)")
    p.add_argument("--up-to", dest="up_to", type=int,
                   help="compare the runs' tables within this many env steps (the shortest run's budget)")
    p.add_argument("--plot-up-to", dest="plot_up_to", type=int,
                   help="cut the curves at this many env steps (default: each run's whole length)")
    p.set_defaults(func=cmd_plot)

    for register in _extra_commands:
        register(sub)
    return parser


def _dataset_writer_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by the commands that run episodes and write a dataset."""
    p.add_argument("--suite", help=SUITE_HELP)
    p.add_argument("--tasks", type=_tasks_list, help="comma-separated task names (instead of a suite)")
    p.add_argument("--output", help="dataset to write (.hdf5 file; for collect with format=lerobot, a directory)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p.add_argument("--workers", type=int, help="env worker processes")


_extra_commands: list[Callable] = []


def main(argv: list[str] | None = None) -> int:
    from vlapt.config import ConfigError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    args.run_dir = None  # set by the commands that train into an output_dir, for the interruption message
    args.resume_hint = None  # or the message itself, where a command knows better (the pipeline's stages)
    # inputs, files and resources that cannot serve (a full disk included): a message, exit 2, no traceback
    bad_input: tuple[type[BaseException], ...] = (ConfigError, ValueError, OSError)
    from vlapt.rundir import clear_stop_request, request_stop

    clear_stop_request()
    previous_term, previous_int = signal.signal(signal.SIGTERM, request_stop), signal.signal(signal.SIGINT, request_stop)
    try:
        return int(args.func(args) or 0)
    except bad_input as exc:
        print(f"vlapt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (RuntimeError, FloatingPointError) as exc:  # a run that cannot go on (e.g. too few expert successes)
        print(f"vlapt {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vlapt {args.command}: interrupted; {args.resume_hint or _where_to_resume(args.run_dir)}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def _where_to_resume(run_dir) -> str:
    if run_dir is None:
        return "nothing was saved by this command"
    from vlapt.algorithms.checkpointing import latest_checkpoint

    try:
        latest = latest_checkpoint(run_dir)
    except ValueError:
        latest = None
    if latest is None:
        return f"no checkpoint was written yet in {run_dir}"
    return f"the last checkpoint is {latest}; run the same command again to resume from it"


if __name__ == "__main__":
    sys.exit(main())
