"""Evaluation: perplexity, multiple choice, generative exact match, few-shot and chain-of-thought,
scored as lm-evaluation-harness scores them (see docs/evaluation.md)."""

from lmforge.evaluation.harness import EvalConfig, eval_command, evaluate, format_table
from lmforge.evaluation.lm import (
    encode_pair,
    generate_until,
    loglikelihood,
    loglikelihood_rolling,
    rolling_windows,
)
from lmforge.evaluation.tasks import Task, TaskConfig, TaskError, load_task, resolve_task

__all__ = [
    "EvalConfig",
    "Task",
    "TaskConfig",
    "TaskError",
    "encode_pair",
    "eval_command",
    "evaluate",
    "format_table",
    "generate_until",
    "load_task",
    "loglikelihood",
    "loglikelihood_rolling",
    "resolve_task",
    "rolling_windows",
]
