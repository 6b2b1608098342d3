from __future__ import annotations

import dataclasses
import json
import shutil
import signal

import torch

from lmkit import evaluate, train
from lmkit.checkpoint import Checkpoint
from lmkit.project import Project
from tests.conftest import tiny_bert_config
from tests.test_train import fresh_copy, losses, signal_at


def test_bert_resume_is_exact(tiny_project: Project, tmp_path) -> None:
    cfg = tiny_bert_config(max_steps=16, eval_interval=8, grad_accum=2)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.1))
    straight = fresh_copy(tiny_project, tmp_path / "a")
    train.pretrain(straight, [], cfg)
    stopped = fresh_copy(tiny_project, tmp_path / "b")
    first = train.pretrain(stopped, [], cfg, progress=signal_at(7))
    assert first.outcome.stopped_by == signal.SIGTERM
    train.resume(stopped)
    assert losses(stopped, "run1") == losses(straight, "run1")
    metrics = [json.loads(line) for line in stopped.metrics_file("run1").read_text().splitlines()]
    assert {"val_mlm_accuracy", "val_nsp_accuracy", "val_mlm_loss"} <= set(metrics[-1])


def test_mlm_accuracy_rises_well_above_the_majority_baseline(tiny_project: Project, tmp_path, sample_text) -> None:
    """A tiny corpus (8 KB of Hamlet, seen many times): the model learns to fill masks from context
    far better than always guessing the most frequent token."""
    text = sample_text[:8_000]
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(text * 12)
    project = Project.open(tmp_path / "p")
    shutil.copytree(tiny_project.tokenizer_dir, project.tokenizer_dir)
    cfg = tiny_bert_config(max_steps=600, eval_interval=600, log_interval=100, batch_size=16)
    result = train.pretrain(project, [corpus], cfg)
    ckpt = Checkpoint(result.outcome.checkpoint)
    report = evaluate.evaluate_bert(ckpt.model(), ckpt.tokenizer(), text, torch.device("cpu"))
    assert report.mlm_accuracy > 1.6 * report.mlm_majority_baseline, report
    assert 0.4 < report.nsp_majority_baseline < 0.6 and report.pairs >= 64
