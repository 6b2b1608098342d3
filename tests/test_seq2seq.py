"""Encoder-decoder training end to end in the library: denoising pretraining resumes exactly, and
a model learns a handful of pairs by heart."""

from __future__ import annotations

import json
import signal

import torch

from lmkit import data, objectives, train
from lmkit.config import ModelConfig, SampleConfig
from lmkit.generate import translate
from lmkit.models.seq2seq import Seq2Seq
from lmkit.project import Project
from lmkit.tokenizer import Tokenizer
from tests.conftest import tiny_seq2seq_config
from tests.test_train import fresh_copy, losses, signal_at

PAIRS = [("Goe Hercules", "Go, Hercules!"), ("tempt vs not", "tempt us not"), ("my Lord", "my lord"),
         ("to day", "to-day"), ("I feare", "I fear"), ("beare aboue", "bear above"),
         ("dreadfull motion", "dreadful motion"), ("We will dye", "We will die")]


def test_denoising_pretraining_resumes_exactly(tiny_project: Project, tmp_path) -> None:
    cfg = tiny_seq2seq_config(max_steps=12, eval_interval=6, grad_accum=2)
    straight = fresh_copy(tiny_project, tmp_path / "a")
    train.pretrain(straight, [], cfg)
    stopped = fresh_copy(tiny_project, tmp_path / "b")
    assert train.pretrain(stopped, [], cfg, progress=signal_at(5)).outcome.stopped_by == signal.SIGTERM
    train.resume(stopped)
    assert losses(stopped, "run1") == losses(straight, "run1")
    last = json.loads(stopped.metrics_file("run1").read_text().splitlines()[-1])
    assert {"val_loss", "val_token_accuracy"} <= set(last)


def test_a_model_learns_a_handful_of_pairs_to_exact_match(tiny_project: Project) -> None:
    tokenizer = Tokenizer.load(tiny_project.tokenizer_model)
    rows = [(tokenizer.encode(s), tokenizer.encode(t)) for s, t in PAIRS]
    batch = data.seq2seq_batch(rows, tokenizer.pad_id, tokenizer.eos_id)
    model = Seq2Seq(ModelConfig(arch="seq2seq", vocab_size=tokenizer.vocab_size, d_model=64, n_layer=2, n_head=4,
                                max_seq_len=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = (objectives.seq2seq_loss(model, batch) / batch.loss_units()).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    sources = [s for s, _ in PAIRS]
    for cfg in (SampleConfig(greedy=True, max_new_tokens=20), SampleConfig(beam=3, max_new_tokens=20)):
        outputs = [c.samples[0] for c in translate(model, tokenizer, sources, cfg, torch.device("cpu"))]
        assert [o.text for o in outputs] == [t for _, t in PAIRS], (cfg, loss.item())
        assert {o.finish_reason for o in outputs} == {"eos"}
