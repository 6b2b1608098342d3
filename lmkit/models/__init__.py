"""The model zoo: one module per architecture, all returning (logits, loss)."""

from __future__ import annotations

from torch import nn

from lmkit.config import ModelConfig
from lmkit.models.bert import BERT
from lmkit.models.gpt import GPT
from lmkit.models.seq2seq import Seq2Seq

MODELS: dict[str, type[nn.Module]] = {"gpt": GPT, "bert": BERT, "seq2seq": Seq2Seq}
OBJECTIVES: dict[str, list[str]] = {"gpt": ["causal-lm"], "bert": ["masked-lm", "next-sentence"],
                                   "seq2seq": ["denoising (text infilling)"]}


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of cfg.arch."""
    return MODELS[cfg.arch](cfg)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Distinct parameters (tied weights count once); with TRAINABLE_ONLY, those not frozen (LoRA)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
