"""What a finetuning task declares: everything that differs between classification, instruction
tuning, chat, rewriting, more language modelling and preference tuning, in one record per task
(its module's TASK), looked up in lmkit.tasks.TASKS. The rest of lmkit asks the record and never
branches on a task's name, as it never does on an architecture's (lmkit.models.ARCHS).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmkit import objectives
from lmkit.config import RunConfig
from lmkit.errors import CheckpointError, DataError
from lmkit.models.arch import Distillation
from lmkit.tokenizer import Tokenizer

VAL_FRACTION = 0.1  # held back for validation when no --val file is given


@dataclass(frozen=True)
class FinetuneSpec:
    """The inputs of a finetuning run; saved in its checkpoints so that --resume can rebuild it."""

    task: str  # a key of lmkit.tasks.TASKS
    data: str
    base: str  # the pretrained checkpoint folder
    val: str | None = None
    scratch: bool = False  # a baseline: the base's shape and tokenizer, but freshly initialised weights
    chat_template: str | None = None  # a Jinja template file instead of the tokenizer's own (Task.chat_template)

    def files(self) -> list[Path]:
        """The files the run reads: data, validation data, template."""
        return [Path(p) for p in (self.data, self.val, self.chat_template) if p]


@dataclass
class TaskData:
    """A finetuning task's examples, encoded, and how they are batched and scored."""

    rows: list[Any]  # encoded training examples; row[0] is the token ids
    val_rows: list[Any]
    collate: Callable[[Any], Any]  # rows -> a batch
    loss_fn: objectives.LossFn
    metrics_fn: objectives.MetricsFn
    meta: dict[str, Any] = field(default_factory=dict)  # checkpoint metadata (a classifier's labels)
    summary: str | None = None  # one line for the log on how the examples fit the context
    tokens_per_row: float | None = None  # mean tokens a row feeds the model (default: len(row[0]))
    # the (summed) loss terms also logged per step, named: (model, batch) -> metrics since the last call
    step_metrics: Callable[[], dict[str, float]] | None = None


# (model before finetuning, data, run config, device) -> data with what the task needs of the
# starting model (preference tuning: its log-probabilities, the frozen reference)
Reference = Callable[[nn.Module, TaskData, RunConfig, torch.device], TaskData]
# (checkpoint, file, EvalOptions, device) -> (result with to_dict(), per-example records or None)
Evaluation = Callable[..., tuple[Any, list[dict[str, Any]] | None]]


@dataclass(frozen=True)
class Task:
    """Everything lmkit needs to know about one finetuning task."""

    name: str
    summary: str  # one line, for help texts
    data_help: str  # the file format, for help texts
    train: dict[str, Any]  # the recipe: TrainConfig fields (any overridden with --set train.*)
    # (spec, run config, tokenizer) -> the encoded examples; None: DATA is text, batched as the
    # architecture pretrains (more language modelling)
    data: Callable[[FinetuneSpec, RunConfig, Tokenizer], TaskData] | None
    # model.dropout while finetuning; None: the base model's. Small labelled sets overfit fast (a
    # passage's character names identify its play), so most tasks finetune with dropout, as BERT did.
    dropout: float | None = 0.1
    # Its checkpoints are language models (generate continues them; int8, chat, serve, a base for
    # more finetuning); a classifier is final.
    language_model: bool = True
    head: Callable[[nn.Module, dict[str, Any]], nn.Module] | None = None  # (backbone, run meta) -> model with a head
    reference: Reference | None = None  # set: the starting model is kept as the frozen reference
    evaluate: Evaluation | None = None  # `lmkit eval`; None: the architecture's, as for a pretrained model
    recognizes: Callable[[Path], bool] | None = None  # `lmkit eval FILE` picks this task for FILE's format
    distillable: bool = True  # `lmkit distill` can take a teacher of this task
    distillation: Distillation | None = None  # how a teacher of this task is distilled; None: its architecture's
    chat_template: bool = False  # takes --chat-template
    unused_parameters: bool = False  # parameters the task never uses (a classifier's LM head): DDP must know
    objective: str | None = None  # as `lmkit info` names it; None: the architecture's pretraining objectives
    check: Callable[[FinetuneSpec], None] | None = None  # refuses a run the task cannot do (ConfigError)


def pairs_and_val(read: Callable[[Path], list], spec: FinetuneSpec) -> tuple[list, list]:
    """(training examples, validation examples) read from SPEC.data and SPEC.val, or every tenth
    example of SPEC.data (in file order) held back when there is no SPEC.val."""
    pairs = read(Path(spec.data))
    if spec.val:
        return pairs, read(Path(spec.val))
    train, val = [p for i, p in enumerate(pairs) if i % 10], pairs[::10]
    if not train or not val:
        raise DataError(f"{spec.data}: too few examples to hold some back for validation; pass --val FILE")
    return train, val


# Finetuning recipes: short runs at a lower learning rate than pretraining, validated often,
# keeping the best checkpoint by the task's own metric.
TEXT_PAIRS_TRAIN: dict[str, Any] = {"batch_size": 16, "max_steps": 500, "lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 50,
                                    "weight_decay": 0.01, "eval_interval": 50, "log_interval": 10,
                                    "save_interval": 100_000}


def wrong_task(ckpt: Any, task: str, command: str) -> CheckpointError:
    """The error for a checkpoint CKPT that `lmkit COMMAND --task TASK` cannot take."""
    return CheckpointError(f"{ckpt.path} is a {ckpt.config.model.arch} checkpoint for task {ckpt.task!r}; "
                           f"'lmkit {command} --task {task}' needs one for task {task!r}")
