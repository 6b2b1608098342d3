"""The modern decoder-only Transformer (Llama, Qwen2/3, Mistral, SmolLM2): pre-norm RMSNorm blocks,
rotary positions (no position table), a SwiGLU MLP, grouped-query attention with an optional QK-norm,
no biases (or q/k/v biases only, as Qwen2), output layer tied or not.

Module names are Hugging Face's LlamaForCausalLM (model.embed_tokens, model.layers.0.self_attn.q_proj,
model.layers.0.mlp.gate_proj, model.norm, lm_head), so its checkpoints map onto it name for name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmkit.batches import ClassifyBatch, LMBatch
from lmkit.config import ModelConfig
from lmkit.errors import CheckpointError
from lmkit.models import causal
from lmkit.models.arch import Arch, HFMapping
from lmkit.models.layers import (
    GatedMLP,
    GroupedQueryAttention,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    init_weights,
    last_position,
    run_block,
)


class Block(nn.Module):
    """x -> x + attn(norm(x)) -> x + mlp(norm(x)); (B, T, C) in and out."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = GroupedQueryAttention(
            cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.attention_head_dim, qkv_bias=cfg.qkv_bias, bias=cfg.bias,
            qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps, dropout=cfg.dropout)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = GatedMLP(cfg.d_model, cfg.ff_dim, activation=cfg.activation, bias=cfg.bias, dropout=cfg.dropout)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(causal.CausalLM):
    """Embeddings -> blocks (rotary positions inside attention) -> RMSNorm (hidden_states); forward
    and the classifier's summary are causal.CausalLM's."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.grad_checkpoint = False  # set by the training loop from train.grad_checkpoint
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.d_model),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            norm=RMSNorm(cfg.d_model, eps=cfg.norm_eps),
        ))
        self.drop = nn.Dropout(cfg.dropout)
        self.rotary = RotaryEmbedding(cfg.attention_head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor,
                                      cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                                      cfg.rope_original_max_len)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        init_weights(self, cfg.n_layer)

    def hidden_states(self, idx: torch.Tensor, cache: list[KVCache] | None = None) -> torch.Tensor:
        """Final-layer states (B, T, C) for token ids IDX (B, T), after the last RMSNorm.

        With CACHE, IDX continues the cached positions and the cache grows by T.
        """
        past = cache[0].length if cache else 0  # an int, or one per row (SlotCache)
        T = idx.size(1)
        if last_position(past, T) >= self.config.max_seq_len:
            raise ValueError(f"sequence of {last_position(past, T) + 1} tokens exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        x = self.drop(self.model.embed_tokens(idx))  # (B, T, C)
        rotary = self.rotary(past, T, x.dtype)  # 2 x (T, D)
        for i, block in enumerate(self.model.layers):
            x = run_block(block, self.grad_checkpoint and self.training, x, rotary, cache[i] if cache else None)
        return self.model.norm(x)

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype = torch.float32,
                  length: int | None = None) -> list[KVCache]:
        """One cache per layer for LENGTH positions (default: the whole context), of n_kv_head heads:
        grouped-query attention shrinks it by n_head / n_kv_head."""
        cfg = self.config
        return [KVCache(batch, cfg.kv_heads, cfg.attention_head_dim, length or cfg.max_seq_len, device, dtype)
                for _ in range(cfg.n_layer)]


# --- Hugging Face Llama, Qwen2, Qwen3, Mistral ---------------------------------------------------
# The same module names as LlamaForCausalLM, so the weights map one for one; the families differ in
# config keys only: Qwen2 has q/k/v biases, Qwen3 per-head q/k RMSNorm, Mistral a sliding window.

HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "mistral": "MistralForCausalLM"}
_ROPE_TYPES = ("default", "llama3")


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope_theta, scaling parameters) from transformers >= 5's rope_parameters or the older
    rope_theta + rope_scaling keys."""
    parameters = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {}) or parameters
    theta = parameters.get("rope_theta", config.get("rope_theta", scaling.get("rope_theta", 10000.0)))
    return float(theta), scaling


def config_from_hf(config: dict[str, Any]) -> ModelConfig:
    """A Llama-family config.json -> lmkit's llama config; what lmkit cannot compute is named.

    Raises:
        CheckpointError: a sliding window shorter than the context, a rope_scaling type other than
            llama3, an activation other than silu, biases on some projections but not the others.
    """
    model_type = config["model_type"]
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{model_type} hidden_act={config['hidden_act']!r} is not supported (only silu)")
    theta, scaling = _rope(config)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise CheckpointError(f"rope_scaling type {rope_type!r} is not supported (lmkit has {', '.join(_ROPE_TYPES)})")
    context = int(config.get("max_position_embeddings", 2048))
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", model_type == "mistral")
    if window is not None and uses_window and window < context:
        raise CheckpointError(f"sliding_window={window} (below max_position_embeddings={context}) is not supported: "
                              "lmkit attends to the whole context")
    attention_bias, mlp_bias = bool(config.get("attention_bias", False)), bool(config.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise CheckpointError(f"attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported: lmkit "
                              "has biases on every projection or on none (or Qwen2's q/k/v biases)")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    llama3 = {}
    if rope_type == "llama3":
        llama3 = {"rope_factor": float(scaling["factor"]), "rope_low_freq_factor": float(scaling["low_freq_factor"]),
                  "rope_high_freq_factor": float(scaling["high_freq_factor"]),
                  "rope_original_max_len": int(scaling["original_max_position_embeddings"])}
    return ModelConfig(
        arch="llama", vocab_size=config["vocab_size"], d_model=config["hidden_size"],
        n_layer=config["num_hidden_layers"], n_head=heads, n_kv_head=config.get("num_key_value_heads") or heads,
        head_dim=head_dim if head_dim != config["hidden_size"] // heads else 0, d_ff=config["intermediate_size"],
        max_seq_len=context, dropout=0.0, bias=attention_bias, qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3", activation="silu", norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), rope_theta=theta,
        rope_scaling="llama3" if rope_type == "llama3" else "none", **llama3)


def export_hf(cfg: ModelConfig, state: dict[str, torch.Tensor], labels: list[str],
              imported: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A llama language model as the class it was imported from (LlamaForCausalLM for lmkit's own):
    the imported config.json with lmkit's values written over it, weights in its dtype."""
    model_type = imported.get("model_type", "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama")
    if labels or (cfg.qk_norm and model_type != "qwen3") or (cfg.qkv_bias and model_type != "qwen2"):
        raise CheckpointError(f"transformers has no {HF_CLASSES.get(model_type, model_type)} counterpart of this llama "
                              f"{'classifier' if labels else 'model'} (qk_norm={cfg.qk_norm}, qkv_bias={cfg.qkv_bias})")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_len)
    config = {key: value for key, value in imported.items() if key not in ("rope_scaling", "rope_theta")}
    config.update(architectures=[HF_CLASSES[model_type]], model_type=model_type, vocab_size=cfg.vocab_size,
                  hidden_size=cfg.d_model, intermediate_size=cfg.ff_dim, num_hidden_layers=cfg.n_layer,
                  num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads, head_dim=cfg.attention_head_dim,
                  hidden_act="silu", max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                  tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope)
    if model_type in ("llama", "qwen3"):
        config.update(attention_bias=cfg.bias)
    if model_type == "llama":
        config.update(mlp_bias=cfg.bias)
    dtype_name = str(config.get("dtype") or config.get("torch_dtype") or "float32")  # transformers 5, 4
    config.setdefault("dtype", dtype_name)
    dtype = getattr(torch, dtype_name, torch.float32)
    weights = {name: tensor.to(dtype) for name, tensor in state.items()
               if not (cfg.tie_embeddings and name == "lm_head.weight")}
    return config, weights


def special_ids(tokenizer: Any) -> dict[str, Any]:
    """config.json's token ids: BOS, the end-of-text id(s) generation stops at, padding."""
    stops = list(tokenizer.stop_ids)
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
            "pad_token_id": tokenizer.pad_id}


def train_flops(cfg: ModelConfig, batch: LMBatch | ClassifyBatch) -> float:
    """A block's projections: H query heads, G key/value heads and the output, D wide each, and the
    three of the gated MLP; attention H x D wide (each key/value head serves H / G query heads)."""
    d, H, G, D = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.attention_head_dim
    return causal.train_flops(cfg, batch, d * (2 * H + 2 * G) * D + 3 * d * cfg.ff_dim, H * D)


ARCH = Arch(
    name="llama",
    summary="the modern decoder: RMSNorm, rotary positions, SwiGLU, grouped-query attention (Llama, Qwen, Mistral)",
    model=Llama,
    objectives=("causal-lm",),
    pretraining=causal.pretraining,
    distillation=causal.DISTILLATION,
    tasks=("chat", "classify", "dpo", "instruct", "lm"),
    decoding="continue",
    evaluation="text",
    train_flops=train_flops,
    pair_layout=causal.pair_layout,
    lora_targets={"attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
                  "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
    hf=HFMapping(model_types=tuple(HF_CLASSES), config_in=config_from_hf, weights_in=None,
                 may_lack=lambda config: {"lm_head.weight"} if config.get("tie_word_embeddings") else set(),
                 export=export_hf, special_ids=special_ids, tokenizer_class="PreTrainedTokenizerFast",
                 tokenizer_prompts=True),
)
