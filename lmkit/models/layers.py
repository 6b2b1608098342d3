"""Building blocks shared by GPT, BERT and the encoder-decoder: one attention module (causal,
bidirectional or cross), the feed-forward MLP, and the preallocated KV cache used for decoding.

Legend: B batch, T query positions, S key positions, C channels (d_model), H heads,
D head dim (C // H), F feed-forward width, V vocabulary.
Parameter names follow GPT-2 (c_attn, c_proj, c_fc; q_attn for cross attention) so that
pretrained weights map onto them one for one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


class KVCache:
    """Keys and values of one self-attention layer, preallocated for MAX_LEN positions, so each
    decoding step writes one slot instead of concatenating (no copy grows with the text)."""

    def __init__(self, batch: int, n_head: int, head_dim: int, max_len: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.k = torch.zeros(batch, n_head, max_len, head_dim, device=device, dtype=dtype)  # (B, H, S_max, D)
        self.v = torch.zeros_like(self.k)
        self.length = 0  # positions filled so far

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, D) new keys/values; return all of them so far, (B, H, length + T, D)."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep row rows[i] as row i (beam search: each surviving beam continues one parent beam)."""
        self.k = self.k.index_select(0, rows)
        self.v = self.v.index_select(0, rows)


class Attention(nn.Module):
    """Multi-head attention through torch's scaled_dot_product_attention.

    causal=True: position t sees positions <= t (GPT, decoder self-attention).
    causal=False: every position sees every unpadded position (BERT, encoder).
    cross=True: queries from x, keys and values from an encoder's output (decoder cross-attention).
    """

    def __init__(self, d_model: int, n_head: int, *, causal: bool, cross: bool = False,
                 dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.n_head, self.causal, self.cross, self.dropout = n_head, causal, cross, dropout
        if cross:
            self.q_attn = nn.Linear(d_model, d_model, bias=bias)
            self.c_attn = nn.Linear(d_model, 2 * d_model, bias=bias)  # keys and values of the context
        else:
            self.c_attn = nn.Linear(d_model, 3 * d_model, bias=bias)  # queries, keys and values, fused
        self.c_proj = nn.Linear(d_model, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross attention: keys and values (B, H, S, D) of an encoder output CONTEXT (B, S, C).
        They do not change while a decoder generates, so decoding computes them once per input."""
        B, S, C = context.shape
        k, v = self.c_attn(context).split(C, dim=2)  # (B, S, 2C) -> 2 x (B, S, C)
        H, D = self.n_head, C // self.n_head
        return k.view(B, S, H, D).transpose(1, 2), v.view(B, S, H, D).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        *,
        context: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        pad_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Attend from x (B, T, C) to itself, or to CONTEXT when cross.

        Args:
            context: cross attention only: the encoder output (B, S, C), or its keys and values
                from context_kv().
            pad_mask: (B, S) bool, True at real key positions. A query that can see no key at all
                would give NaN, so pad on the right for causal models.
            cache: keys/values of earlier positions (self-attention only); the new ones are added.

        Returns:
            (B, T, C)
        """
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        if self.cross:
            assert context is not None, "cross attention needs a context"
            q = self.q_attn(x).view(B, T, H, D).transpose(1, 2)  # (B, T, C) -> (B, H, T, D)
            k, v = context if isinstance(context, tuple) else self.context_kv(context)  # (B, H, S, D)
        else:
            q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, 3C) -> 3 x (B, T, C)
            q = q.view(B, T, H, D).transpose(1, 2)  # (B, T, C) -> (B, H, T, D)
            k = k.view(B, T, H, D).transpose(1, 2)
            v = v.view(B, T, H, D).transpose(1, 2)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)  # (B, H, past + T, D)

        mask = self._mask(T, k.size(2), past, pad_mask, x.device)
        # With no padding and no cached prefix, is_causal lets torch pick its fastest kernel.
        plain_causal = self.causal and mask is None and past == 0 and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=plain_causal,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, H, T, D) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _mask(self, T: int, S: int, past: int, pad_mask: torch.Tensor | None,
              device: torch.device) -> torch.Tensor | None:
        """Boolean (B or 1, 1, T, S) mask, True where attention is allowed; None when nothing is hidden."""
        needs_causal_mask = self.causal and past > 0 and T > 1
        if pad_mask is None and not needs_causal_mask:
            return None
        mask = torch.ones(1, 1, T, S, dtype=torch.bool, device=device)
        if self.causal:
            mask = mask.tril(diagonal=past)  # query t (absolute position past + t) sees keys <= past + t
        if pad_mask is not None:
            mask = mask & pad_mask[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
        return mask


class MLP(nn.Module):
    """Position-wise feed-forward: (B, T, C) -> (B, T, F) -> (B, T, C)."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d_model, d_ff, bias=bias)
        self.c_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.approximate = "tanh" if activation == "gelu_tanh" else "none"
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


def run_block(block: nn.Module, recompute: bool, *args: object) -> torch.Tensor:
    """block(*args); with RECOMPUTE (gradient checkpointing, train.grad_checkpoint), the block's
    activations are not kept for backward but computed again there: activation memory per layer
    drops to its input, for about a third more compute. The RNG state is replayed, so dropout masks
    and results are the same as without."""
    if recompute and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def init_weights(module: nn.Module, n_layer: int, scale_residual: bool = True) -> None:
    """GPT-2 / BERT initialisation: N(0, 0.02) weights, zero biases, unit norms. With
    SCALE_RESIDUAL (GPT-2's pre-LN stack), the projections that write into the residual stream get
    std 0.02 / sqrt(2 * n_layer) so that its variance does not grow with depth."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            std = 0.02 / (2 * n_layer) ** 0.5 if scale_residual and name.endswith("c_proj") else 0.02
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, mean=0.0, std=0.02)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
