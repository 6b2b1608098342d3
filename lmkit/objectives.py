"""Training objectives: losses on model outputs, and the validation metrics that go with them.

A loss function takes (model, batch) and returns a scalar; the training loop knows nothing else
about it. Batches are tuples of tensors, laid out by lmkit.data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmkit.metrics import accuracy_and_macro_f1

IGNORE = -100  # target id that contributes nothing to a loss (context, padding, unmasked tokens)

Batch = tuple[torch.Tensor, ...]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against the next tokens (B, T), in nats.

    Computed in float32 even under bf16 autocast: the log-softmax over a large vocabulary is where
    low precision hurts.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction=reduction)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (N, K) against labels (N,), in float32."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """GPT: batch = (inputs (B, T), next tokens (B, T))."""
    inputs, targets = batch
    return model(inputs, targets)[1]


def mlm_nsp_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """BERT: batch = (ids, token types, pad mask, MLM labels (B, T), NSP labels (B,)); MLM + NSP."""
    return model(*batch)[1]


@torch.no_grad()
def causal_lm_metrics(model: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
    """Mean next-token loss over BATCHES (already on the model's device)."""
    return {"val_loss": sum(causal_lm_loss(model, b).item() for b in batches) / len(batches)}


@torch.no_grad()
def mlm_nsp_metrics(model: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
    """Loss, MLM loss and accuracy (over masked tokens) and NSP accuracy (over pairs)."""
    mlm_nats = mlm_hits = mlm_count = nsp_nats = nsp_hits = pairs = 0.0
    for ids, types, pad, mlm_labels, nsp_labels in batches:
        logits, _ = model(ids, types, pad, mlm_labels, nsp_labels)
        labels = mlm_labels[mlm_labels != IGNORE]
        mlm_nats += F.cross_entropy(logits.mlm.float(), labels, reduction="sum").item()
        mlm_hits += (logits.mlm.argmax(-1) == labels).sum().item()
        mlm_count += labels.numel()
        nsp_nats += F.cross_entropy(logits.nsp.float(), nsp_labels, reduction="sum").item()
        nsp_hits += (logits.nsp.argmax(-1) == nsp_labels).sum().item()
        pairs += nsp_labels.numel()
    mlm_loss, nsp_loss = mlm_nats / mlm_count, nsp_nats / pairs
    return {"val_loss": mlm_loss + nsp_loss, "val_mlm_loss": mlm_loss, "val_mlm_accuracy": mlm_hits / mlm_count,
            "val_nsp_accuracy": nsp_hits / pairs}


def seq2seq_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Encoder-decoder: batch = (source, source pad mask, decoder inputs, targets), as data.seq2seq_batch."""
    return model(*batch)[1]


@torch.no_grad()
def seq2seq_metrics(model: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
    """Mean loss per target token, and the share of target tokens predicted exactly (teacher forced)."""
    nats = hits = count = 0.0
    for src, src_pad, tgt_in, targets in batches:
        logits, _ = model(src, src_pad, tgt_in)
        scored = targets != IGNORE
        nats += next_token_loss(logits, targets, reduction="sum").item()
        hits += (logits.argmax(-1)[scored] == targets[scored]).sum().item()
        count += scored.sum().item()
    return {"val_loss": nats / count, "val_token_accuracy": hits / count}


def classify_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Sequence classification: batch = (ids, token types, pad mask, labels (B,))."""
    return model(*batch)[1]


@torch.no_grad()
def classify_metrics(model: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
    """Loss, accuracy and macro-F1 over BATCHES."""
    nats, truth, predicted = 0.0, [], []
    for ids, types, pad, labels in batches:
        logits, _ = model(ids, types, pad)
        nats += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        truth += labels.tolist()
        predicted += logits.argmax(-1).tolist()
    accuracy, macro_f1 = accuracy_and_macro_f1(truth, predicted, model.head.out_features)
    return {"val_loss": nats / len(truth), "val_accuracy": accuracy, "val_macro_f1": macro_f1}
