"""Training objectives: losses on model outputs, and the validation metrics that go with them.

A loss function takes (model, batch) and returns the SUMMED losses of its terms, a (K,) tensor
(K = 1, or MLM and NSP for BERT), to be divided by the units of the whole global batch
(batch.loss_units(), added up over micro-batches and ranks): a mean of per-micro-batch means would
weigh a token of a sparse micro-batch more than one of a dense one. The training loop knows
nothing else about it. Batches are the named tuples of lmkit.batches, made by lmkit.data and lmkit.finetune_data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmkit.batches import IGNORE, Batch, ClassifyBatch, LMBatch, MaskedLMBatch, Seq2SeqBatch
from lmkit.metrics import accuracy_and_macro_f1

__all__ = ["IGNORE", "Batch"]  # re-exported: most modules take them from here

LossFn = Callable[[nn.Module, Batch], torch.Tensor]  # (K,) summed losses, one per term of batch.loss_units()
MetricsFn = Callable[[nn.Module, Sequence[Batch]], dict[str, float]]  # validation metrics, "val_loss" among them


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against the next tokens (B, T), in nats.

    Computed in float32 even under bf16 autocast: the log-softmax over a large vocabulary is where
    low precision hurts.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction=reduction)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (N, K) against labels (N,), in float32."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)


def causal_lm_loss(model: nn.Module, batch: LMBatch) -> torch.Tensor:
    """Decoders (GPT, llama): (1,) summed next-token loss."""
    return next_token_loss(model(batch.inputs)[0], batch.targets, reduction="sum").reshape(1)


def mlm_nsp_loss(model: nn.Module, batch: MaskedLMBatch) -> torch.Tensor:
    """BERT: (2,) summed MLM loss (over masked tokens) and NSP loss (over pairs)."""
    logits, _ = model(batch.ids, batch.token_types, batch.pad_mask, batch.mlm_labels)
    mlm = F.cross_entropy(logits.mlm.float(), batch.mlm_labels[batch.mlm_labels != IGNORE], reduction="sum")
    return torch.stack([mlm, F.cross_entropy(logits.nsp.float(), batch.nsp_labels, reduction="sum")])


def mean_loss(loss_fn: LossFn, model: nn.Module, batches: Sequence[Batch]) -> float:
    """LOSS_FN over BATCHES as one batch: each term's sum over all of them divided by its units."""
    sums = torch.stack([loss_fn(model, b) for b in batches]).sum(0)
    units = torch.stack([b.loss_units() for b in batches]).sum(0)
    return (sums / units.clamp(min=1)).sum().item()


@torch.no_grad()
def causal_lm_metrics(model: nn.Module, batches: Sequence[LMBatch]) -> dict[str, float]:
    """Next-token loss per scored token over BATCHES (already on the model's device)."""
    return {"val_loss": mean_loss(causal_lm_loss, model, batches)}


@torch.no_grad()
def mlm_nsp_metrics(model: nn.Module, batches: Sequence[MaskedLMBatch]) -> dict[str, float]:
    """Loss, MLM loss and accuracy (over masked tokens) and NSP accuracy (over pairs)."""
    mlm_nats = mlm_hits = mlm_count = nsp_nats = nsp_hits = pairs = 0.0
    for b in batches:
        logits, _ = model(b.ids, b.token_types, b.pad_mask, b.mlm_labels, b.nsp_labels)
        labels, nsp_labels = b.mlm_labels[b.mlm_labels != IGNORE], b.nsp_labels
        mlm_nats += F.cross_entropy(logits.mlm.float(), labels, reduction="sum").item()
        mlm_hits += (logits.mlm.argmax(-1) == labels).sum().item()
        mlm_count += labels.numel()
        nsp_nats += F.cross_entropy(logits.nsp.float(), nsp_labels, reduction="sum").item()
        nsp_hits += (logits.nsp.argmax(-1) == nsp_labels).sum().item()
        pairs += nsp_labels.numel()
    mlm_loss, nsp_loss = mlm_nats / mlm_count, nsp_nats / pairs
    return {"val_loss": mlm_loss + nsp_loss, "val_mlm_loss": mlm_loss, "val_mlm_accuracy": mlm_hits / mlm_count,
            "val_nsp_accuracy": nsp_hits / pairs}


def seq2seq_loss(model: nn.Module, batch: Seq2SeqBatch) -> torch.Tensor:
    """Encoder-decoder: (1,) summed loss of the target tokens, teacher forced."""
    return next_token_loss(model(batch.src, batch.src_pad, batch.tgt_in)[0], batch.targets, reduction="sum").reshape(1)


@torch.no_grad()
def seq2seq_metrics(model: nn.Module, batches: Sequence[Seq2SeqBatch]) -> dict[str, float]:
    """Mean loss per target token, and the share of target tokens predicted exactly (teacher forced)."""
    nats = hits = count = 0.0
    for b in batches:
        logits, _ = model(b.src, b.src_pad, b.tgt_in)
        targets = b.targets
        scored = targets != IGNORE
        nats += next_token_loss(logits, targets, reduction="sum").item()
        hits += (logits.argmax(-1)[scored] == targets[scored]).sum().item()
        count += scored.sum().item()
    return {"val_loss": nats / count, "val_token_accuracy": hits / count}


def classify_loss(model: nn.Module, batch: ClassifyBatch) -> torch.Tensor:
    """Sequence classification: (1,) summed cross-entropy of the labels."""
    logits, _ = model(batch.ids, batch.token_types, batch.pad_mask)
    return F.cross_entropy(logits.float(), batch.labels, ignore_index=IGNORE, reduction="sum").reshape(1)


@torch.no_grad()
def classify_metrics(model: nn.Module, batches: Sequence[ClassifyBatch]) -> dict[str, float]:
    """Loss, accuracy and macro-F1 over BATCHES."""
    nats, truth, predicted = 0.0, [], []
    for b in batches:
        logits, _ = model(b.ids, b.token_types, b.pad_mask)
        labels = b.labels
        nats += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        truth += labels.tolist()
        predicted += logits.argmax(-1).tolist()
    accuracy, macro_f1 = accuracy_and_macro_f1(truth, predicted, model.head.out_features)
    return {"val_loss": nats / len(truth), "val_accuracy": accuracy, "val_macro_f1": macro_f1}
