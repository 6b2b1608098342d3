"""LoRA: low-rank adapters. A frozen weight W gets a trainable update (alpha / rank) * B A, with
B (out, r) zero at first so training starts from the pretrained model exactly.

The adapters are the only trainable backbone parameters; they can be saved on their own (with the
task head) and later merged into W, which gives a plain model with identical outputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmkit.config import LoraConfig
from lmkit.models import ARCHS

TRAINABLE_WITH_LORA = ("head.",)  # task heads are new: always trained in full


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * B A dropout(x); base frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        """A plain Linear with the update folded into its weight."""
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        self.base.requires_grad_(True)
        return self.base


def add_adapters(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Freeze MODEL and wrap its target projections in LoRALinear (in place); task heads stay trainable.
    Which projections cfg.targets names (attention, MLP or all) is declared by MODEL's architecture."""
    targets = ARCHS[model.config.arch].lora_targets
    suffixes = targets["attn"] + targets["mlp"] if cfg.targets == "all" else targets[cfg.targets]
    for param in model.parameters():
        param.requires_grad_(False)
    targets = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.endswith(suffixes)]
    if not targets:
        raise AssertionError(f"no {cfg.targets} projections found for LoRA")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), cfg.rank, cfg.alpha, cfg.dropout))
    for name, param in model.named_parameters():
        if name.startswith(TRAINABLE_WITH_LORA):
            param.requires_grad_(True)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged Linear (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.merged())
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (adapters and heads): what an adapter checkpoint holds."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}
