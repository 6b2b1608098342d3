"""Building blocks shared by every architecture: one attention computation (`attend`: causal,
bidirectional or cross, with the KV cache), GPT-2's attention and MLP modules, the modern decoder's
grouped-query attention with rotary positions and its gated (SwiGLU) MLP, and the preallocated KV
cache used for decoding.

Legend: B batch, T query positions, S key positions, C channels (d_model), H query heads,
G key/value heads, D head dim, F feed-forward width, V vocabulary.
Parameter names follow GPT-2 (c_attn, c_proj, c_fc; q_attn for cross attention) and Hugging Face's
Llama (q_proj, k_proj, v_proj, o_proj; gate_proj, up_proj, down_proj) so that pretrained weights
map onto them one for one.
"""

from __future__ import annotations

import math

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

    def visible(self) -> torch.Tensor | None:
        """(B, T, S) True at the keys each new query may see, when rows differ (SlotCache); None: all rows alike."""
        return None


class SlotCache(KVCache):
    """A KVCache whose rows are at positions of their own: continuous batching, where each row is a
    request that joined when it came (a prompt prefilled alone, then load()-ed into a free slot)
    and leaves when it is done. The first `active` slots decode together, one token each per step;
    `length` is their positions (active,), not one number.
    """

    def __init__(self, slots: int, n_head: int, head_dim: int, max_len: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(slots, n_head, head_dim, max_len, device, dtype)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.active = 0
        self.span, self.new = 0, 0  # of the last append: positions in use, positions it added

    @property
    def length(self) -> torch.Tensor:  # type: ignore[override]
        return self.lengths[:self.active]

    @length.setter
    def length(self, value: int) -> None:  # KVCache.__init__ sets 0
        pass

    def load(self, slot: int, cache: KVCache, row: int = 0) -> None:
        """Put row ROW of a prefilled CACHE (the same heads and width) into SLOT."""
        n = cache.length
        self.k[slot, :, :n] = cache.k[row, :, :n]
        self.v[slot, :, :n] = cache.v[row, :, :n]
        self.lengths[slot] = n

    def move(self, source: int, target: int) -> None:
        """Slot SOURCE becomes slot TARGET (keeping the active slots the first ones)."""
        n = int(self.lengths[source])
        self.k[target, :, :n] = self.k[source, :, :n]
        self.v[target, :, :n] = self.v[source, :, :n]
        self.lengths[target] = n

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store T new positions (active, G, T, D) per active row at its own place (one token each
        while serving, a few while speculative decoding scores a draft's proposals); return the
        positions in use (active, G, S, D), S the longest row's length: visible() says which of
        them each query sees."""
        n, T = self.active, k.size(2)
        if k.size(0) != n:
            raise ValueError(f"a SlotCache decodes its {n} active rows, got {k.size(0)}")
        if bool((self.lengths[:n] + T > self.max_len).any()):
            raise ValueError(f"KV cache holds {self.max_len} positions; a row would need more")
        rows = torch.arange(n, device=k.device)[:, None]  # (n, 1)
        places = self.lengths[:n, None] + torch.arange(T, device=k.device)  # (n, T)
        # rows and places are split by the head slice, so the indexed dims come first: (n, T, G, D)
        self.k[rows, :, places] = k.transpose(1, 2)
        self.v[rows, :, places] = v.transpose(1, 2)
        self.lengths[:n] += T
        self.new = T
        self.span = int(self.lengths[:n].max())  # the positions any active row uses: attention stops there
        return self.k[:n, :, :self.span], self.v[:n, :, :self.span]

    def visible(self) -> torch.Tensor:
        """(active, T, S): query t of a row (the T positions just appended) sees that row's keys up to itself."""
        span = torch.arange(self.span, device=self.k.device)
        ends = self.lengths[:self.active, None] - self.new + 1 + torch.arange(self.new, device=self.k.device)  # (n, T)
        return span[None, None, :] < ends[:, :, None]


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
        self.stacked_matrices = {"c_attn": 2 if cross else 3}  # Muon orthogonalises each on its own (lmkit.optim)
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
        y = attend(q, k, v, causal=self.causal, pad_mask=pad_mask, cache=cache,
                   dropout=self.dropout if self.training else 0.0)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, H, T, D) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, pad_mask: torch.Tensor | None = None,
           cache: KVCache | None = None, dropout: float = 0.0) -> torch.Tensor:
    """The one attention computation of every model: softmax(q k^T / sqrt(D)) v through torch's
    scaled_dot_product_attention, with the causal and padding masks and the KV cache.

    Args:
        q: (B, H, T, D) queries; k, v: (B, G, S, D) keys and values of the new positions (or the
            whole context). G divides H: with G < H each key/value head serves H / G query heads
            (grouped-query attention); the cache holds G heads.
        causal: position t (absolute: past + t) sees keys <= t only.
        pad_mask: (B, S) bool, True at real key positions. A query that can see no key at all
            would give NaN, so pad on the right for causal models.
        cache: keys/values of earlier positions (self-attention only); the new ones are added.

    Returns:
        (B, H, T, D)
    """
    T = q.size(2)
    past = 0
    if cache is not None:
        past = cache.length
        k, v = cache.append(k, v)  # (B, G, past + T, D)
        if (rows_visible := cache.visible()) is not None:  # rows at positions of their own: the mask is theirs
            return F.scaled_dot_product_attention(q, k, v, attn_mask=rows_visible[:, None], dropout_p=dropout,
                                                  enable_gqa=k.size(1) != q.size(1))
    mask = _mask(causal, T, k.size(2), past, pad_mask, q.device)
    # With no padding and no cached prefix, is_causal lets torch pick its fastest kernel.
    plain_causal = causal and mask is None and past == 0 and T > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=plain_causal, dropout_p=dropout,
                                          enable_gqa=k.size(1) != q.size(1))


def _mask(causal: bool, T: int, S: int, past: int, pad_mask: torch.Tensor | None,
          device: torch.device) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, S) mask, True where attention is allowed; None when nothing is hidden."""
    needs_causal_mask = causal and past > 0 and T > 1
    if pad_mask is None and not needs_causal_mask:
        return None
    mask = torch.ones(1, 1, T, S, dtype=torch.bool, device=device)
    if causal:
        mask = mask.tril(diagonal=past)  # query t (absolute position past + t) sees keys <= past + t
    if pad_mask is not None:
        mask = mask & pad_mask[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
    return mask


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class MLP(nn.Module):
    """Position-wise feed-forward: (B, T, C) -> (B, T, F) -> (B, T, C)."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d_model, d_ff, bias=bias)
        self.c_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.act = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class RMSNorm(nn.Module):
    """x / rms(x) * weight, rms over the last dimension, computed in float32 (as Llama does).

    torch's nn.RMSNorm is a chain of small kernels on CPU, 5-10x slower than LayerNorm there (the
    model's norms cost more than its attention); this one has a hand-written backward, 3-5x faster,
    with the same forward to the bit. On GPUs torch's fused kernel is used.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).to(x.dtype)
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor,
                eps: float) -> torch.Tensor:
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))  # (..., 1)
        normed = xf * r
        ctx.save_for_backward(normed, r, weight)
        ctx.input_dtype = x.dtype
        return (normed * weight).to(x.dtype)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        normed, r, weight = ctx.saved_tensors
        grad = grad.float()
        scaled = grad * weight
        # d(x * r)/dx with r = mean(x^2)^-1/2: r * (g - x_hat * mean(g * x_hat)), g the incoming gradient times weight
        grad_x = r * (scaled - normed * (scaled * normed).mean(-1, keepdim=True))
        grad_weight = (grad * normed).flatten(0, -2).sum(0)
        return grad_x.to(ctx.input_dtype), grad_weight.to(weight.dtype), None


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (RoFormer; Llama's rotate-half layout): channel pairs (i, i + D/2)
    of each query and key head are rotated by angle position * inv_freq[i], so that q . k depends
    on the two positions only through their difference. No weights: inv_freq is a buffer that is
    not saved (as in Hugging Face's Llama).

    Llama-3 scaling (rope_scaling="llama3") stretches the low frequencies by rope_factor for
    contexts longer than rope_original_max_len, and blends the middle band smoothly.
    """

    def __init__(self, head_dim: int, theta: float, scaling: str = "none", factor: float = 1.0,
                 low_freq_factor: float = 1.0, high_freq_factor: float = 4.0, original_max_len: int = 8192) -> None:
        super().__init__()
        # Computed as transformers does (int64 arange, then float), so imported models agree to the bit.
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))  # (D/2,)
        if scaling == "llama3":
            low_freq_wavelen = original_max_len / low_freq_factor
            high_freq_wavelen = original_max_len / high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
            smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
            inv_freq = torch.where(medium, smoothed, scaled)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, start: int | torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (T, D) for positions start .. start + length - 1, in float32 then DTYPE; for
        START (B,), one start per row (SlotCache), (B, 1, T, D)."""
        positions = positions_from(start, length, self.inv_freq.device).float()  # (T,) or (B, T)
        freqs = positions[..., None] * self.inv_freq.float()  # (..., T, D/2)
        angles = torch.cat([freqs, freqs], dim=-1)  # (..., T, D): the same angle for channels i and i + D/2
        if angles.dim() == 3:
            angles = angles[:, None]  # (B, T, D) -> (B, 1, T, D): the same for every head
        return angles.cos().to(dtype), angles.sin().to(dtype)


def positions_from(start: int | torch.Tensor, length: int, device: torch.device) -> torch.Tensor:
    """Positions start .. start + length - 1: (T,) for an int START, (B, T) for one start per row."""
    steps = torch.arange(length, device=device)
    return steps + start if isinstance(start, int) else start.to(device)[:, None] + steps[None, :]


def last_position(start: int | torch.Tensor, length: int) -> int:
    """The furthest position start + length - 1 reaches (of any row)."""
    furthest = start if isinstance(start, int) else (int(start.max()) if start.numel() else 0)
    return furthest + length - 1


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by the angles of cos/sin (T, D): x * cos + rotate_half(x) * sin."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (x1, x2) -> (-x2, x1)
    return x * cos + rotated * sin


class GroupedQueryAttention(nn.Module):
    """Causal self-attention of the modern decoder: separate q/k/v projections to H query heads and
    G key/value heads of width D (G divides H; G == H is multi-head, G == 1 multi-query), rotary
    positions on q and k, optional RMSNorm of each q and k head (QK-norm, as Qwen3 and nanochat),
    optional q/k/v biases (Qwen2). Names are Hugging Face Llama's (q_proj ... o_proj)."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, head_dim: int, *, qkv_bias: bool = False,
                 bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-5, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim, self.dropout = n_head, n_kv_head, head_dim, dropout
        self.q_proj = nn.Linear(d_model, n_head * head_dim, bias=qkv_bias or bias)
        self.k_proj = nn.Linear(d_model, n_kv_head * head_dim, bias=qkv_bias or bias)
        self.v_proj = nn.Linear(d_model, n_kv_head * head_dim, bias=qkv_bias or bias)
        self.o_proj = nn.Linear(n_head * head_dim, d_model, bias=bias)
        self.q_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None = None,
                pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C), cos/sin (T, D) of its positions -> (B, T, C)."""
        B, T, _ = x.shape
        H, G, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, T, H*D) -> (B, H, T, D)
        k = self.k_proj(x).view(B, T, G, D).transpose(1, 2)  # (B, T, G*D) -> (B, G, T, D)
        v = self.v_proj(x).view(B, T, G, D).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = attend(q, k, v, causal=True, pad_mask=pad_mask, cache=cache,
                   dropout=self.dropout if self.training else 0.0)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, H, T, D) -> (B, T, H*D)
        return self.resid_dropout(self.o_proj(y))


class GatedMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(act(gate(x)) * up(x)); (B, T, C) -> (B, T, F) -> (B, T, C).
    With activation silu this is Llama's MLP; gelu_tanh gives GeGLU."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str = "silu", bias: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.act = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)))


def run_block(block: nn.Module, recompute: bool, *args: object) -> torch.Tensor:
    """block(*args); with RECOMPUTE (gradient checkpointing, train.grad_checkpoint), the block's
    activations are not kept for backward but computed again there: activation memory per layer
    drops to its input, for about a third more compute. The RNG state is replayed, so dropout masks
    and results are the same as without."""
    if recompute and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


RESIDUAL_PROJECTIONS = ("c_proj", "o_proj", "down_proj")  # the layers that write into the residual stream


def init_weights(module: nn.Module, n_layer: int, scale_residual: bool = True) -> None:
    """GPT-2 / BERT initialisation: N(0, 0.02) weights, zero biases, unit norms. With
    SCALE_RESIDUAL (pre-norm stacks), the projections that write into the residual stream get
    std 0.02 / sqrt(2 * n_layer) so that its variance does not grow with depth."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            scaled = scale_residual and name.endswith(RESIDUAL_PROJECTIONS)
            std = 0.02 / (2 * n_layer) ** 0.5 if scaled else 0.02
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, mean=0.0, std=0.02)
        elif isinstance(sub, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(sub.weight)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)


def mean_over_tokens(hidden: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C) states, (B, T) mask of real tokens -> (B, C): the mean state of each row's real tokens."""
    weights = pad_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
