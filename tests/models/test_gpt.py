from __future__ import annotations

import dataclasses

import torch

from lmkit.config import ModelConfig
from lmkit.models import build_model, count_parameters, gpt
from lmkit.models.gpt import GPT
from lmkit.models.layers import Attention


def test_shapes_loss_and_tied_embeddings(tiny_model_config) -> None:
    model = build_model(tiny_model_config)
    idx, targets = torch.randint(0, 64, (3, 16)), torch.randint(0, 64, (3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 64)
    assert loss is not None and loss.ndim == 0
    # At init the model is close to uniform over the vocabulary: loss ~ ln(64).
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.3
    assert model.lm_head.weight is model.transformer.wte.weight
    assert count_parameters(model) == sum(p.numel() for n, p in model.named_parameters())


def test_gpt2_parameter_names(tiny_model_config) -> None:
    names = set(GPT(tiny_model_config).state_dict())
    for expected in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                     "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias",
                     "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight",
                     "transformer.ln_f.bias", "lm_head.weight"):
        assert expected in names


def test_causal_changing_a_later_token_leaves_earlier_logits_unchanged(tiny_model_config) -> None:
    model = build_model(tiny_model_config).eval()
    idx = torch.randint(0, 64, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 64
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_kv_cache_decoding_equals_full_recompute(tiny_model_config) -> None:
    model = build_model(tiny_model_config).eval()
    idx = torch.randint(0, 64, (2, 16))
    full, _ = model(idx)
    cache = model.new_cache(2, torch.device("cpu"))
    prefix, _ = model(idx[:, :5], cache=cache)  # prefill 5 positions
    steps = [prefix]
    steps.append(model(idx[:, 5:8], cache=cache)[0])  # a chunk of 3 with a cached prefix
    steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(8, 16)]  # one at a time
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache[0].length == 16


def test_overfits_a_single_batch(tiny_model_config) -> None:
    model = build_model(dataclasses.replace(tiny_model_config, dropout=0.0))
    idx = torch.randint(0, 64, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def test_bidirectional_attention_sees_later_tokens_and_ignores_padding() -> None:
    attn = Attention(32, 4, causal=False).eval()
    x = torch.randn(1, 6, 32)
    later = x.clone()
    later[:, 5] += 1.0
    assert not torch.allclose(attn(x)[:, 0], attn(later)[:, 0])  # position 0 sees position 5
    pad = torch.tensor([[True, True, True, True, False, False]])
    garbage = x.clone()
    garbage[:, 4:] = torch.randn(1, 2, 32) * 100
    torch.testing.assert_close(attn(x, pad_mask=pad)[:, :4], attn(garbage, pad_mask=pad)[:, :4])


def test_cross_attention_reads_the_context_and_masks_its_padding() -> None:
    attn = Attention(32, 4, causal=False, cross=True).eval()
    x, context = torch.randn(2, 3, 32), torch.randn(2, 5, 32)
    out = attn(x, context=context)
    assert out.shape == (2, 3, 32)
    pad = torch.tensor([[True] * 3 + [False] * 2] * 2)
    noisy = context.clone()
    noisy[:, 3:] = torch.randn(2, 2, 32)
    torch.testing.assert_close(attn(x, context=context, pad_mask=pad), attn(x, context=noisy, pad_mask=pad))
    assert not torch.allclose(out, attn(x, context=noisy))


def test_a_head_size_rotary_positions_could_not_take_is_fine_for_gpt() -> None:
    """Head size 15: GPT has learned positions, so only llama's rotary embedding needs an even one."""
    cfg = ModelConfig(arch="gpt", vocab_size=64, d_model=30, n_layer=1, n_head=2, max_seq_len=16)
    model = build_model(cfg).eval()
    idx = torch.randint(0, 64, (2, 16))
    full, _ = model(idx)
    cache = model.new_cache(2, torch.device("cpu"))
    steps = [model(idx[:, :5], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    hf = {"model_type": "gpt2", "vocab_size": 64, "n_embd": 30, "n_layer": 1, "n_head": 2, "n_positions": 16}
    assert gpt.config_from_hf(hf) == dataclasses.replace(cfg, d_ff=120)  # a GPT-2 of that shape imports too
