"""Token choice: greedy == beam 1, beam search is exact when it is wide enough, penalties, stops."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from lmkit import search
from lmkit.config import ModelConfig, SampleConfig
from lmkit.generate import Seq2SeqStepper
from lmkit.models.seq2seq import Seq2Seq

EOS = 3


def _model(vocab: int, seed: int = 0) -> Seq2Seq:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="seq2seq", vocab_size=vocab, d_model=32, n_layer=2, n_head=4, max_seq_len=12)
    model = Seq2Seq(cfg).eval()
    with torch.no_grad():  # sharper distributions than the tiny init gives, so that choices matter
        model.wte.weight.mul_(40)
    return model


def _stepper(model: Seq2Seq, src: torch.Tensor, repeat: int) -> Seq2SeqStepper:
    return Seq2SeqStepper(model, src, torch.ones_like(src, dtype=torch.bool), repeat, EOS)


def _sequence_logprob(model: Seq2Seq, src: torch.Tensor, tokens: list[int]) -> float:
    """Sum of log p(token | source, tokens before) by one teacher-forced pass."""
    tgt_in = torch.tensor([[EOS, *tokens[:-1]]])
    logits, _ = model(src, torch.ones_like(src, dtype=torch.bool), tgt_in)
    return F.log_softmax(logits[0], dim=-1)[torch.arange(len(tokens)), tokens].sum().item()


@torch.no_grad()
def test_greedy_equals_beam_of_width_one() -> None:
    model = _model(vocab=40)
    src = torch.randint(7, 40, (4, 6))
    cfg = SampleConfig(greedy=True, max_new_tokens=10, beam=1, length_penalty=0.0)
    greedy = search.sample(_stepper(model, src, 1), 4, cfg, EOS)
    beam = search.beam_search(_stepper(model, src, 1), 4, cfg, EOS)
    assert [h.tokens for h in greedy] == [hyps[0].tokens for hyps in beam]
    assert [h.finish_reason for h in greedy] == [hyps[0].finish_reason for hyps in beam]


@torch.no_grad()
def test_a_beam_as_wide_as_the_search_space_finds_the_best_sequence() -> None:
    vocab, length = 5, 3  # ids 0..4, EOS = 3: sequences of up to 3 tokens
    words = [t for t in range(vocab) if t != EOS]
    space = [list(seq) + [EOS] for n in range(length) for seq in itertools.product(words, repeat=n)]
    space += [list(seq) for seq in itertools.product(words, repeat=length)]  # cut at the length limit
    for seed, length_penalty in [(0, 0.0), (1, 1.0), (2, 2.0), (3, -0.5)]:
        model = _model(vocab, seed)
        src = torch.randint(0, vocab, (1, 4))
        scores = {tuple(seq): _sequence_logprob(model, src, seq) / len(seq) ** length_penalty for seq in space}
        best = max(scores, key=scores.get)
        cfg = SampleConfig(max_new_tokens=length, beam=len(space), length_penalty=length_penalty, num_samples=3)
        found = search.beam_search(_stepper(model, src, len(space)), 1, cfg, EOS)[0]
        assert found[0].tokens == [t for t in best if t != EOS]
        assert math.isclose(found[0].score, scores[best], abs_tol=1e-4)
        ranked = sorted(scores.values(), reverse=True)[:3]
        assert [h.score for h in found] == sorted((h.score for h in found), reverse=True)
        assert all(math.isclose(h.score, s, abs_tol=1e-4) for h, s in zip(found, ranked))


@torch.no_grad()
def test_beam_search_beats_or_equals_greedy_on_its_own_score() -> None:
    model = _model(vocab=30, seed=5)
    src = torch.randint(7, 30, (1, 6))
    cfg = SampleConfig(greedy=True, max_new_tokens=8, length_penalty=0.0)
    greedy = search.sample(_stepper(model, src, 1), 1, cfg, EOS)[0]
    beam = search.beam_search(_stepper(model, src, 4), 1, SampleConfig(max_new_tokens=8, beam=4,
                                                                       length_penalty=0.0), EOS)[0][0]
    ending = [EOS] if greedy.finish_reason == "eos" else []
    assert beam.score >= _sequence_logprob(model, src, greedy.tokens + ending) - 1e-4


def test_repetition_penalty_and_no_repeat_ngrams() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = search.penalize(logits, [[0, 1]], SampleConfig(repetition_penalty=2.0))
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, 0.5]]))
    # history 2 0 1 2 0: the bigram "0 1" happened after 0, so after the last 0, 1 is banned (n = 2)
    banned = search.penalize(torch.zeros(1, 4), [[2, 0, 1, 2, 0]], SampleConfig(no_repeat_ngram_size=2))
    assert banned[0].tolist() == [0.0, -math.inf, 0.0, 0.0]
    # n = 3: "2 0" was followed by 1 before
    banned = search.penalize(torch.zeros(1, 4), [[2, 0, 1, 2, 0]], SampleConfig(no_repeat_ngram_size=3))
    assert banned[0].tolist() == [0.0, -math.inf, 0.0, 0.0]
    unseen = search.penalize(torch.zeros(1, 4), [[2, 0, 1]], SampleConfig(no_repeat_ngram_size=3))
    assert unseen[0].tolist() == [0.0] * 4


@torch.no_grad()
def test_no_repeat_ngram_holds_in_generated_text() -> None:
    model = _model(vocab=12, seed=3)
    src = torch.randint(7, 12, (2, 5))
    for beam in (1, 3):
        cfg = SampleConfig(greedy=True, max_new_tokens=12, beam=beam, no_repeat_ngram_size=2)
        rows = (search.sample(_stepper(model, src, 1), 2, cfg, EOS) if beam == 1
                else [h[0] for h in search.beam_search(_stepper(model, src, beam), 2, cfg, EOS)])
        for h in rows:
            bigrams = list(zip(h.tokens, h.tokens[1:]))
            assert len(bigrams) == len(set(bigrams)), h.tokens


@torch.no_grad()
def test_stop_callback_ends_a_sequence() -> None:
    model = _model(vocab=40)
    model.wte.weight[EOS] = 0.0  # EOS logit 0 among large ones: the text runs on
    src = torch.randint(7, 40, (1, 6))
    cfg = SampleConfig(greedy=True, max_new_tokens=10)
    free = search.sample(_stepper(model, src, 1), 1, cfg, EOS)[0]
    assert len(free.tokens) >= 3, free
    stopped = search.sample(_stepper(model, src, 1), 1, cfg, EOS,
                            stopped=lambda row, tokens: tokens[-1] == free.tokens[2])[0]
    assert stopped.tokens == free.tokens[:free.tokens.index(free.tokens[2]) + 1]
    assert stopped.finish_reason == "stop"
