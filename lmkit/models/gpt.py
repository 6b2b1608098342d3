"""GPT: a decoder-only Transformer trained to predict the next token (causal language model).

Pre-LayerNorm blocks, learned absolute positions, GELU MLP, output layer tied to the token
embeddings. Module names are GPT-2's (transformer.wte, transformer.h.0.attn.c_attn, ...), so
GPT-2 checkpoints map onto it name for name (its Conv1D weights transposed).
"""

from __future__ import annotations

import torch
from torch import nn

from lmkit import objectives
from lmkit.config import ModelConfig
from lmkit.models.layers import MLP, Attention, KVCache, init_weights, run_block


class Block(nn.Module):
    """x -> x + attn(ln_1(x)) -> x + mlp(ln_2(x)); (B, T, C) in and out.

    Causal in GPT; bidirectional (causal=False, with a padding mask) in the seq2seq encoder.
    """

    def __init__(self, cfg: ModelConfig, causal: bool = True) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = Attention(cfg.d_model, cfg.n_head, causal=causal, dropout=cfg.dropout, bias=cfg.bias)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg.d_model, cfg.ff_dim, activation=cfg.activation, dropout=cfg.dropout, bias=cfg.bias)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache=cache, pad_mask=pad_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.grad_checkpoint = False  # set by the training loop from train.grad_checkpoint
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.d_model),
            wpe=nn.Embedding(cfg.max_seq_len, cfg.d_model),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        init_weights(self, cfg.n_layer)

    def hidden_states(self, idx: torch.Tensor, cache: list[KVCache] | None = None) -> torch.Tensor:
        """Final-layer states (B, T, C) for token ids IDX (B, T), after the last LayerNorm.

        With CACHE, IDX continues the cached positions and the cache grows by T.
        """
        past = cache[0].length if cache else 0
        T = idx.size(1)
        if past + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        pos = torch.arange(past, past + T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = run_block(block, self.grad_checkpoint and self.training, x, cache[i] if cache else None)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: list[KVCache] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for IDX (B, T); with TARGETS (B, T) also the mean next-token loss over
        the positions whose target is not objectives.IGNORE."""
        logits = self.lm_head(self.hidden_states(idx, cache))  # (B, T, C) -> (B, T, V)
        loss = objectives.next_token_loss(logits, targets) if targets is not None else None
        return logits, loss

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype = torch.float32) -> list[KVCache]:
        cfg = self.config
        return [KVCache(batch, cfg.n_head, cfg.d_model // cfg.n_head, cfg.max_seq_len, device, dtype)
                for _ in range(cfg.n_layer)]
