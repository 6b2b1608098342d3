"""Model FLOPs, the numerator of MFU: what the matrix products of a training step compute for the
real tokens of a batch. Each architecture declares its count (Arch.train_flops) from these parts.

Counted as torch.utils.flop_counter counts them and PaLM (appendix B) defines them: 2 FLOPs per
multiply-add, backward twice the forward (the gradients of the inputs and of the weights).
Embedding lookups, norms, activations and the softmax are left out; so is the work spent on
padding (it is waste, not model work, and lowers MFU as it should); attention under a causal mask
is counted whole, every query with every key, as PaLM and the counter count it.
"""

from __future__ import annotations

import torch

from lmkit.batches import IGNORE

TRAINING = 3  # forward + backward, in forwards


def matmul(rows: int | float, weights: int) -> float:
    """Forward FLOPs of ROWS vectors through a weight matrix of WEIGHTS entries."""
    return 2.0 * rows * weights


def attention(pairs: int | float, width: int) -> float:
    """Forward FLOPs of attention over PAIRS (query, key) pairs, WIDTH = heads x head size: the
    scores q.k and the weighted sum of the values."""
    return 4.0 * pairs * width


def stack(n_layer: int, lengths: torch.Tensor, block_weights: int, width: int) -> float:
    """Forward FLOPs of N_LAYER blocks of self-attention (every position with every position of its
    row) over rows of LENGTHS (B,) real tokens, BLOCK_WEIGHTS entries of projections per block."""
    tokens, pairs = int(lengths.sum()), int((lengths * lengths).sum())
    return n_layer * (matmul(tokens, block_weights) + attention(pairs, width))


def scored_lengths(targets: torch.Tensor) -> torch.Tensor:
    """(B, T) next-token targets -> (B,) positions up to each row's last scored target: what a causal
    model must compute (a prompt is read; padding after the last target changes nothing)."""
    positions = torch.arange(1, targets.size(1) + 1)
    return ((targets != IGNORE) * positions).amax(dim=1)
