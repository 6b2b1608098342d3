"""GPT: a decoder-only Transformer trained to predict the next token (causal language model).

Pre-LayerNorm blocks, learned absolute positions, GELU MLP, output layer tied to the token
embeddings. Module names are GPT-2's (transformer.wte, transformer.h.0.attn.c_attn, ...), so
GPT-2 checkpoints map onto it name for name (its Conv1D weights transposed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmkit.batches import ClassifyBatch, LMBatch
from lmkit.config import ModelConfig
from lmkit.errors import CheckpointError
from lmkit.models import causal
from lmkit.models.arch import Arch, HFMapping, require_options
from lmkit.models.layers import MLP, Attention, KVCache, init_weights, last_position, positions_from, run_block


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


class GPT(causal.CausalLM):
    """GPT-2: embeddings + positions -> blocks -> LayerNorm (hidden_states); forward and the
    classifier's summary are causal.CausalLM's."""

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
        past = cache[0].length if cache else 0  # an int, or one per row (SlotCache)
        T = idx.size(1)
        if last_position(past, T) >= self.config.max_seq_len:
            raise ValueError(f"sequence of {last_position(past, T) + 1} tokens exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        pos = positions_from(past, T, idx.device)  # (T,) or (B, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = run_block(block, self.grad_checkpoint and self.training, x, cache[i] if cache else None)
        return self.transformer.ln_f(x)

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype = torch.float32,
                  length: int | None = None) -> list[KVCache]:
        """One cache per layer for LENGTH positions (default: the whole context)."""
        cfg = self.config
        return [KVCache(batch, cfg.n_head, cfg.d_model // cfg.n_head, length or cfg.max_seq_len, device, dtype)
                for _ in range(cfg.n_layer)]


# --- Hugging Face GPT-2 -------------------------------------------------------------------------
# lmkit's GPT is GPT-2 name for name, except that GPT-2 stores its projections as Conv1D, (in, out),
# where lmkit has nn.Linear, (out, in).

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# GPT-2 activations lmkit has: gelu_new and gelu_pytorch_tanh are the tanh approximation.
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def config_from_hf(config: dict[str, Any]) -> ModelConfig:
    require_options(config, {"scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
                             "tie_word_embeddings": True})
    activation = config.get("activation_function", "gelu_new")
    if activation not in _ACTIVATIONS:
        raise CheckpointError(f"GPT-2 activation_function {activation!r} is not supported ({', '.join(_ACTIVATIONS)})")
    n_embd = config["n_embd"]
    return ModelConfig(arch="gpt", vocab_size=config["vocab_size"], d_model=n_embd, n_layer=config["n_layer"],
                       n_head=config["n_head"], d_ff=config.get("n_inner") or 4 * n_embd,
                       max_seq_len=config["n_positions"], dropout=float(config.get("resid_pdrop", 0.0)),
                       activation=_ACTIVATIONS[activation], norm_eps=float(config.get("layer_norm_epsilon", 1e-5)))


def weights_from_hf(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2 (GPT2LMHeadModel, or GPT2Model without the 'transformer.' prefix) -> lmkit's GPT."""
    out = {}
    for name, tensor in hf.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
            continue
        ours = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        out[ours] = tensor.t().contiguous() if ours.endswith(_CONV1D) else tensor
    return out


def export_hf(cfg: ModelConfig, state: dict[str, torch.Tensor], labels: list[str],
              imported: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A GPT language model as GPT2LMHeadModel (config.json, weights)."""
    activation = {"gelu_tanh": "gelu_new", "gelu": "gelu"}.get(cfg.activation)
    if labels or activation is None or not (cfg.bias and cfg.tie_embeddings):
        kind = "classifier" if labels else "model"
        raise CheckpointError(f"GPT-2 has no counterpart of a gpt {kind} with activation {cfg.activation}, "
                              f"bias={cfg.bias}, tie_embeddings={cfg.tie_embeddings}; lmkit exports GPT language "
                              "models in GPT-2's layout")
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
              "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
              "n_inner": cfg.ff_dim, "activation_function": activation, "resid_pdrop": cfg.dropout,
              "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "layer_norm_epsilon": cfg.norm_eps,
              "tie_word_embeddings": True}
    weights = {name: tensor.t() if name.endswith(_CONV1D) else tensor for name, tensor in state.items()
               if name != "lm_head.weight"}  # tied to transformer.wte.weight
    return config, weights


def train_flops(cfg: ModelConfig, batch: LMBatch | ClassifyBatch) -> float:
    """A block's projections: q, k, v and the output (4 d^2) and the MLP (2 d ff); attention d wide."""
    d = cfg.d_model
    return causal.train_flops(cfg, batch, 4 * d * d + 2 * d * cfg.ff_dim, d)


ARCH = Arch(
    name="gpt",
    summary="GPT-2 layout: learned positions, LayerNorm, GELU MLP (for GPT-2 interop)",
    model=GPT,
    objectives=("causal-lm",),
    pretraining=causal.pretraining,
    distillation=causal.DISTILLATION,
    tasks=("chat", "classify", "dpo", "instruct", "lm"),
    decoding="continue",
    evaluation="text",
    train_flops=train_flops,
    pair_layout=causal.pair_layout,
    lora_targets={"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")},
    hf=HFMapping(model_types=("gpt2",), config_in=config_from_hf, weights_in=weights_from_hf,
                 may_lack=lambda config: {"lm_head.weight"}, export=export_hf,
                 special_ids=lambda tok: {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id},
                 tokenizer_class="GPT2TokenizerFast"),
)
