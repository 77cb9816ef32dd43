"""Evaluation that only reads checkpoints: agents, the protocol and its metrics."""

from vlapt.evaluation.agents import CheckpointAgent
from vlapt.evaluation.metrics import format_table, summarize, task_metrics
from vlapt.evaluation.protocol import EvalConfig, checkpoint_evaluator, evaluate

__all__ = ["CheckpointAgent", "EvalConfig", "checkpoint_evaluator", "evaluate", "format_table", "summarize", "task_metrics"]
