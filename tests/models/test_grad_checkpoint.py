"""Gradient checkpointing recomputes activations in backward: same loss, same gradients, dropout included."""

from __future__ import annotations

import pytest
import torch

from lmkit import objectives
from lmkit.config import ModelConfig
from lmkit.models import build_model


def _loss(model, arch: str) -> torch.Tensor:
    torch.manual_seed(1)  # the same data and the same dropout masks for both runs
    ids = torch.randint(7, 60, (2, 12))
    if arch == "gpt":
        return model(ids, ids)[1]
    if arch == "bert":
        labels = torch.where(torch.rand(2, 12) < 0.3, ids, objectives.IGNORE)
        return model(ids, None, torch.ones_like(ids, dtype=torch.bool), labels, torch.tensor([0, 1]))[1]
    return model(ids, torch.ones_like(ids, dtype=torch.bool), ids, ids)[1]


@pytest.mark.parametrize("arch", ["gpt", "bert", "seq2seq"])
def test_checkpointing_gives_the_same_loss_and_gradients(arch: str, monkeypatch) -> None:
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = build_model(ModelConfig(arch=arch, vocab_size=64, d_model=32, n_layer=2, n_head=4, max_seq_len=16,
                                    dropout=0.1)).train()
    results = []
    for recompute in (False, True):
        model.grad_checkpoint = recompute
        model.zero_grad()
        loss = _loss(model, arch)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert len(calls) == (4 if arch == "seq2seq" else 2)  # every block of every stack, in the second run only
    (plain_loss, plain), (loss, recomputed) = results
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
