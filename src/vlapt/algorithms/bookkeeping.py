"""The bookkeeping every post-training loop shares, so an algorithm file holds only the algorithm.

`RunLog` keeps a run's per-iteration history, TensorBoard scalars, progress bar and the
periodic held-out evaluations (through the caller's evaluator, written to
``evals/iteration_*.json`` beside the checkpoints, never into them). `WeightAverage` keeps a
running average of the policy's weights (exponential or uniform) that never feeds back into training.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from vlapt.config import atomic_write_json
from vlapt.rundir import stop_if_requested

log = logging.getLogger("vlapt.train")

# evaluate(checkpoint directory) -> an evaluation result (`vlapt.evaluation.evaluate`'s JSON); given by the caller
Evaluator = Callable[[Path], dict]


def open_tensorboard(out_dir: Path, step: int):
    """The run's TensorBoard writer, its curves going on from ``step`` (the checkpoint's env or gradient step).

    On resume only the points logged after the checkpoint are dropped; from step 0, the curves of an
    attempt stopped before its first checkpoint are removed, so the new ones do not double them.
    """
    from torch.utils.tensorboard import SummaryWriter

    if not step and (out_dir / "tb").exists():
        log.warning("removing %s: the curves of an earlier attempt that stopped before its first checkpoint",
                    out_dir / "tb")
        shutil.rmtree(out_dir / "tb", ignore_errors=True)
    return SummaryWriter(str(out_dir / "tb"), purge_step=step + 1 if step else None)


class RunLog:
    def __init__(self, out_dir: Path, name: str, total_env_steps: int, env_steps: int, history: list[dict],
                 evaluator: Evaluator | None, eval_every: int, progress: bool):
        self.out_dir, self.name, self.history = out_dir, name, history
        self.evaluator = evaluator if eval_every else None
        self.eval_every = eval_every
        self.writer = open_tensorboard(out_dir, env_steps)
        self.bar = tqdm(total=total_env_steps, initial=env_steps, desc=name, unit="step", disable=not progress,
                        dynamic_ncols=True)
        # wall time accumulates over resumes: a resumed run continues from its checkpoint's last row
        self.start = time.perf_counter() - (history[-1].get("wall_time_s", 0.0) if history else 0.0)

    def begin(self, init_policy: str, resumed_from: Path | None, iteration: int, env_steps: int, finished: bool) -> None:
        """Evaluate where the curves start (the starting policy), or an evaluation a crash interrupted (that of an
        evaluation iteration's checkpoint, or of the run's last one)."""
        if self.evaluator is None:
            return
        if resumed_from is None:
            self.evaluate(Path(init_policy), 0, 0)
        elif (self.is_eval_iteration(iteration) or finished) and not self._eval_path(iteration).exists():
            self.evaluate(resumed_from, iteration, env_steps)

    def is_eval_iteration(self, iteration: int) -> bool:
        return iteration > 0 and iteration % self.eval_every == 0

    def _eval_path(self, iteration: int) -> Path:
        return self.out_dir / "evals" / f"iteration_{iteration:06d}.json"

    def evaluate(self, checkpoint: Path, iteration: int, env_steps: int) -> None:
        result = self.evaluator(checkpoint)
        atomic_write_json(self._eval_path(iteration), result)
        average = result["average"]
        self.writer.add_scalar("eval/success_rate", average["success_rate"], env_steps)
        if average["steps_to_success"] is not None:
            self.writer.add_scalar("eval/steps_to_success", average["steps_to_success"], env_steps)

    def after_checkpoint(self, checkpoint: Path, iteration: int, env_steps: int, done: bool) -> None:
        if self.evaluator is not None and (self.is_eval_iteration(iteration) or done):
            self.evaluate(checkpoint, iteration, env_steps)

    def record(self, row: dict, steps_now: int, **postfix) -> None:
        """One iteration's statistics: into the history, TensorBoard (against env steps), the bar and the log."""
        stop_if_requested()
        row["wall_time_s"] = time.perf_counter() - self.start
        self.history.append(row)
        for k, v in row.items():
            if isinstance(v, (int, float)) and math.isfinite(v) and k != "iteration":
                self.writer.add_scalar(f"{self.name}/{k}", v, row["env_steps"])
        self.bar.update(steps_now)
        self.bar.set_postfix(**postfix)
        log.info("iteration %s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
        atomic_write_json(self.out_dir / "history.json", self.history)


def check_average_options(config) -> None:
    """The weight-average options of a post-training config (``ema_decay``, ``swa_start_env_steps``)."""
    if not 0 <= config.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1) (0: no moving average), got {config.ema_decay}")
    if not 0 <= config.swa_start_env_steps < config.total_env_steps:
        raise ValueError(f"swa_start_env_steps must be in [0, total_env_steps = {config.total_env_steps}) (the env steps "
                         f"after which iterates enter the uniform average; 0: none), got {config.swa_start_env_steps}")


class WeightAverage:
    """A running average of the policy's weights, written as a policy; it never feeds back into training.

    Two kinds, each kept in every checkpoint under its own prefix so that a resumed run carries it on:
    `exponential` (``ema_decay``: each update moves the average by 1 - decay) and `uniform`
    (``swa_start_env_steps``: the iterates made after that many env steps weigh alike, stochastic weight
    averaging). A value of 0 keeps none.
    """

    def __init__(self, policy, option: str, value: float, prefix: str, multi_avg_fn=None, start_env_steps: int = 0):
        self.option, self.value, self.prefix, self.start_env_steps = option, value, prefix, start_env_steps
        self.average = None
        if value:
            from torch.optim.swa_utils import AveragedModel

            self.average = AveragedModel(policy, multi_avg_fn=multi_avg_fn, use_buffers=True)

    @classmethod
    def exponential(cls, policy, decay: float) -> "WeightAverage":
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        return cls(policy, "ema_decay", decay, "ema.", get_ema_multi_avg_fn(decay) if decay else None)

    @classmethod
    def uniform(cls, policy, start_env_steps: int) -> "WeightAverage":
        """Equal weights for every iterate made after ``start_env_steps`` env steps (0: none)."""
        import torch
        from torch.optim.swa_utils import get_swa_multi_avg_fn

        mean = get_swa_multi_avg_fn()

        def update(averaged: list, current: list, count) -> None:  # called once per dtype
            if torch.is_floating_point(averaged[0]):
                mean(averaged, current, count)
            else:  # boolean and integer buffers (masks, counters) cannot be averaged: they follow the policy
                torch._foreach_copy_(averaged, current)

        return cls(policy, "swa_start_env_steps", start_env_steps, "swa.", update, start_env_steps)

    def update(self, policy, env_steps: int) -> None:
        """Average in the policy's weights, made with ``env_steps`` env steps so far."""
        if self.average is not None and env_steps > self.start_env_steps:
            self.average.update_parameters(policy)

    def state(self) -> dict:
        if self.average is None:
            return {}
        return {f"{self.prefix}{k}": v for k, v in self.average.state_dict().items()}

    def load(self, tensors: dict, checkpoint: Path) -> None:
        if self.average is None:
            return
        state = {k[len(self.prefix):]: v for k, v in tensors.items() if k.startswith(self.prefix)}
        if not state:  # a run started without the average: the first update after the resume starts it
            log.warning("%s holds no %s weight average; %s starts one with the iterates after it",
                        checkpoint, self.prefix.rstrip("."), self.option)
            return
        self.average.load_state_dict(state)

    def save(self, path: Path, metadata: dict) -> None:
        """Write the average as a policy, or remove one left by an earlier invocation that it would no longer describe."""
        if self.average is not None and int(self.average.n_averaged) > 0:
            self.average.module.save(path, metadata={**metadata, self.option: self.value,
                                                     "iterates_averaged": int(self.average.n_averaged)})
            return
        why = f"{self.option}=0" if self.average is None else "no iterate has been averaged yet"
        if path.exists():
            log.warning("removing %s: it is not the weight average of this run's final policy (%s)", path, why)
            shutil.rmtree(path)
        elif self.average is not None:
            log.warning("no weight average written to %s: %s", path, why)
