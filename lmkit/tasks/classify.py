"""Sequence classification: a linear head over the backbone's summary of each text (or text pair)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmkit import evaluate, finetune_data, objectives
from lmkit.config import RunConfig
from lmkit.models import ARCHS
from lmkit.models.heads import CLASSIFIER_DISTILLATION, SequenceClassifier
from lmkit.quantize import model_for_decoding
from lmkit.tasks.task import VAL_FRACTION, FinetuneSpec, Task, TaskData, wrong_task
from lmkit.tokenizer import Tokenizer


def classify_data(spec: FinetuneSpec, cfg: RunConfig, tokenizer: Tokenizer) -> TaskData:
    examples = finetune_data.read_labelled(Path(spec.data))
    train, val = ((examples, finetune_data.read_labelled(Path(spec.val))) if spec.val
                  else finetune_data.stratified_split(examples, VAL_FRACTION, cfg.train.seed))
    labels = finetune_data.label_set(train)
    layout = ARCHS[cfg.model.arch].pair_layout(tokenizer)

    def encode(examples: list[finetune_data.LabelledText]) -> list[finetune_data.Encoded]:
        return finetune_data.encode_labelled(examples, tokenizer, labels, layout, cfg.model.max_seq_len)

    return TaskData(encode(train), encode(val), finetune_data.collate_labelled(tokenizer.pad_id),
                    objectives.classify_loss, objectives.classify_metrics, {"labels": labels})


def with_head(backbone: nn.Module, meta: dict[str, Any]) -> nn.Module:
    """The backbone under a fresh head with one output per label of the run."""
    return SequenceClassifier(backbone, len(meta["labels"])).to(next(backbone.parameters()).device)


def evaluate_classifier(ckpt: Any, path: Path, options: Any, device: torch.device
                        ) -> tuple[evaluate.ClassifyEvaluation, list[dict[str, Any]]]:
    """A classifier on the labelled examples of PATH, with per-example predictions."""
    if ckpt.task != TASK.name:
        raise wrong_task(ckpt, TASK.name, "eval")
    examples = finetune_data.read_labelled(path)
    model = model_for_decoding(ckpt, device, options.quantize)
    result, preds = evaluate.evaluate_classifier(model, ckpt.tokenizer(), examples, ckpt.labels, device,
                                                 options.batch_size or 8)
    return result, [pred.record(example) for example, pred in zip(examples, preds)]


TASK = Task(name="classify", summary="sequence classification (a label per text or text pair)",
            data_help="CSV/TSV text,label (or text,text_b,label), or JSONL {\"text\", \"label\"}",
            train={"batch_size": 32, "max_steps": 600, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 60,
                   "weight_decay": 0.01, "eval_interval": 50, "log_interval": 10, "save_interval": 100_000,
                   "best_metric": "val_accuracy"},
            data=classify_data, language_model=False, head=with_head, evaluate=evaluate_classifier,
            unused_parameters=True, distillation=CLASSIFIER_DISTILLATION, objective="classification")
