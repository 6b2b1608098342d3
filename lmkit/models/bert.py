"""BERT: a bidirectional Transformer encoder pretrained with masked-LM and next-sentence prediction.

Post-LayerNorm blocks; token + position + token-type (segment) embeddings; a tanh pooler on the
first ([CLS]) position; an MLM head (dense, GELU, LayerNorm, then the token embeddings transposed,
plus a bias) and an NSP head on the pooled state. The structure is BERT-base's, parameter for
parameter (BERT's separate query/key/value weights are one fused c_attn here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmkit import objectives
from lmkit.config import ModelConfig
from lmkit.models.layers import MLP, Attention, init_weights, run_block

N_SEGMENTS = 2  # token types: sentence A and sentence B


@dataclass
class BertLogits:
    mlm: torch.Tensor  # (N, V) at the N positions with an MLM label, or (B, T, V) without labels
    nsp: torch.Tensor  # (B, 2): [is next, is random]


class Block(nn.Module):
    """x -> ln_1(x + attn(x)) -> ln_2(x + mlp(x)); (B, T, C) in and out."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg.d_model, cfg.n_head, causal=False, dropout=cfg.dropout, bias=cfg.bias)
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg.d_model, cfg.ff_dim, activation=cfg.activation, dropout=cfg.dropout, bias=cfg.bias)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.ln_1(x + self.attn(x, pad_mask=pad_mask))
        return self.ln_2(x + self.mlp(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.token_type = nn.Embedding(N_SEGMENTS, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor, token_types: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
        x = self.word(idx) + self.position(pos) + self.token_type(token_types)  # (B, T, C)
        return self.dropout(self.ln(x))


class BERT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.grad_checkpoint = False  # set by the training loop from train.grad_checkpoint
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlm_dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlm_ln = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.nsp_head = nn.Linear(cfg.d_model, 2)
        init_weights(self, cfg.n_layer, scale_residual=False)

    def hidden_states(self, idx: torch.Tensor, token_types: torch.Tensor | None = None,
                      pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final states (B, T, C) for ids IDX (B, T); TOKEN_TYPES (B, T) are 0 for sentence A and 1
        for B; PAD_MASK (B, T) is True at real tokens."""
        if idx.size(1) > self.config.max_seq_len:
            raise ValueError(f"sequence of {idx.size(1)} tokens exceeds max_seq_len={self.config.max_seq_len}")
        x = self.embeddings(idx, torch.zeros_like(idx) if token_types is None else token_types)
        for block in self.layers:
            x = run_block(block, self.grad_checkpoint and self.training, x, pad_mask)
        return x

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., V), the output layer sharing the input embeddings' weights."""
        h = self.mlm_ln(F.gelu(self.mlm_dense(hidden)))
        return F.linear(h, self.embeddings.word.weight, self.mlm_bias)

    def nsp_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, 2) from the pooled [CLS] state."""
        return self.nsp_head(torch.tanh(self.pooler(hidden[:, 0])))

    def forward(self, idx: torch.Tensor, token_types: torch.Tensor | None = None,
                pad_mask: torch.Tensor | None = None, mlm_labels: torch.Tensor | None = None,
                nsp_labels: torch.Tensor | None = None) -> tuple[BertLogits, torch.Tensor | None]:
        """MLM and NSP logits, and with labels the loss MLM + NSP (each a mean cross-entropy).

        With MLM_LABELS (B, T) (objectives.IGNORE where nothing is predicted), MLM logits are
        computed only at the labelled positions, (N, V): the vocabulary projection is the costliest
        layer and 85% of positions would be thrown away.
        """
        hidden = self.hidden_states(idx, token_types, pad_mask)
        nsp = self.nsp_logits(hidden)
        if mlm_labels is None:
            return BertLogits(self.mlm_logits(hidden), nsp), None
        chosen = mlm_labels != objectives.IGNORE  # (B, T)
        logits = BertLogits(self.mlm_logits(hidden[chosen]), nsp)  # (N, V)
        loss = objectives.classification_loss(logits.mlm, mlm_labels[chosen])
        if nsp_labels is not None:
            loss = loss + objectives.classification_loss(nsp, nsp_labels)
        return logits, loss
