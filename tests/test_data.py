from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lmkit import data
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
    sampler = data.BertPairs(train_tokens, 48, 1, 3, tokenizer)
    stream = sampler.tokens.tolist()
    for _ in range(30):
        a, b, label = sampler._pair()
        if label == 0:
            joined = a.tolist() + b.tolist()
            starts = [i for i in range(len(stream)) if stream[i:i + len(joined)] == joined]
            assert starts, "A followed by B must occur in the text"


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
