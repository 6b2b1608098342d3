from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lmkit import data
from lmkit.errors import DataError
from lmkit.objectives import IGNORE
from lmkit.prepare import TokenFile
from lmkit.project import Project
from lmkit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def train_tokens(tiny_project: Project) -> np.ndarray:
    return TokenFile.open(tiny_project.tokens_file("train")).array()


@pytest.fixture(scope="module")
def tokenizer(tiny_project: Project) -> Tokenizer:
    return Tokenizer.load(tiny_project.tokenizer_model)


def test_lm_windows_are_shifted_by_one_and_resumable(train_tokens) -> None:
    windows = data.LMWindows(train_tokens, 16, 4, seed=1)
    x, y = next(windows)
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    state = windows.state_dict()
    expected = next(windows)
    windows.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(next(windows), expected))


def test_bert_pairs_layout(train_tokens, tokenizer) -> None:
    ids, types, pad, labels, nsp = next(data.BertPairs(train_tokens, 32, 8, 0, tokenizer))
    assert ids.shape == types.shape == pad.shape == labels.shape == (8, 32) and nsp.shape == (8,)
    for row, row_types, row_pad in zip(ids, types, pad):
        n = int(row_pad.sum())
        assert row[0] == tokenizer.cls_id and row[n - 1] == tokenizer.sep_id
        assert (row[:n] == tokenizer.sep_id).sum() == 2 and (row[n:] == tokenizer.pad_id).all()
        first_sep = int((row == tokenizer.sep_id).nonzero()[0])
        assert (row_types[:first_sep + 1] == 0).all() and (row_types[first_sep + 1:n] == 1).all()
        assert (row_types[n:] == 0).all()
    assert not (ids == tokenizer.eos_id).any()


def test_masking_statistics_and_nsp_balance(train_tokens, tokenizer) -> None:
    """15% of real tokens chosen; of those 80% [MASK], 10% random, 10% kept; specials never."""
    sampler = data.BertPairs(train_tokens, 64, 64, 0, tokenizer)
    chosen = masked = randomised = kept = real = 0
    labels_nsp = []
    for _ in range(40):
        ids, _, pad, labels, nsp = next(sampler)
        picked = labels != IGNORE
        clean = torch.where(picked, labels, ids)  # the text before masking
        special = clean < tokenizer.n_special
        assert not (picked & special).any() and not (picked & ~pad).any()
        assert (clean[~pad] == tokenizer.pad_id).all()
        real += int((~special & pad).sum())
        chosen += int(picked.sum())
        masked += int((picked & (ids == tokenizer.mask_id)).sum())
        kept += int((picked & (ids == clean)).sum())
        randomised += int((picked & (ids != tokenizer.mask_id) & (ids != clean)).sum())
        labels_nsp.append(nsp)
    assert chosen / real == pytest.approx(0.15, abs=0.01)
    assert masked / chosen == pytest.approx(0.8, abs=0.02)
    # A random replacement can draw the original token (1 in ~500): counted as kept.
    assert randomised / chosen == pytest.approx(0.1, abs=0.015) and kept / chosen == pytest.approx(0.1, abs=0.015)
    assert torch.cat(labels_nsp).float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_masks_are_dynamic_and_the_sampler_resumes(train_tokens, tokenizer) -> None:
    sampler = data.BertPairs(train_tokens, 32, 4, 0, tokenizer)
    first = next(sampler)
    state = sampler.state_dict()
    second = next(sampler)
    sampler.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(next(sampler), second))
    assert not torch.equal(first[3], second[3])


def test_is_next_pairs_are_continuous_text(train_tokens, tokenizer) -> None:
    """A next B starts at the first line start after A: right after A, or after the rest of A's
    line when A is the start of one long line."""
    sampler = data.BertPairs(train_tokens, 48, 1, 3, tokenizer)
    line_starts = sampler.line_starts.tolist()
    seen_next = 0
    for _ in range(200):
        start, a_end, b_start, b_end, label = sampler.pair_spans()
        assert start in line_starts and b_start in line_starts and start < a_end and b_start < b_end
        if label == 0:
            seen_next += 1
            assert b_start == min(s for s in line_starts if s >= a_end)
    assert seen_next > 50


def _form_features(sampler: data.BertPairs, n_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_pairs, 9) features of each pair's form only -- where A and B start and end relative to
    lines, their lengths -- and (n_pairs,) next-sentence labels. Also checks that no random B
    overlaps A or A's true continuation."""
    line_starts = set(sampler.line_starts.tolist()) | {len(sampler.tokens)}
    rows, labels = [], []
    for _ in range(n_pairs):
        start, a_end, b_start, b_end, label = sampler.pair_spans()
        following = min(s for s in line_starts if s >= a_end)
        if label == 1:
            assert b_end <= start or b_start >= following + (b_end - b_start), "a random B overlaps A's text"
        la, lb = (a_end - start) / sampler.max_pair, (b_end - b_start) / sampler.max_pair
        rows.append([1.0, b_start not in line_starts, b_end not in line_starts, a_end not in line_starts,
                     la, lb, la * la, lb * lb, la * lb])
        labels.append(label)
    return torch.tensor(rows, dtype=torch.float64), torch.tensor(labels, dtype=torch.float64)


def test_next_sentence_labels_cannot_be_read_from_the_pairs_form(train_tokens, tokenizer) -> None:
    """A classifier that sees only where A and B start and end and how long they are -- fitted on
    5k pairs, scored on 5k others -- stays at chance."""
    features, labels = _form_features(data.BertPairs(train_tokens, 64, 1, 0, tokenizer), 10_000)
    assert features[:, 1].sum() == 0, "every B starts at a line start"
    weights = torch.zeros(features.shape[1], dtype=torch.float64, requires_grad=True)
    fit, held = slice(0, 5000), slice(5000, None)
    optimizer = torch.optim.LBFGS([weights], max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(features[fit] @ weights, labels[fit])
        loss.backward()
        return loss

    optimizer.step(closure)
    logistic = ((features[held] @ weights > 0).double() == labels[held]).double().mean().item()
    # and a lookup table: the majority label of each (B ends mid-line, A ends mid-line, B's length) cell
    cells = [tuple(row) for row in torch.cat([features[:, 2:4], (features[:, 5:6] * 16).round()], 1).tolist()]
    votes: dict[tuple, list[float]] = {}
    for cell, label in zip(cells[:5000], labels[fit].tolist()):
        votes.setdefault(cell, []).append(label)
    majority = {cell: float(sum(v) * 2 > len(v)) for cell, v in votes.items()}
    table = sum(majority.get(cell, 0.0) == label for cell, label in zip(cells[5000:], labels[held].tolist())) / 5000
    assert max(logistic, table) <= 0.52, (logistic, table)
    assert labels.mean().item() == pytest.approx(0.5, abs=0.02)


def test_next_sentence_pairs_need_room_for_a_random_half(tokenizer) -> None:
    tokens = np.asarray(tokenizer.encode("To be, or not to be, that is the question."), dtype=np.int64)
    with pytest.raises(DataError, match="too few"):
        next(data.BertPairs(tokens, 64, 4, 0, tokenizer))


def test_denoising_examples_hide_spans_of_the_clean_target(train_tokens, tokenizer) -> None:
    sampler = data.DenoisingSpans(train_tokens, 32, 64, 0, tokenizer, noise=0.3)
    src, src_pad, tgt_in, targets = next(sampler)
    hidden = total = 0
    for i in range(64):
        source = src[i][src_pad[i]].tolist()
        text = targets[i][targets[i] != IGNORE].tolist()
        assert text[-1] == tokenizer.eos_id and tgt_in[i, 0] == tokenizer.eos_id
        assert tgt_in[i, 1:len(text)].tolist() == text[:-1]  # decoder input: the target shifted right
        assert len(text) <= 32 and tokenizer.mask_id in source
        # The source is the text with some runs replaced by one [MASK] each: its kept pieces appear
        # in the text in order, and nothing else does.
        position = 0
        pieces = [list(g) for is_mask, g in itertools.groupby(source, lambda t: t == tokenizer.mask_id) if not is_mask]
        for piece in pieces:
            found = next(j for j in range(position, len(text)) if text[j:j + len(piece)] == piece)
            position = found + len(piece)
        kept = sum(map(len, pieces))
        hidden += len(text) - 1 - kept
        total += len(text) - 1
    assert 0.25 < hidden / total < 0.35


def test_denoising_sampler_resumes(train_tokens, tokenizer) -> None:
    sampler = data.DenoisingSpans(train_tokens, 32, 4, 0, tokenizer)
    next(sampler)
    state = sampler.state_dict()
    second = next(sampler)
    sampler.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(next(sampler), second))
