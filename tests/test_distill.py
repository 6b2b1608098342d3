"""Distillation: the loss terms by hand, student initialisation from teacher layers, a frozen teacher."""

from __future__ import annotations

import math

import pytest
import torch

from lmkit import distill
from lmkit.config import DistillConfig, ModelConfig
from lmkit.models.gpt import GPT


def _softmax(xs: list[float], t: float) -> list[float]:
    exps = [math.exp(x / t) for x in xs]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_soft_target_losses_equal_hand_computed_values() -> None:
    student, teacher = [0.0, 1.0, -1.0], [2.0, 0.5, 0.0]
    s, t = torch.tensor([student]), torch.tensor([teacher])
    for temperature in (1.0, 2.0, 4.0):
        p_s, p_t = _softmax(student, temperature), _softmax(teacher, temperature)
        forward = _kl(p_t, p_s) * temperature ** 2
        reverse = _kl(p_s, p_t) * temperature ** 2
        m = [0.3 * a + 0.7 * b for a, b in zip(p_t, p_s)]
        jsd = (0.3 * _kl(p_t, m) + 0.7 * _kl(p_s, m)) * temperature ** 2
        assert distill.soft_target_loss(s, t, temperature, "forward").item() == pytest.approx(forward, rel=1e-5)
        assert distill.soft_target_loss(s, t, temperature, "reverse").item() == pytest.approx(reverse, rel=1e-5)
        assert distill.soft_target_loss(s, t, temperature, "jsd", beta=0.3).item() == pytest.approx(jsd, rel=1e-5)
    assert forward != pytest.approx(reverse)  # KL is not symmetric
    # rows are averaged; identical distributions cost nothing
    both = distill.soft_target_loss(torch.tensor([student, teacher]), torch.tensor([teacher, teacher]), 2.0)
    assert both.item() == pytest.approx(_kl(_softmax(teacher, 2), _softmax(student, 2)) * 4 / 2, rel=1e-5)


def test_cosine_loss() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, -1.0]])
    assert distill.cosine_loss(a, b).item() == pytest.approx((0.0 + 2.0) / 2)


def test_student_starts_from_the_chosen_teacher_layers() -> None:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=4, n_head=4, max_seq_len=16)
    teacher, student = GPT(cfg), GPT(ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, max_seq_len=16))
    distill.init_from_teacher(student, teacher, [1, 3])
    for i, j in [(0, 1), (1, 3)]:
        for (name, s), (_, t) in zip(student.transformer.h[i].state_dict().items(),
                                     teacher.transformer.h[j].state_dict().items()):
            assert torch.equal(s, t), name
    assert torch.equal(student.transformer.wte.weight, teacher.transformer.wte.weight)
    assert torch.equal(student.transformer.ln_f.weight, teacher.transformer.ln_f.weight)
    assert student.lm_head.weight is student.transformer.wte.weight  # still tied
    assert distill.evenly_spaced(2, 4) == [0, 2] and distill.evenly_spaced(3, 6) == [0, 2, 4]


def test_the_student_learns_while_the_teacher_stays_frozen() -> None:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, max_seq_len=16)
    teacher = GPT(cfg).requires_grad_(False).eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = GPT(ModelConfig(vocab_size=64, d_model=16, n_layer=1, n_head=2, max_seq_len=16))
    loss_fn = distill.DistillLoss(teacher, DistillConfig(), "gpt", cosine=False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    batch = (torch.randint(0, 64, (8, 16)), torch.randint(0, 64, (8, 16)))
    losses = []
    for _ in range(30):
        loss = loss_fn(student, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
