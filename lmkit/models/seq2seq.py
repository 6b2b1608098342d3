"""The encoder-decoder Transformer (seed §3.1): an encoder reads the source, a decoder writes the
target one token at a time, attending to its own past (masked self-attention) and to the encoder's
output (cross attention).

Pre-LayerNorm blocks as in GPT (the 2017 Transformer put the norms after each sublayer; before
them, it trains stably without a long warmup, as T5 and most later models found); learned
positions, one table per side; one token embedding shared by the encoder, the decoder and the
output layer (tied), as in the original and in T5/BART.

Decoding computes the encoder output and each layer's cross-attention keys/values once per input
(DecoderState), and keeps the decoder's self-attention keys/values in a preallocated KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lmkit import data, objectives
from lmkit.batches import IGNORE, Seq2SeqBatch
from lmkit.config import ModelConfig, RunConfig
from lmkit.models import flops
from lmkit.models.arch import Arch, Distillation, Pretraining, Scored
from lmkit.models.gpt import Block as EncoderBlock
from lmkit.models.layers import MLP, Attention, KVCache, init_weights, run_block
from lmkit.tokenizer import Tokenizer


class DecoderBlock(nn.Module):
    """x -> x + attn(ln_1(x)) -> x + cross_attn(ln_2(x), memory) -> x + mlp(ln_3(x)); (B, T, C)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = Attention(cfg.d_model, cfg.n_head, causal=True, dropout=cfg.dropout, bias=cfg.bias)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.cross_attn = Attention(cfg.d_model, cfg.n_head, causal=False, cross=True, dropout=cfg.dropout,
                                    bias=cfg.bias)
        self.ln_3 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg.d_model, cfg.ff_dim, activation=cfg.activation, dropout=cfg.dropout, bias=cfg.bias)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                src_pad: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache=cache)
        x = x + self.cross_attn(self.ln_2(x), context=memory, pad_mask=src_pad)
        return x + self.mlp(self.ln_3(x))


@dataclass
class DecoderState:
    """What decoding keeps per input row: the source padding mask (N, S), every layer's
    cross-attention keys/values (N, H, S, D), and the self-attention KV caches."""

    src_pad: torch.Tensor
    memory_kv: list[tuple[torch.Tensor, torch.Tensor]]
    cache: list[KVCache]

    @property
    def length(self) -> int:
        """Decoder positions written so far."""
        return self.cache[0].length

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i continues row rows[i] (beam search). Beams of one input share its source, and
        beams only ever continue beams of their own input, so only the self-attention caches move."""
        for layer in self.cache:
            layer.reorder(rows)


class Seq2Seq(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.grad_checkpoint = False  # set by the training loop from train.grad_checkpoint
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)  # shared: encoder, decoder, output layer
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleDict(dict(
            wpe=nn.Embedding(cfg.max_seq_len, cfg.d_model),
            h=nn.ModuleList(EncoderBlock(cfg, causal=False) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias),
        ))
        self.decoder = nn.ModuleDict(dict(
            wpe=nn.Embedding(cfg.max_seq_len, cfg.d_model),
            h=nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        init_weights(self, 2 * cfg.n_layer)  # both stacks write into residual streams

    def _embed(self, idx: torch.Tensor, wpe: nn.Embedding, past: int = 0) -> torch.Tensor:
        T = idx.size(1)
        if past + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        pos = torch.arange(past, past + T, device=idx.device)  # (T,)
        return self.drop(self.wte(idx) + wpe(pos))  # (B, T, C)

    def encode(self, src: torch.Tensor, src_pad: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids (B, S), padding mask (B, S) True at real tokens -> encoder output (B, S, C)."""
        x = self._embed(src, self.encoder.wpe)
        recompute = self.grad_checkpoint and self.training
        for block in self.encoder.h:
            x = run_block(block, recompute, x, None, src_pad)
        return self.encoder.ln_f(x)

    def decode(self, idx: torch.Tensor, memory: torch.Tensor | DecoderState,
               src_pad: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) for decoder inputs IDX (B, T), given the encoder output MEMORY (B, S, C)
        (training: all positions at once), or a DecoderState (decoding: IDX continues its cache)."""
        past = memory.length if isinstance(memory, DecoderState) else 0
        x = self._embed(idx, self.decoder.wpe, past)
        for i, block in enumerate(self.decoder.h):
            if isinstance(memory, DecoderState):
                x = block(x, memory.memory_kv[i], memory.src_pad, memory.cache[i])
            else:
                x = run_block(block, self.grad_checkpoint and self.training, x, memory, src_pad)
        return self.lm_head(self.decoder.ln_f(x))  # (B, T, C) -> (B, T, V)

    def forward(self, src: torch.Tensor, src_pad: torch.Tensor, tgt_in: torch.Tensor,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: logits (B, T, V) for decoder inputs TGT_IN (B, T) (the target shifted
        right behind a start token); with TARGETS (B, T) also their mean cross-entropy."""
        logits = self.decode(tgt_in, self.encode(src, src_pad), src_pad)
        loss = objectives.next_token_loss(logits, targets) if targets is not None else None
        return logits, loss

    def start_decoding(self, src: torch.Tensor, src_pad: torch.Tensor, repeat: int = 1,
                       dtype: torch.dtype = torch.float32) -> DecoderState:
        """Encode SRC (B, S) once and set up decoding for B * REPEAT rows (REPEAT beams or samples
        per input, consecutive)."""
        memory = self.encode(src, src_pad).repeat_interleave(repeat, dim=0)  # (B * R, S, C)
        src_pad = src_pad.repeat_interleave(repeat, dim=0)
        cfg, rows = self.config, memory.size(0)
        memory_kv = [tuple(t.to(dtype) for t in block.cross_attn.context_kv(memory)) for block in self.decoder.h]
        cache = [KVCache(rows, cfg.n_head, cfg.d_model // cfg.n_head, cfg.max_seq_len, src.device, dtype)
                 for _ in range(cfg.n_layer)]
        return DecoderState(src_pad, memory_kv, cache)


def pretraining(cfg: RunConfig, train: np.ndarray, val: np.ndarray, tokenizer: Tokenizer) -> Pretraining:
    """Text infilling (BART): spans of the text hidden behind one [MASK] each, the whole text the target."""
    tcfg, seq_len = cfg.train, cfg.model.max_seq_len

    def spans(tokens: np.ndarray, seed: int) -> data.DenoisingSpans:
        return data.DenoisingSpans(tokens, seq_len, tcfg.batch_size, seed, tokenizer, cfg.data.mask_prob)

    val_batches = spans(val, tcfg.seed + 1).fixed_batches(tcfg.eval_batches)
    # Texts vary in length: count the target tokens of an average (validation) batch.
    target_tokens = sum(b.size for b in val_batches) // len(val_batches)
    return Pretraining(spans(train, tcfg.seed), val_batches, objectives.seq2seq_loss, objectives.seq2seq_metrics,
                       target_tokens)


def scored(model: Seq2Seq, batch: Seq2SeqBatch) -> Scored:
    """Decoder logits at the target tokens (teacher forced); hidden states are not compared."""
    chosen = batch.targets != IGNORE
    logits = model(batch.src, batch.src_pad, batch.tgt_in)[0]
    return Scored(logits[chosen], batch.targets[chosen], None)


def train_flops(cfg: ModelConfig, batch: Seq2SeqBatch) -> float:
    """Both stacks over each row's real tokens (S source, T target): the encoder's blocks as GPT's;
    each decoder block's self-attention and MLP as GPT's, plus cross attention: its queries and
    output per target token, its keys and values per source token, every target token with every
    source token; the output layer at the target tokens."""
    d, ff = cfg.d_model, cfg.ff_dim
    src, tgt = batch.src_pad.sum(dim=1), (batch.targets != IGNORE).sum(dim=1)
    encoder = flops.stack(cfg.n_layer, src, 4 * d * d + 2 * d * ff, d)
    decoder = flops.stack(cfg.n_layer, tgt, 6 * d * d + 2 * d * ff, d)
    cross = cfg.n_layer * (flops.matmul(int(src.sum()), 2 * d * d) + flops.attention(int((src * tgt).sum()), d))
    return flops.TRAINING * (encoder + decoder + cross + flops.matmul(int(tgt.sum()), d * cfg.vocab_size))


ARCH = Arch(
    name="seq2seq",
    summary="encoder-decoder (the 2017 Transformer, pre-norm), pretrained by denoising",
    model=Seq2Seq,
    objectives=("denoising (text infilling)",),
    pretraining=pretraining,
    distillation=Distillation(scored, {"soft_weight": 1.0, "hard_weight": 0.5, "cosine_weight": 0.0}, "val_loss",
                              compares_hidden=False),
    tasks=("seq2seq", "lm"),  # lm: more denoising on new text
    decoding="rewrite",
    evaluation="pairs",
    train_flops=train_flops,
    eval_task="seq2seq",
    default_temperature=0.0,  # a rewrite has one right answer more often than not: decode greedily
    lora_targets={"attn": ("attn.c_attn", "attn.q_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")},
)
