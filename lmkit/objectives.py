"""Training objectives. Each takes model outputs and targets and returns a scalar loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # target id that contributes nothing to a loss (context, padding, prompt tokens)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against the next tokens (B, T), in nats.

    Computed in float32 even under bf16 autocast: the log-softmax over a large vocabulary is where
    low precision hurts.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction=reduction)
