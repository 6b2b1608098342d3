"""lmkit's llama computes what transformers' Llama, Qwen2 and Qwen3 compute, weight name for weight name."""

from __future__ import annotations

import pytest
import torch

from lmkit.config import ModelConfig
from lmkit.models.llama import Llama

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-6, attn_implementation="eager")
CASES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(tie_word_embeddings=False, rope_theta=500000.0),
              dict(tie_embeddings=False, rope_theta=500000.0)),
    "llama3-scaled": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                      dict(tie_word_embeddings=True,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
                      dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=16)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True),
              dict(qkv_bias=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(tie_word_embeddings=True, head_dim=12),
              dict(qk_norm=True, head_dim=12)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers_with_the_same_weights(case: str) -> None:
    config_class, model_class, hf_options, ours = CASES[case]
    torch.manual_seed(0)
    hf = model_class(config_class(**COMMON, **hf_options)).eval()
    cfg = ModelConfig(arch="llama", vocab_size=96, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=56,
                      max_seq_len=32, norm_eps=1e-6, bias=False, activation="silu", **ours)
    model = Llama(cfg).eval()
    missing, unexpected = model.load_state_dict(hf.state_dict(), strict=False)
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    assert set(missing) <= tied and not unexpected  # name for name, shape for shape
    idx = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        expected = hf(idx).logits
        torch.testing.assert_close(model(idx)[0], expected, rtol=1e-4, atol=1e-4)
