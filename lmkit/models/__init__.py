"""The model zoo: one module per architecture, each declaring its ARCH; this is the one table of them.

An architecture's module holds its model (all models return (logits, loss)) and everything else
that differs by architecture (lmkit.models.arch.Arch); lmkit looks it up here by cfg.model.arch.
The model settings each architecture honours, its checks of them and its presets are plain data in
lmkit.presets, so that configs resolve without importing torch.
"""

from __future__ import annotations

from torch import nn

from lmkit.config import ModelConfig
from lmkit.models import bert, gpt, llama, seq2seq
from lmkit.models.arch import Arch

ARCHS: dict[str, Arch] = {"llama": llama.ARCH, "gpt": gpt.ARCH, "bert": bert.ARCH, "seq2seq": seq2seq.ARCH}


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of cfg.arch."""
    return ARCHS[cfg.arch].model(cfg)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Distinct parameters (tied weights count once); with TRAINABLE_ONLY, those not frozen (LoRA)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
