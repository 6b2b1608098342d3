from __future__ import annotations

import math

import pytest
import torch

from lmkit.checkpoint import Checkpoint
from lmkit.evaluate import evaluate_lm

CPU = torch.device("cpu")
TEXT = ("Ham.\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles,\n")


@pytest.fixture(scope="module")
def trained(tiny_project):
    ckpt = Checkpoint(tiny_project.latest_checkpoint())
    return ckpt.model(), ckpt.tokenizer()


def brute_force_nats(model, ids: list[int], stride: int) -> float:
    """Score each target with its own forward pass over the context the sliding-window rule gives
    it: windows start every STRIDE tokens, and a target is scored by the first window that covers
    it and has not been scored before."""
    window, total = model.config.max_seq_len, 0.0
    begins = range(0, len(ids) - 1, stride)
    for j in range(len(ids) - 1):  # target ids[j + 1], predicted at position j
        begin = next(b for b in begins if b <= j < b + window)
        logits, _ = model(torch.tensor([ids[begin:j + 1]]))
        total -= torch.log_softmax(logits[0, -1].double(), dim=-1)[ids[j + 1]].item()
    return total


@pytest.mark.parametrize("stride", [1, 7, 16, 32])
def test_every_token_is_scored_once_with_the_promised_context(trained, stride: int) -> None:
    model, tokenizer = trained
    ids = [tokenizer.eos_id, *tokenizer.encode(TEXT)]
    assert len(ids) > 2 * model.config.max_seq_len  # so windows really slide
    result = evaluate_lm(model, tokenizer, TEXT, CPU, stride=stride, batch_size=3)
    expected = brute_force_nats(model, ids, stride)
    assert result.tokens == len(ids) - 1
    assert result.loss * result.tokens == pytest.approx(expected, rel=1e-5)
    assert result.bits_per_byte == pytest.approx(expected / math.log(2) / len(TEXT.encode()), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))


def test_default_stride_is_half_the_context(trained) -> None:
    model, tokenizer = trained
    assert evaluate_lm(model, tokenizer, TEXT, CPU).stride == model.config.max_seq_len // 2


def test_empty_text_is_an_error(trained) -> None:
    model, tokenizer = trained
    with pytest.raises(Exception, match="empty"):
        evaluate_lm(model, tokenizer, "", CPU)
