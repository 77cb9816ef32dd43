"""The main job: collect demonstrations -> SFT -> chunked PPO with self-BC -> evaluate.

Each stage writes under ``output_dir`` and is skipped or resumed when its output already
exists, so an interrupted pipeline continues where it stopped. The evaluation rows are
the ones every results table carries: the scripted expert, the SFT policy and the
post-trained policy, on the same held-out configurations.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from vlapt.algorithms.ppo_sbc import PPOConfig, train_ppo
from vlapt.algorithms.sft import SFTConfig, train_sft
from vlapt.config import atomic_write_json, atomic_write_text, save_config
from vlapt.data.collect import CollectConfig, collect
from vlapt.evaluation import CheckpointAgent, EvalConfig, ScriptedExpert, evaluate, format_table

log = logging.getLogger("vlapt.pipeline")


@dataclasses.dataclass
class PipelineConfig:
    output_dir: str = "runs/pipeline"
    suite: str = "mt10"
    collect: CollectConfig = dataclasses.field(default_factory=CollectConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    evaluate_scripted: bool = True

    def resolved(self) -> "PipelineConfig":
        """Wire the stages together: paths live under output_dir, every stage runs the same suite."""
        out = Path(self.output_dir)
        self.collect.suite = self.suite
        self.collect.output = str(out / "demos.hdf5")
        self.sft.dataset = self.collect.output
        self.sft.output_dir = str(out / "sft")
        self.ppo.suite = self.suite
        self.ppo.init_policy = str(out / "sft" / "policy")
        self.ppo.demos = self.collect.output
        self.ppo.output_dir = str(out / "ppo")
        self.eval.suite = self.suite
        if self.collect.tasks:
            self.sft.tasks = self.ppo.tasks = self.eval.tasks = list(self.collect.tasks)
        return self


def run_pipeline(config: PipelineConfig, progress: bool = True) -> dict:
    config.resolved()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    timings: dict[str, float] = {}

    t = time.perf_counter()
    if Path(config.collect.output).exists():
        log.info("demonstrations exist at %s: reusing them", config.collect.output)
    else:
        collect(config.collect, progress=progress)
    timings["collect_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sft_policy = train_sft(config.sft, progress=progress)
    timings["sft_s"] = time.perf_counter() - t

    t = time.perf_counter()
    ppo_policy = train_ppo(config.ppo, progress=progress)
    timings["post_train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    rows = {}
    agents = [("scripted expert", "scripted", ScriptedExpert())] if config.evaluate_scripted else []
    agents += [("SFT", "sft", CheckpointAgent(str(sft_policy), seed=config.eval.seed)),
               ("SFT + chunked PPO + self-BC", "post_trained", CheckpointAgent(str(ppo_policy), seed=config.eval.seed))]
    for name, file_key, agent in agents:
        rows[name] = evaluate(agent, config.eval, progress=progress)
        atomic_write_json(out / f"eval_{file_key}.json", rows[name])
    timings["eval_s"] = time.perf_counter() - t

    report = results_markdown(rows, timings)
    atomic_write_text(out / "results.md", report)
    atomic_write_json(out / "timings.json", timings)
    print(report)
    return {"rows": rows, "timings": timings}


def results_markdown(rows: dict[str, dict], timings: dict[str, float] | None = None) -> str:
    lines = ["| policy | success | steps to success | steps (failures = 500) |", "|---|---|---|---|"]
    for name, result in rows.items():
        avg = result["average"]
        steps = "-" if avg["steps_to_success"] is None else f"{avg['steps_to_success']:.1f}"
        lines.append(f"| {name} | {avg['success_rate']:.3f} | {steps} | {avg['steps_failures_as_limit']:.1f} |")
    parts = ["\n".join(lines)]
    for name, result in rows.items():
        parts.append(format_table(result, title=name))
    if timings:
        parts.append("wall time (s): " + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in timings.items()))
    return "\n\n".join(parts) + "\n"
