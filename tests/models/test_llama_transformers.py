"""lmkit's llama computes what transformers' Llama, Qwen2 and Qwen3 compute, weight name for weight name.

At transformers' 0.02-std init attention is nearly uniform, so rotary positions move the logits by
~2e-3 and a wrong rope_theta would pass: the queries and keys are scaled up (sharpen_attention) until
every rotary setting moves them by hundreds of times the tolerance (test_every_rotary_setting_is_caught).
"""

from __future__ import annotations

import dataclasses

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


TOLERANCE = dict(rtol=1e-4, atol=1e-4)  # of every logits comparison with transformers
# Wrong rotary settings each case must be caught by: (case, what lmkit's config gets instead)
WRONG_ROTARY = [("llama", dict(rope_theta=10000.0)), ("qwen2", dict(rope_theta=500000.0)),
                ("qwen3", dict(rope_theta=500000.0)), ("llama3-scaled", dict(rope_theta=500000.0)),
                ("llama3-scaled", dict(rope_scaling="none")), ("llama3-scaled", dict(rope_factor=4.0)),
                ("llama3-scaled", dict(rope_low_freq_factor=2.0)), ("llama3-scaled", dict(rope_high_freq_factor=2.0)),
                ("llama3-scaled", dict(rope_original_max_len=32))]


def sharpen_attention(model: torch.nn.Module, factor: float = 32.0) -> None:
    """Scale MODEL's queries and keys by FACTOR (attention scores by its square), in place, so that
    attention is peaked and the logits depend on positions (a Hugging Face or lmkit llama's names)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rpartition(".")[0].endswith(("q_proj", "k_proj", "q_norm", "k_norm")):
                param.mul_(factor)


def tolerances_off(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """How many times TOLERANCE the worst element of ACTUAL is from EXPECTED (assert_close's rule)."""
    allowed = TOLERANCE["atol"] + TOLERANCE["rtol"] * expected.abs()
    return float(((actual - expected).abs() / allowed).max())


def _transformers_and_lmkit(case: str) -> tuple[torch.nn.Module, ModelConfig, torch.Tensor]:
    """The transformers model of CASE (sharpened), lmkit's config for it, and ids to score."""
    config_class, model_class, hf_options, ours = CASES[case]
    torch.manual_seed(0)
    hf = model_class(config_class(**COMMON, **hf_options)).eval()
    sharpen_attention(hf)
    cfg = ModelConfig(arch="llama", vocab_size=96, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=56,
                      max_seq_len=32, norm_eps=1e-6, bias=False, activation="silu", **ours)
    return hf, cfg, torch.randint(0, 96, (2, 20))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers_with_the_same_weights(case: str) -> None:
    hf, cfg, idx = _transformers_and_lmkit(case)
    model = Llama(cfg).eval()
    missing, unexpected = model.load_state_dict(hf.state_dict(), strict=False)
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    assert set(missing) <= tied and not unexpected  # name for name, shape for shape
    with torch.no_grad():
        expected = hf(idx).logits
        torch.testing.assert_close(model(idx)[0], expected, **TOLERANCE)


@pytest.mark.parametrize(("case", "wrong"), WRONG_ROTARY)
def test_every_rotary_setting_is_caught(case: str, wrong: dict[str, object]) -> None:
    hf, cfg, idx = _transformers_and_lmkit(case)
    model = Llama(dataclasses.replace(cfg, **wrong)).eval()
    model.load_state_dict(hf.state_dict(), strict=False)
    with torch.no_grad():
        assert tolerances_off(model(idx)[0], hf(idx).logits) >= 100
