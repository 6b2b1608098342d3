"""The batch types: what each objective reads, by name. NamedTuples of tensors, so a batch also
unpacks, moves between devices and splits between ranks as a tuple.

Shapes: B rows, T positions (S source positions for the encoder-decoder).

A batch's loss_units() are what each term of its objective's loss is averaged over (scored
tokens, pairs, examples): a training step divides the summed losses of all its micro-batches, on
all ranks, by their units added up, so the step's loss is the one of the whole global batch
however it is split.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

IGNORE = -100  # target id that contributes nothing to a loss (context, padding, unmasked tokens)


class LMBatch(NamedTuple):
    """Causal language modelling: predict targets[:, t] from inputs[:, :t + 1]."""

    inputs: torch.Tensor  # (B, T) token ids
    targets: torch.Tensor  # (B, T) the next tokens; IGNORE where nothing is learned (prompt, padding)

    @property
    def size(self) -> int:
        """Tokens read, for throughput figures."""
        return self.inputs.numel()

    def loss_units(self) -> torch.Tensor:
        """(1,) the scored targets: what the loss is averaged over."""
        return (self.targets != IGNORE).sum().reshape(1)


class MaskedLMBatch(NamedTuple):
    """BERT pretraining: masked tokens to restore and whether sentence B follows sentence A."""

    ids: torch.Tensor  # (B, T) with [MASK]s and random replacements
    token_types: torch.Tensor  # (B, T) 0 for sentence A, 1 for sentence B
    pad_mask: torch.Tensor  # (B, T) bool, True at real tokens
    mlm_labels: torch.Tensor  # (B, T) the original tokens where chosen, else IGNORE
    nsp_labels: torch.Tensor  # (B,) 0: B follows A, 1: B is random

    @property
    def size(self) -> int:
        return self.ids.numel()

    def loss_units(self) -> torch.Tensor:
        """(2,) masked tokens and pairs: what the MLM and NSP losses are averaged over."""
        return torch.stack([(self.mlm_labels != IGNORE).sum(), torch.tensor(self.nsp_labels.numel(),
                                                                             device=self.nsp_labels.device)])


class ClassifyBatch(NamedTuple):
    """Sequence classification: one label per text (or text pair)."""

    ids: torch.Tensor  # (B, T)
    token_types: torch.Tensor  # (B, T) 0 for the first text, 1 for the second of a pair
    pad_mask: torch.Tensor  # (B, T) bool, True at real tokens (padding is on the right)
    labels: torch.Tensor  # (B,) class indices

    @property
    def size(self) -> int:
        """Examples, for throughput figures."""
        return self.ids.size(0)

    def loss_units(self) -> torch.Tensor:
        """(1,) the labelled examples."""
        return (self.labels != IGNORE).sum().reshape(1)


class Seq2SeqBatch(NamedTuple):
    """Encoder-decoder, teacher forced: the decoder reads tgt_in and predicts targets."""

    src: torch.Tensor  # (B, S) source ids
    src_pad: torch.Tensor  # (B, S) bool, True at real source tokens
    tgt_in: torch.Tensor  # (B, T) EOS + target
    targets: torch.Tensor  # (B, T) target + EOS, IGNORE at padding

    @property
    def size(self) -> int:
        """Target tokens predicted."""
        return int((self.targets != IGNORE).sum())

    def loss_units(self) -> torch.Tensor:
        """(1,) the target tokens."""
        return (self.targets != IGNORE).sum().reshape(1)


Batch = LMBatch | MaskedLMBatch | ClassifyBatch | Seq2SeqBatch


def map_tensors(batch: Batch, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    """A batch of the same type with FN applied to each of its tensors (a plain tuple stays one)."""
    tensors = [fn(t) for t in batch]
    return type(batch)(*tensors) if hasattr(batch, "_fields") else tuple(tensors)


def to_device(batch: Batch, device: torch.device, non_blocking: bool = False) -> Batch:
    """The same batch with every tensor on DEVICE."""
    return map_tensors(batch, lambda t: t.to(device, non_blocking=non_blocking))
