"""Task heads on top of a pretrained backbone (any architecture with a sequence_summary)."""

from __future__ import annotations

import torch
from torch import nn

from lmkit import objectives
from lmkit.batches import ClassifyBatch
from lmkit.models.arch import Distillation, Scored


class SequenceClassifier(nn.Module):
    """Class logits for whole sequences: a linear layer over one summary state per sequence, the
    one its backbone gives (BERT's pooled [CLS] state, a decoder's last real token)."""

    def __init__(self, backbone: nn.Module, n_labels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.dropout = nn.Dropout(backbone.config.dropout)
        self.head = nn.Linear(backbone.config.d_model, n_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def summary(self, idx: torch.Tensor, token_types: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, C): the state the head reads."""
        return self.backbone.sequence_summary(idx, token_types, pad_mask)

    def forward(self, idx: torch.Tensor, token_types: torch.Tensor, pad_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, K); with LABELS (B,) also their mean cross-entropy."""
        logits = self.head(self.dropout(self.summary(idx, token_types, pad_mask)))
        loss = objectives.classification_loss(logits, labels) if labels is not None else None
        return logits, loss


def scored(model: SequenceClassifier, batch: ClassifyBatch) -> Scored:
    """Class logits and the summary states they are read from."""
    summary = model.summary(batch.ids, batch.token_types, batch.pad_mask)  # (B, C)
    return Scored(model.head(model.dropout(summary)), batch.labels, summary)


# Any classifier, whatever its backbone: the soft targets lead, the labels keep the student honest.
CLASSIFIER_DISTILLATION = Distillation(scored, {"soft_weight": 1.0, "hard_weight": 0.5, "cosine_weight": 0.0},
                                       "val_accuracy")
