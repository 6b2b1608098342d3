"""Task heads on top of a pretrained backbone (GPT or BERT)."""

from __future__ import annotations

import torch
from torch import nn

from lmkit import objectives


class SequenceClassifier(nn.Module):
    """Class logits for whole sequences: a linear layer over one summary state per sequence --
    BERT's pooled [CLS] state (through its pretrained pooler), or GPT's last real token (the
    only position that has seen the whole text)."""

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
        if self.config.arch == "bert":
            hidden = self.backbone.hidden_states(idx, token_types, pad_mask)  # (B, T, C)
            return torch.tanh(self.backbone.pooler(hidden[:, 0]))
        # Causal attention: right padding never reaches the real positions, so no mask is needed.
        hidden = self.backbone.hidden_states(idx)  # (B, T, C)
        last = pad_mask.sum(dim=1) - 1  # (B,)
        return hidden[torch.arange(idx.size(0), device=idx.device), last]

    def forward(self, idx: torch.Tensor, token_types: torch.Tensor, pad_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, K); with LABELS (B,) also their mean cross-entropy."""
        logits = self.head(self.dropout(self.summary(idx, token_types, pad_mask)))
        loss = objectives.classification_loss(logits, labels) if labels is not None else None
        return logits, loss
