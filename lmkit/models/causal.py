"""What the decoder-only architectures (GPT and llama) share: causal-LM pretraining on random
windows, what distillation compares, and how a classifier reads a text (at its last token)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lmkit import data, objectives
from lmkit.batches import IGNORE, ClassifyBatch, LMBatch
from lmkit.config import ModelConfig, RunConfig
from lmkit.finetune_data import PairLayout
from lmkit.models import flops
from lmkit.models.arch import Distillation, Pretraining, Scored
from lmkit.models.layers import mean_over_tokens
from lmkit.tokenizer import Tokenizer


def pretraining(cfg: RunConfig, train: np.ndarray, val: np.ndarray, tokenizer: Tokenizer) -> Pretraining:
    """Next-token prediction on random windows of max_seq_len tokens; validation on fixed windows."""
    tcfg, seq_len = cfg.train, cfg.model.max_seq_len
    return Pretraining(data.LMWindows(train, seq_len, tcfg.batch_size, seed=tcfg.seed),
                       data.eval_batches(val, seq_len, tcfg.batch_size, tcfg.eval_batches),
                       objectives.causal_lm_loss, objectives.causal_lm_metrics, tcfg.batch_size * seq_len)


def scored(model: nn.Module, batch: LMBatch) -> Scored:
    """Logits and final hidden states at every position that has a target."""
    hidden = model.hidden_states(batch.inputs)  # (B, T, C)
    chosen = batch.targets != IGNORE
    return Scored(model.lm_head(hidden[chosen]), batch.targets[chosen], hidden[chosen])


# The soft targets lead and the hard labels keep the student honest.
DISTILLATION = Distillation(scored, {"soft_weight": 1.0, "hard_weight": 0.5, "cosine_weight": 0.0}, "val_loss")


def train_flops(cfg: ModelConfig, batch: LMBatch | ClassifyBatch, block_weights: int, width: int) -> float:
    """Training FLOPs of a decoder on BATCH, given the projection weights of one block and its
    attention WIDTH (heads x head size): the blocks and the output layer up to each row's last
    target; a classifier reads the blocks' states only (its own head, d_model x labels once per
    text, is left out)."""
    if isinstance(batch, ClassifyBatch):
        lengths, head = batch.pad_mask.sum(dim=1), 0
    else:
        lengths, head = flops.scored_lengths(batch.targets), cfg.d_model * cfg.vocab_size
    forward = flops.stack(cfg.n_layer, lengths, block_weights, width) + flops.matmul(int(lengths.sum()), head)
    return flops.TRAINING * forward


def pair_layout(tokenizer: Tokenizer) -> PairLayout:
    """a (EOS b) EOS: a classifier reads the last EOS, the one position that has seen the whole text."""
    return PairLayout([], [tokenizer.eos_id], [tokenizer.eos_id])


class CausalLM(nn.Module):
    """What a decoder-only model (GPT, llama) does on top of its own hidden_states(idx, cache) and
    lm_head: next-token logits and loss, and the state a classifier reads."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: list | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for IDX (B, T); with TARGETS (B, T) also the mean next-token loss over
        the positions whose target is not objectives.IGNORE. With CACHE (a list of KVCache), IDX
        continues the cached positions."""
        logits = self.lm_head(self.hidden_states(idx, cache))  # (B, T, C) -> (B, T, V)
        loss = objectives.next_token_loss(logits, targets) if targets is not None else None
        return logits, loss

    def sequence_summary(self, idx: torch.Tensor, token_types: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids, (B, T) mask of real tokens (padding on the right) -> (B, C) at each row's last
        real token, or with config.pooling "mean" the mean over its real tokens. Causal attention:
        right padding never reaches the real positions, so no mask."""
        hidden = self.hidden_states(idx)  # (B, T, C)
        if self.config.pooling == "mean":
            return mean_over_tokens(hidden, pad_mask)
        last = pad_mask.sum(dim=1) - 1  # (B,)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
