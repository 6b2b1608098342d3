from __future__ import annotations

import dataclasses

import pytest
import torch

from lmkit.config import ModelConfig
from lmkit.errors import ConfigError
from lmkit.models import build_model, count_parameters
from lmkit.models.heads import SequenceClassifier
from lmkit.models.layers import GroupedQueryAttention, RotaryEmbedding, apply_rotary
from lmkit.models.llama import Llama


@pytest.fixture
def llama_config() -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=48,
                       max_seq_len=16, bias=False, activation="silu")


def test_hugging_face_llama_names_shapes_and_a_smaller_kv_cache(llama_config) -> None:
    model = Llama(llama_config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes["model.embed_tokens.weight"] == (64, 32)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (32, 32)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (16, 32)  # 2 KV heads of 8
    assert shapes["model.layers.1.mlp.gate_proj.weight"] == (48, 32)
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (32, 48)
    assert shapes["model.layers.0.input_layernorm.weight"] == (32,)
    assert shapes["model.norm.weight"] == (32,)
    assert not any(name.endswith("bias") for name in shapes)  # no biases, no position table
    assert not any("rotary" in name for name in shapes)  # inv_freq is not saved, as in transformers
    assert model.lm_head.weight is model.model.embed_tokens.weight
    cache = model.new_cache(1, torch.device("cpu"))
    assert cache[0].k.shape == (1, 2, 16, 8)  # n_kv_head heads: half of multi-head's memory
    untied = Llama(dataclasses.replace(llama_config, tie_embeddings=False))
    assert count_parameters(untied) == count_parameters(model) + 64 * 32


def test_qk_norm_qkv_bias_and_a_head_dim_of_its_own(llama_config) -> None:
    cfg = dataclasses.replace(llama_config, qk_norm=True, qkv_bias=True, head_dim=12)
    shapes = {name: tuple(t.shape) for name, t in Llama(cfg).state_dict().items()}
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (48, 32)  # 4 heads of 12
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (32, 48)
    assert shapes["model.layers.0.self_attn.q_norm.weight"] == (12,)
    assert shapes["model.layers.0.self_attn.k_proj.bias"] == (24,)
    assert "model.layers.0.self_attn.o_proj.bias" not in shapes


def test_causal_and_kv_cache_decoding_equals_a_full_forward(llama_config) -> None:
    model = build_model(dataclasses.replace(llama_config, qk_norm=True)).eval()
    idx = torch.randint(0, 64, (2, 16))
    full, _ = model(idx)
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 64
    torch.testing.assert_close(model(changed)[0][:, :9], full[:, :9], rtol=0, atol=0)
    cache = model.new_cache(2, torch.device("cpu"))
    steps = [model(idx[:, :5], cache=cache)[0], model(idx[:, 5:8], cache=cache)[0]]
    steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(8, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_equals_multi_head_with_shared_key_value_heads() -> None:
    torch.manual_seed(0)
    gqa = GroupedQueryAttention(32, 4, 2, 8).eval()
    mha = GroupedQueryAttention(32, 4, 4, 8).eval()
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        # Query heads 0, 1 read KV head 0 and heads 2, 3 read KV head 1: repeat each KV head twice.
        for name in ("k_proj", "v_proj"):
            weight = getattr(gqa, name).weight.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
            getattr(mha, name).weight.copy_(weight)
    x = torch.randn(2, 7, 32)
    rotary = RotaryEmbedding(8, 10000.0)(0, 7, x.dtype)
    torch.testing.assert_close(gqa(x, rotary), mha(x, rotary), rtol=1e-5, atol=1e-6)


def test_n_kv_head_equal_to_n_head_is_plain_multi_head_attention() -> None:
    torch.manual_seed(0)
    attn = GroupedQueryAttention(32, 4, 4, 8).eval()
    x = torch.randn(2, 6, 32)
    cos, sin = RotaryEmbedding(8, 10000.0)(0, 6, x.dtype)
    B, T, H, D = 2, 6, 4, 8
    q = apply_rotary(attn.q_proj(x).view(B, T, H, D).transpose(1, 2), cos, sin)
    k = apply_rotary(attn.k_proj(x).view(B, T, H, D).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(B, T, H, D).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / D ** 0.5  # (B, H, T, T)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    expected = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D))
    torch.testing.assert_close(attn(x, (cos, sin)), expected, rtol=1e-5, atol=1e-6)


def test_rotary_scores_depend_only_on_relative_positions() -> None:
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, 10000.0)
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)

    def scores(start: int) -> torch.Tensor:
        cos, sin = rope(start, 5, torch.float32)
        return apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2)

    torch.testing.assert_close(scores(0), scores(37), rtol=1e-4, atol=1e-4)
    cos, sin = rope(0, 5, torch.float32)
    assert not torch.allclose(scores(0), q @ k.transpose(-1, -2))  # it does rotate
    # A rotation keeps each vector's length.
    torch.testing.assert_close(apply_rotary(q, cos, sin).norm(dim=-1), q.norm(dim=-1))


def test_llama3_rope_scaling_stretches_only_the_low_frequencies() -> None:
    plain = RotaryEmbedding(64, 500000.0).inv_freq
    scaled = RotaryEmbedding(64, 500000.0, "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_len=64).inv_freq
    assert torch.equal(scaled[:2], plain[:2])  # short wavelengths unchanged
    torch.testing.assert_close(scaled[-1], plain[-1] / 8)  # the longest divided by the factor


def test_overfits_a_single_batch(llama_config) -> None:
    torch.manual_seed(0)
    model = build_model(llama_config)
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


def test_bad_shapes_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="n_kv_head=3 must divide model.n_head=4"):
        ModelConfig(arch="llama", d_model=32, n_head=4, n_kv_head=3)
    with pytest.raises(ConfigError, match="must be even for rotary"):
        ModelConfig(arch="llama", d_model=36, n_head=4)
    with pytest.raises(ConfigError, match="model.arch='mamba' is not one of"):
        ModelConfig(arch="mamba")


def test_rms_norm_equals_torch_forward_and_backward() -> None:
    from lmkit.models.layers import RMSNorm

    torch.manual_seed(0)
    ours, reference = RMSNorm(16, eps=1e-5), torch.nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        reference.weight.copy_(ours.weight)
    x = torch.randn(3, 5, 16, requires_grad=True)
    grad = torch.randn(3, 5, 16)
    torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-6)
    ours_grads = torch.autograd.grad(ours(x), [x, ours.weight], grad)
    reference_grads = torch.autograd.grad(reference(x), [x, reference.weight], grad)
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_mean_pooling_averages_the_real_tokens_and_ignores_padding(arch: str, llama_config) -> None:
    cfg = dataclasses.replace(llama_config, pooling="mean") if arch == "llama" else ModelConfig(
        arch="bert", vocab_size=64, d_model=32, n_layer=2, n_head=4, max_seq_len=16, pooling="mean")
    torch.manual_seed(0)
    classifier = SequenceClassifier(build_model(cfg), 3).eval()
    ids = torch.randint(5, 64, (2, 10))
    pad_mask = torch.ones(2, 10, dtype=torch.bool)
    pad_mask[1, 6:] = False
    types = torch.zeros_like(ids)
    summary = classifier.summary(ids, types, pad_mask)
    hidden = classifier.backbone.hidden_states(ids) if arch == "llama" else \
        classifier.backbone.hidden_states(ids, types, pad_mask)
    assert torch.allclose(summary[0], hidden[0].mean(0), atol=1e-6)
    assert torch.allclose(summary[1], hidden[1, :6].mean(0), atol=1e-6)
    padded_differently = ids.clone()
    padded_differently[1, 6:] = 0
    assert torch.allclose(classifier.summary(padded_differently, types, pad_mask)[1], summary[1], atol=1e-6)
    with pytest.raises(ConfigError, match="pooling"):
        ModelConfig(pooling="max")
