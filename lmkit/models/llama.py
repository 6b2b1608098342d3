"""The modern decoder-only Transformer (Llama, Qwen2/3, Mistral, SmolLM2): pre-norm RMSNorm blocks,
rotary positions (no position table), a SwiGLU MLP, grouped-query attention with an optional QK-norm,
no biases (or q/k/v biases only, as Qwen2), output layer tied or not.

Module names are Hugging Face's LlamaForCausalLM (model.embed_tokens, model.layers.0.self_attn.q_proj,
model.layers.0.mlp.gate_proj, model.norm, lm_head), so its checkpoints map onto it name for name.
"""

from __future__ import annotations

import torch
from torch import nn

from lmkit import evaluate, objectives
from lmkit.config import ModelConfig
from lmkit.models import causal
from lmkit.models.arch import Arch
from lmkit.models.layers import (
    GatedMLP,
    GroupedQueryAttention,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    init_weights,
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


class Llama(nn.Module):
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
        past = cache[0].length if cache else 0
        T = idx.size(1)
        if past + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        x = self.drop(self.model.embed_tokens(idx))  # (B, T, C)
        rotary = self.rotary(past, T, x.dtype)  # 2 x (T, D)
        for i, block in enumerate(self.model.layers):
            x = run_block(block, self.grad_checkpoint and self.training, x, rotary, cache[i] if cache else None)
        return self.model.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: list[KVCache] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for IDX (B, T); with TARGETS (B, T) also the mean next-token loss over
        the positions whose target is not objectives.IGNORE."""
        logits = self.lm_head(self.hidden_states(idx, cache))  # (B, T, C) -> (B, T, V)
        loss = objectives.next_token_loss(logits, targets) if targets is not None else None
        return logits, loss

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype = torch.float32) -> list[KVCache]:
        """One cache per layer holding n_kv_head heads: grouped-query attention shrinks it by n_head / n_kv_head."""
        cfg = self.config
        return [KVCache(batch, cfg.kv_heads, cfg.attention_head_dim, cfg.max_seq_len, device, dtype)
                for _ in range(cfg.n_layer)]

    def sequence_summary(self, idx: torch.Tensor, token_types: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, C): the state a classifier reads, at the last real token."""
        return causal.last_token_state(self.hidden_states(idx), pad_mask)


ARCH = Arch(
    name="llama",
    summary="the modern decoder: RMSNorm, rotary positions, SwiGLU, grouped-query attention (Llama, Qwen, Mistral)",
    model=Llama,
    objectives=("causal-lm",),
    pretraining=causal.pretraining,
    distillation=causal.DISTILLATION,
    tasks=("classify", "instruct", "lm"),
    decoding="continue",
    evaluate=evaluate.evaluate_text,
    pair_layout=causal.pair_layout,
    lora_targets={"attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
                  "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
)
