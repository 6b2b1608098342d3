"""What each architecture takes from a config: the model settings it honours, its own checks of
them, and named starting points (tiny / default / small) with the measurements behind them. Plain
data, no torch: `lmkit tokenize` resolves configs (a preset may set the vocabulary size) and must
start fast. The architecture modules under lmkit/models/ declare everything else that differs
between architectures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmkit.errors import ConfigError

if TYPE_CHECKING:
    from lmkit.config import ModelConfig


# --- the model settings each architecture honours ------------------------------------------------
# ModelConfig is one record for every architecture (hyper-parameter names are the same across
# them). Each architecture reads the shared fields and its own; a config that sets a field only
# other architectures read is refused, naming them (lmkit.config), and a field left out keeps its
# default, which the architectures that do not read it never see.

SHARED_MODEL_FIELDS = ("arch", "vocab_size", "d_model", "n_layer", "n_head", "d_ff", "max_seq_len", "dropout",
                       "bias", "activation", "norm_eps")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _no_checks(cfg: ModelConfig) -> None:
    pass


def _check_llama(cfg: ModelConfig) -> None:
    """Grouped-query attention and rotary positions."""
    _check(cfg.n_head % cfg.kv_heads == 0, f"model.n_kv_head={cfg.n_kv_head} must divide model.n_head={cfg.n_head}")
    _check(cfg.attention_head_dim % 2 == 0,
           f"the head dimension {cfg.attention_head_dim} must be even for rotary positions")
    _check(cfg.rope_theta > 0, f"model.rope_theta={cfg.rope_theta} must be > 0")
    _check(cfg.rope_factor >= 1, f"model.rope_factor={cfg.rope_factor} must be >= 1")
    _check(0 < cfg.rope_low_freq_factor < cfg.rope_high_freq_factor,
           "model.rope_low_freq_factor must be > 0 and below model.rope_high_freq_factor")


@dataclass(frozen=True)
class ModelSettings:
    """The [model] settings one architecture honours (the shared ones and its own) and its own
    checks of their values, which ModelConfig runs after the shared checks."""

    own: tuple[str, ...]  # the fields it reads besides SHARED_MODEL_FIELDS
    check: Callable[[ModelConfig], None] = _no_checks  # raises ConfigError

    @property
    def fields(self) -> tuple[str, ...]:
        return (*SHARED_MODEL_FIELDS, *self.own)


MODEL_SETTINGS: dict[str, ModelSettings] = {
    "llama": ModelSettings(("tie_embeddings", "pooling", "n_kv_head", "head_dim", "qk_norm", "qkv_bias", "rope_theta",
                            "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                            "rope_original_max_len"), _check_llama),
    "gpt": ModelSettings(("tie_embeddings", "pooling")),
    "bert": ModelSettings(("pooling",)),  # its masked-LM head is always tied to the word embeddings
    "seq2seq": ModelSettings(("tie_embeddings",)),  # no classifier, so nothing to pool
}


# --- presets ---------------------------------------------------------------------------------------

# Presets set model and train fields per architecture; anything else keeps its dataclass default,
# and those defaults are the `default` preset: it fits the ~1 MB sample text in under 10 minutes on
# 2 CPU cores. Measured there (4-minute runs, held-out bits per byte): a small, fast model seeing
# more tokens beats a larger one seeing fewer (d_model 128 x 4 layers, context 64: 2.39; 192 x 4:
# 2.45; 256 x 6: 2.83), and a 1024-piece vocabulary beats 512 (2.45), 2048 (2.44) and 4096 (2.51).
# `tiny` is a whole pretrain in seconds (tests, CI smoke tests); `small` is for a GPU or a long run.
_BERT_MODEL = {"activation": "gelu", "norm_eps": 1e-12}
# The modern decoder: RMSNorm, rotary positions, SwiGLU, grouped-query attention, no biases, as
# Llama / Qwen / SmolLM2 / Mistral. Tuned on the sample text for GPT's default training time on 2
# CPU cores (bench/archs.py; held-out bits per byte at 150 s: this shape 2.334, GPT 2.488; wider
# 192: 2.372; multi-head KV: 2.396; context 128: 2.375; lr 6e-3: 2.358; Muon: 2.79. Without
# dropout it overfits the nine training plays: 2.334 at 150 s, still 2.336 after 2500 steps; with
# dropout 0.1, 2.312 at 300 s).
_LLAMA_MODEL = {"bias": False, "activation": "silu", "norm_eps": 1e-5}
PRESETS: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    "llama": {
        "tiny": {
            "model": {"d_model": 64, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_ff": 176, "max_seq_len": 64,
                      **_LLAMA_MODEL},
            "train": {"batch_size": 16, "max_steps": 150, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20,
                      "eval_interval": 50, "eval_batches": 4, "save_interval": 1000, "log_interval": 10},
        },
        "default": {
            "model": {"d_model": 128, "n_layer": 4, "n_head": 4, "n_kv_head": 2, "d_ff": 352, "max_seq_len": 64,
                      "dropout": 0.1, **_LLAMA_MODEL},
            # 1800 steps of dropout-0.1 training take what GPT's 2500 take here (~450 s on 2 cores)
            "train": {"batch_size": 32, "max_steps": 1800, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 100},
        },
        # For transfer learning on 2 CPU cores (~22 min on shakespeare_pretrain.txt, 1.5M tokens, ~6.5
        # epochs): wider, and a context of 128 that holds a whole genre passage (117 tokens on
        # average; the default's 64 cuts half of it off). bench/transfer.py measures what it buys.
        "long": {
            "model": {"d_model": 192, "n_layer": 4, "n_head": 6, "n_kv_head": 2, "d_ff": 512, "max_seq_len": 128,
                      "dropout": 0.1, **_LLAMA_MODEL},
            "train": {"batch_size": 32, "max_steps": 2400, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 200,
                      "eval_interval": 200},
        },
        "small": {
            "tokenizer": {"vocab_size": 4096},
            "model": {"d_model": 384, "n_layer": 6, "n_head": 6, "n_kv_head": 2, "d_ff": 1024, "max_seq_len": 256,
                      "dropout": 0.1, **_LLAMA_MODEL},
            "train": {"batch_size": 32, "max_steps": 5000, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 200,
                      "eval_interval": 500, "save_interval": 1000},
        },
    },
    "gpt": {
        "tiny": {
            "model": {"d_model": 64, "n_layer": 2, "n_head": 4, "max_seq_len": 64},
            "train": {"batch_size": 16, "max_steps": 150, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20,
                      "eval_interval": 50, "eval_batches": 4, "save_interval": 1000, "log_interval": 10},
        },
        "default": {},
        "small": {
            "tokenizer": {"vocab_size": 4096},
            "model": {"d_model": 384, "n_layer": 6, "n_head": 6, "max_seq_len": 256, "dropout": 0.1},
            "train": {"batch_size": 32, "max_steps": 5000, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 200,
                      "eval_interval": 500, "save_interval": 1000},
        },
    },
    # BERT: post-LayerNorm, exact GELU and BERT's LayerNorm epsilon. Post-LN trains less stably than
    # GPT's pre-LN: at d_model 128 and lr 3e-3 it collapses to always predicting the most frequent
    # token, so the learning rates are lower and the warmup longer. Context 64 with batch 64 gives
    # twice the sentence pairs of 128 x 32 for the same tokens, which NSP needs.
    "bert": {
        "tiny": {
            "model": {"d_model": 64, "n_layer": 2, "n_head": 4, "max_seq_len": 64, **_BERT_MODEL},
            "train": {"batch_size": 16, "max_steps": 150, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 20,
                      "eval_interval": 50, "eval_batches": 4, "save_interval": 1000, "log_interval": 10},
        },
        "default": {
            "model": {"d_model": 128, "n_layer": 4, "n_head": 4, "max_seq_len": 64, **_BERT_MODEL},
            "train": {"batch_size": 64, "max_steps": 2000, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 200},
        },
        "small": {
            "tokenizer": {"vocab_size": 4096},
            "model": {"d_model": 256, "n_layer": 6, "n_head": 8, "max_seq_len": 256, "dropout": 0.1, **_BERT_MODEL},
            "train": {"batch_size": 32, "max_steps": 10000, "lr": 5e-4, "min_lr": 5e-5, "warmup_steps": 500,
                      "eval_interval": 500, "save_interval": 1000},
        },
    },
    # Encoder-decoder, pre-LayerNorm like GPT, pretrained by text infilling (BART): 30% of the tokens
    # hidden in spans. n_layer is per stack: the default's 3 + 3 layers cost about what GPT's 4 do
    # per token, as the decoder's cross attention is an extra sublayer.
    "seq2seq": {
        "tiny": {
            "data": {"mask_prob": 0.3},
            "model": {"d_model": 64, "n_layer": 2, "n_head": 4, "max_seq_len": 64},
            "train": {"batch_size": 16, "max_steps": 150, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20,
                      "eval_interval": 50, "eval_batches": 4, "save_interval": 1000, "log_interval": 10},
        },
        "default": {
            "data": {"mask_prob": 0.3},
            "model": {"d_model": 128, "n_layer": 3, "n_head": 4, "max_seq_len": 64},
            "train": {"batch_size": 32, "max_steps": 2000, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 100},
        },
        "small": {
            "tokenizer": {"vocab_size": 4096},
            "data": {"mask_prob": 0.3},
            "model": {"d_model": 256, "n_layer": 6, "n_head": 8, "max_seq_len": 128, "dropout": 0.1},
            "train": {"batch_size": 32, "max_steps": 10000, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 300,
                      "eval_interval": 500, "save_interval": 1000},
        },
    },
}


DEFAULT_ARCH = "llama"  # what `lmkit pretrain` trains when no --arch is given: it learns most per second
ARCH_HELP = ("llama (the modern decoder: RMSNorm, rotary positions, SwiGLU, grouped-query attention), gpt "
             "(GPT-2 layout), bert (masked LM + next sentence) or seq2seq (encoder-decoder, denoising) "
             f"(default: {DEFAULT_ARCH}).")
