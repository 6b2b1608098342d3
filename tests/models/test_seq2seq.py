"""The encoder-decoder: cached decoding equals recomputing, padding is invisible, weights are tied."""

from __future__ import annotations

import torch

from lmkit.config import ModelConfig
from lmkit.models.seq2seq import Seq2Seq


def _model(**overrides: object) -> Seq2Seq:
    cfg = ModelConfig(arch="seq2seq", vocab_size=50, d_model=32, n_layer=2, n_head=4, max_seq_len=16, **overrides)
    return Seq2Seq(cfg).eval()


def test_output_layer_shares_the_token_embedding() -> None:
    model = _model()
    assert model.lm_head.weight is model.wte.weight
    src, tgt = torch.randint(7, 50, (2, 5)), torch.randint(7, 50, (2, 4))
    logits, loss = model(src, torch.ones(2, 5, dtype=torch.bool), tgt, tgt)
    assert logits.shape == (2, 4, 50) and loss.ndim == 0


def test_incremental_decoding_with_the_cache_equals_full_recompute() -> None:
    model = _model()
    src = torch.randint(7, 50, (3, 6))
    src_pad = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
    tgt = torch.randint(7, 50, (3, 9))
    full = model.decode(tgt, model.encode(src, src_pad), src_pad)  # (B, T, V), all positions at once
    state = model.start_decoding(src, src_pad)
    steps = [model.decode(tgt[:, :3], state)]  # a prefix of 3, then one token at a time
    steps += [model.decode(tgt[:, t:t + 1], state) for t in range(3, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert state.length == 9


def test_source_padding_does_not_change_the_output() -> None:
    model = _model()
    src = torch.randint(7, 50, (1, 5))
    tgt = torch.randint(7, 50, (1, 4))
    alone = model(src, torch.ones(1, 5, dtype=torch.bool), tgt)[0]
    padded_src = torch.cat([src, torch.randint(7, 50, (1, 4))], dim=1)  # junk where the padding is
    pad = torch.tensor([[True] * 5 + [False] * 4])
    torch.testing.assert_close(model(padded_src, pad, tgt)[0], alone, atol=1e-5, rtol=1e-5)


def test_beam_reorder_moves_only_the_self_attention_cache() -> None:
    model = _model()
    src = torch.randint(7, 50, (1, 5))
    state = model.start_decoding(src, torch.ones(1, 5, dtype=torch.bool), repeat=2)
    model.decode(torch.tensor([[3], [9]]), state)
    kept = state.cache[0].k[1, :, :1].clone()
    state.reorder(torch.tensor([1, 1]))
    torch.testing.assert_close(state.cache[0].k[0, :, :1], kept)
