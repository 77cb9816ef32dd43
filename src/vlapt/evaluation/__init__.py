"""Evaluation that only reads checkpoints: agents, the protocol and its metrics."""

from vlapt.evaluation.agents import Agent, CheckpointAgent, ScriptedExpert, stack_observations
from vlapt.evaluation.metrics import EpisodeRecord, format_table, summarize, task_metrics
from vlapt.evaluation.protocol import EvalConfig, evaluate

__all__ = [
    "Agent", "CheckpointAgent", "EpisodeRecord", "EvalConfig", "ScriptedExpert", "evaluate",
    "format_table", "stack_observations", "summarize", "task_metrics",
]
