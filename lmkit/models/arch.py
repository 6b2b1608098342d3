"""What an architecture declares: everything that differs between GPT, llama, BERT and the
encoder-decoder, in one record per architecture (its module's ARCH), looked up in
lmkit.models.ARCHS. The rest of lmkit asks the record and never branches on an architecture's name.
What an architecture takes from a config (the model settings it honours, its checks of them, its
presets) is plain data in lmkit.presets, so that configs resolve without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from lmkit.batches import Batch
from lmkit.config import ModelConfig, RunConfig
from lmkit.errors import CheckpointError
from lmkit.finetune_data import PairLayout
from lmkit.objectives import LossFn, MetricsFn
from lmkit.tokenizer import Tokenizer


class Sampler(Protocol):
    """Endless training batches whose position can be saved and restored (exact resume)."""

    def __iter__(self) -> Iterator[Batch]: ...
    def __next__(self) -> Batch: ...
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass
class Pretraining:
    """What pretraining means for an architecture: its batches, loss and validation metrics."""

    batches: Sampler
    val_batches: list[Batch]  # drawn once: the same validation set at every evaluation
    loss_fn: LossFn
    metrics_fn: MetricsFn
    tokens_per_batch: int  # for throughput figures


@dataclass
class Scored:
    """What distillation compares, for the N positions (or examples) that are predicted."""

    logits: torch.Tensor  # (N, K)
    labels: torch.Tensor  # (N,), IGNORE where there is no label
    hidden: torch.Tensor | None  # (M, C) final hidden states of the real tokens (or examples); None: not compared


@dataclass(frozen=True)
class Distillation:
    """How a kind of model (an architecture's language model, or any classifier) is distilled."""

    scored: Callable[[nn.Module, Batch], Scored]
    weights: dict[str, float]  # distill.soft_weight / hard_weight / cosine_weight before --set
    metric: str  # the validation metric the teacher-vs-student summary compares
    compares_hidden: bool = True  # the cosine loss on final hidden states is defined


@dataclass(frozen=True)
class HFMapping:
    """A Hugging Face model family that maps onto the architecture, in both directions."""

    model_types: tuple[str, ...]  # config.json "model_type" values imported onto this architecture
    config_in: Callable[[dict[str, Any]], ModelConfig]
    # Hub weight names -> lmkit's (all tensors at once: BERT fuses q, k and v); None: the names are
    # lmkit's already, and the tensors stream in one at a time
    weights_in: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None
    may_lack: Callable[[dict[str, Any]], set[str]]  # lmkit weights a Hub checkpoint may lack (fresh init or tied)
    # (model config, lmkit state dict, a classifier's labels or [] for a language model, the imported
    # config.json or {}) -> (HF config.json, HF weights); raises for what it has no counterpart of
    export: Callable[[ModelConfig, dict[str, torch.Tensor], list[str], dict[str, Any]],
                     tuple[dict[str, Any], dict[str, Any]]]
    special_ids: Callable[[Any], dict[str, int]]  # the config.json token ids of a tokenizer
    tokenizer_class: str  # written in tokenizer_config.json for an imported tokenizer
    # Prompts as transformers encodes them (the tokenizer's own special tokens, a BOS where it adds
    # one); False: as lmkit's own models read them, after an end-of-text token (GPT-2's convention)
    tokenizer_prompts: bool = False


@dataclass(frozen=True)
class Arch:
    """Everything lmkit needs to know about one architecture."""

    name: str
    summary: str  # one line, for help texts
    model: Callable[[ModelConfig], nn.Module]  # (idx, ...) -> (logits, loss), like every model
    objectives: tuple[str, ...]  # the pretraining objectives, as `lmkit info` names them
    pretraining: Callable[[RunConfig, np.ndarray, np.ndarray, Tokenizer], Pretraining]  # (cfg, train, val, tok)
    distillation: Distillation
    tasks: tuple[str, ...]  # the `lmkit finetune --task` values this architecture takes
    decoding: Literal["continue", "rewrite", "fill-mask"]  # what `lmkit generate` does with a text
    # What `lmkit eval FILE` does with a (pretrained or finetuned, not classifier) checkpoint: score
    # a text as a causal LM or as a masked LM, or decode source/target pairs (lmkit.evaluate.EVALUATIONS)
    evaluation: Literal["text", "masked-text", "pairs"]
    # The FLOPs of training on one batch (forward and backward; lmkit.models.flops), the numerator of
    # MFU: a batch of the architecture's pretraining or finetuning, or a classifier's ClassifyBatch
    train_flops: Callable[[ModelConfig, Batch], float]
    eval_task: str = "lm"  # the --task that evaluation scores
    pair_layout: Callable[[Tokenizer], PairLayout] | None = None  # classifier inputs; None: no classify
    default_temperature: float = 0.8  # generate's sampling temperature when none is given (0: greedy)
    lora_targets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # lora.targets -> module name suffixes
    hf: HFMapping | None = None



def require_options(config: dict[str, Any], required: dict[str, Any]) -> None:
    """Refuse a Hugging Face config that sets an option to a value lmkit does not compute with.

    Raises:
        CheckpointError: naming each such option.
    """
    wrong = [f"{key}={config[key]!r} (lmkit has {value!r})" for key, value in required.items()
             if key in config and config[key] != value]
    if wrong:
        raise CheckpointError(f"unsupported config options: {', '.join(wrong)}")
