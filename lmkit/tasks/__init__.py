"""The finetuning tasks: one module per task, each declaring its TASK; this is the one table of
them, and how a checkpoint's task picks its evaluation.

A task's module holds its data reader and batches, its objective and metrics, and whatever else
differs by task (lmkit.tasks.task.Task); lmkit looks it up here by name (a checkpoint's `task`, a
`--task` value) and never branches on the name itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmkit import corpus
from lmkit.errors import CheckpointError, ConfigError
from lmkit.evaluate import EVALUATIONS
from lmkit.models import ARCHS
from lmkit.quantize import model_for_decoding
from lmkit.tasks import chat, classify, dpo, instruct, lm, seq2seq
from lmkit.tasks.task import FinetuneSpec, Task, TaskData, wrong_task

__all__ = ["TASKS", "FinetuneSpec", "Task", "TaskData", "evaluate_checkpoint", "task_of"]

TASKS: dict[str, Task] = {t.name: t for t in (lm.TASK, instruct.TASK, chat.TASK, classify.TASK, seq2seq.TASK,
                                              dpo.TASK)}


def task_of(ckpt: Any) -> Task:
    """The task CKPT was trained for (a pretrained model's is "lm")."""
    return TASKS[ckpt.task]


def evaluate_checkpoint(ckpt: Any, path: Path, options: Any, device: torch.device,
                        task: str | None = None) -> tuple[Any, list[dict[str, Any]] | None]:
    """Score checkpoint CKPT on the file PATH: as TASK says when given, else as the task whose
    format PATH has (preference pairs), else as the checkpoint's own task -- through the task's own
    evaluation where it has one (a classifier's, chat's), else the architecture's (a language model
    on text, an encoder-decoder on pairs).

    Returns:
        The evaluation (a dataclass with to_dict()), and per-example records when there are any.
    Raises:
        CheckpointError: TASK is not one CKPT can be scored for.
    """
    if task is not None and task not in TASKS:
        raise ConfigError(f"--task {task} is not one of: {', '.join(TASKS)}")
    corpus.check_files([path])  # before the model loads: a missing or empty file fails at once
    recognized = next((t for t in TASKS.values() if t.recognizes and t.recognizes(path)), None)
    own = task_of(ckpt)
    chosen = TASKS[task] if task else recognized or (own if own.recognizes is None else None)
    if chosen and chosen.evaluate:
        return chosen.evaluate(ckpt, path, options, device)
    arch = ARCHS[ckpt.config.model.arch]
    if not own.language_model:
        raise wrong_task(ckpt, task or arch.eval_task, "eval")
    if task not in (None, arch.eval_task):
        if TASKS[task].language_model and task in arch.tasks:  # e.g. a pretrained encoder-decoder asked for lm
            raise CheckpointError(f"{ckpt.path} is a {arch.name} checkpoint: it is scored with --task {arch.eval_task}")
        raise wrong_task(ckpt, task, "eval")
    if options.reference:
        raise CheckpointError("--reference compares implicit rewards on preference pairs; "
                              f"{path} is scored as {arch.eval_task}")
    return EVALUATIONS[arch.evaluation](model_for_decoding(ckpt, device, options.quantize), ckpt.tokenizer(), path,
                                        options, device)
