"""Typed, validated configuration and the one function that resolves it.

Precedence, lowest first: preset < project lmkit.toml < --config FILE < --set key=value < command flags.
Everything here is plain Python (no torch), so the CLI can build and check configs cheaply.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmkit.errors import ConfigError
from lmkit.fileio import atomic_write_bytes
from lmkit.presets import DEFAULT_ARCH, MODEL_SETTINGS, PRESETS

ARCHS: tuple[str, ...] = tuple(PRESETS)  # the architectures, in the order help texts list them


MAX_VOCAB_SIZE = 2**31 - 1
MAX_SEED = 2**63 - 1  # what a torch generator takes as a signed 64-bit seed
# Upper bounds, far above any real model or run, that keep a huge value (a typo, an extra digit)
# from reaching torch, whose 64-bit sizes it overflows with a traceback, or a loop it never ends.
MAX_WIDTH = 2**16  # model.d_model, model.head_dim, lora.rank
MAX_FF = 2**20  # model.d_ff
MAX_DEPTH = 1024  # model.n_layer, model.n_head
MAX_CONTEXT = 2**24  # model.max_seq_len: tokens of context; also new tokens per output
MAX_BATCH = 2**20  # sequences per forward pass
MAX_STEPS = 10**12  # step counts and intervals
MAX_SAMPLES = 2**16  # outputs or beams per input


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_range(name: str, value: float | None, low: float, high: float | None = None, *,
                low_open: bool = False) -> None:
    """The one check of a setting's range: VALUE in [LOW, HIGH] ((LOW, HIGH] with LOW_OPEN; no upper
    limit when HIGH is None); None (not given) passes.

    Raises:
        ConfigError: `NAME=VALUE must be in [LOW, HIGH]`, naming the setting as its flag is spelled
            (--top-p sets top_p).
    """
    if value is None:
        return
    inside = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not inside:  # NaN fails every comparison, so it lands here too
        raise ConfigError(f"{name}={value} must be {_range_text(low, high, low_open)}")


def _range_text(low: float, high: float | None, low_open: bool = False) -> str:
    if high is None:
        return f"> {low}" if low_open else ("at least 1" if low == 1 else f">= {low}")
    return f"in {'(' if low_open else '['}{_number(low)}, {_number(high)}]"


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) and value >= 10_000 else str(value)


def _check_ranges(section: str, obj: object, ranges: dict[str, tuple[int, int]]) -> None:
    for name, (low, high) in ranges.items():
        check_range(f"{section}.{name}", getattr(obj, name), low, high)


@dataclass(frozen=True)
class TokenizerConfig:
    """How `lmkit tokenize train` builds the sentencepiece model."""

    vocab_size: int = 1024
    model_type: Literal["bpe", "unigram", "char", "word"] = "bpe"
    # Characters outside this coverage become byte pieces (byte fallback), never <unk>.
    character_coverage: float = 0.9995
    # Corpora with more lines than this are sampled, so tokenizer training memory stays bounded.
    max_sentences: int = 2_000_000

    def __post_init__(self) -> None:
        _check(self.vocab_size >= 300, f"tokenizer.vocab_size={self.vocab_size} is too small: "
               "the tokenizer needs 256 byte pieces plus special tokens; use at least 300")
        _check(self.vocab_size <= MAX_VOCAB_SIZE, f"tokenizer.vocab_size={self.vocab_size} is too large: "
               f"sentencepiece takes at most {MAX_VOCAB_SIZE:,} (a 32-bit id)")
        _check(0.9 <= self.character_coverage <= 1.0,
               f"tokenizer.character_coverage={self.character_coverage} must be in [0.9, 1.0]")
        _check(1000 <= self.max_sentences <= MAX_VOCAB_SIZE,
               f"tokenizer.max_sentences={self.max_sentences} must be in [1000, {MAX_VOCAB_SIZE:,}]")


@dataclass(frozen=True)
class DataConfig:
    """How corpora become train/val token files, and token files become batches."""

    val_fraction: float = 0.05
    text_field: str = "text"  # the field holding the text in JSONL corpora
    # bert: share of tokens chosen for masked-LM prediction; seq2seq: share of tokens hidden in
    # masked spans for denoising (its presets set 0.3, as BART)
    mask_prob: float = 0.15

    def __post_init__(self) -> None:
        _check(0.0 < self.val_fraction <= 0.5, f"data.val_fraction={self.val_fraction} must be in (0, 0.5]")
        _check(0.0 < self.mask_prob < 1.0, f"data.mask_prob={self.mask_prob} must be in (0, 1)")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the network. Hyper-parameter names are the same for every architecture; each
    architecture honours the shared fields and its own (lmkit.presets.MODEL_SETTINGS), and the
    fields it does not read keep their defaults."""

    arch: str = DEFAULT_ARCH  # one of ARCHS
    vocab_size: int = 1024  # always overwritten with the tokenizer's real size
    d_model: int = 128
    n_layer: int = 4  # seq2seq: layers of the encoder, and as many again in the decoder
    n_head: int = 4
    d_ff: int = 0  # 0 means 4 * d_model (llama: the width of the gate and up projections)
    max_seq_len: int = 64
    dropout: float = 0.0
    bias: bool = True  # biases in every linear layer and norm (llama presets: off)
    activation: Literal["gelu_tanh", "gelu", "silu"] = "gelu_tanh"  # GPT-2: the tanh approximation; llama: silu
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # What a classifier on this model reads: "auto" is the architecture's own summary state (BERT's
    # pooled [CLS], a decoder's last real token); "mean" averages the final hidden states of the
    # real tokens, which every position's training shaped, not just one.
    pooling: Literal["auto", "mean"] = "auto"
    # The modern decoder (llama) only:
    n_kv_head: int = 0  # key/value heads of grouped-query attention; 0 means n_head (multi-head), 1 multi-query
    head_dim: int = 0  # 0 means d_model // n_head
    qk_norm: bool = False  # RMSNorm of each query and key head before the rotary embedding (Qwen3, nanochat)
    qkv_bias: bool = False  # biases on the q/k/v projections only (Qwen2)
    rope_theta: float = 10000.0  # base of the rotary embedding's wavelengths
    rope_scaling: Literal["none", "llama3"] = "none"  # llama3: Llama 3.1's long-context frequency scaling
    rope_factor: float = 8.0  # llama3 scaling: how much the low frequencies are stretched
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192  # llama3 scaling: the context the frequencies were trained for

    def __post_init__(self) -> None:
        for name, annotation in _field_types(ModelConfig).items():  # built from code or an imported config
            value = _coerce(f"model.{name}", getattr(self, name), annotation, "the model config")
            object.__setattr__(self, name, value)
        _check(self.arch in ARCHS, f"model.arch={self.arch!r} is not one of: {', '.join(ARCHS)}")
        _check_ranges("model", self, {"vocab_size": (1, MAX_VOCAB_SIZE), "d_model": (1, MAX_WIDTH),
                                      "n_layer": (1, MAX_DEPTH), "n_head": (1, MAX_DEPTH),
                                      "max_seq_len": (1, MAX_CONTEXT), "rope_original_max_len": (1, MAX_CONTEXT)})
        for name, high in (("d_ff", MAX_FF), ("n_kv_head", MAX_DEPTH), ("head_dim", MAX_WIDTH)):
            value = getattr(self, name)
            _check(0 <= value <= high, f"model.{name}={value} must be in [0, {_number(high)}] (0: the default)")
        _check(self.head_dim > 0 or self.d_model % self.n_head == 0,
               f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")
        _check(self.norm_eps > 0, f"model.norm_eps={self.norm_eps} must be > 0")
        _check(self.pooling in ("auto", "mean"), f"model.pooling={self.pooling!r} must be auto or mean")
        # Code that builds a config (an import, a finetune, a distilled student) sets only the
        # architecture's own fields; a user's settings were checked when the layers merged (resolve).
        honoured = MODEL_SETTINGS[self.arch].fields
        for name in (f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default):
            if name not in honoured:
                raise ConfigError(f"model.{name}={getattr(self, name)!r} {_not_a_setting(name, self.arch)}")
        MODEL_SETTINGS[self.arch].check(self)

    def to_dict(self) -> dict[str, Any]:
        """The fields the architecture honours (what a saved config.json holds)."""
        return {name: getattr(self, name) for name in MODEL_SETTINGS[self.arch].fields}

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_head


LOG_SINKS = ("tensorboard", "wandb")  # where train.log sends metrics besides metrics.jsonl (lmkit.sinks)


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe shared by pretrain, finetune and distill."""

    batch_size: int = 32  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 2500
    time_budget: float = 0.0  # seconds of training; 0 means no limit
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    # Discriminative learning rates (ULMFiT, ELECTRA's layer-wise decay): each layer down from the
    # top learns at this times the one above it, so a finetune moves the pretrained lower layers
    # less than the new head; 1 gives every weight train.lr.
    layer_lr_decay: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    # muon: torch.optim.Muon for the weight matrices inside the blocks (a fused c_attn as its q, k
    # and v apart), AdamW (lr, betas) for embeddings, norms, biases and every head outside the
    # blocks, as nanochat trains (lmkit.optim)
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_momentum: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250
    eval_batches: int = 20
    save_interval: int = 500
    log_interval: int = 10
    keep_checkpoints: int = 2  # periodic checkpoints kept per run (the latest is never deleted)
    best_metric: str = "val_loss"  # kept as the run's best checkpoint; *_loss lower is better, else higher
    patience: int = 0  # stop after this many validations without a better best_metric; 0 never stops
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # auto: bf16 autocast on CUDA, fp32 elsewhere; fp16: autocast plus a gradient scaler (older GPUs)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"  # with several ranks: replicate the model, or shard it
    grad_checkpoint: bool = False  # recompute each block's activations in backward: less memory, ~1/3 more compute
    log: str = ""  # metric sinks besides metrics.jsonl: "tensorboard", "wandb" or both, comma-separated

    def __post_init__(self) -> None:
        _check_ranges("train", self, {
            "batch_size": (1, MAX_BATCH), "grad_accum": (1, 2**16), "max_steps": (1, MAX_STEPS),
            "eval_interval": (1, MAX_STEPS), "eval_batches": (1, MAX_BATCH), "save_interval": (1, MAX_STEPS),
            "log_interval": (1, MAX_STEPS), "keep_checkpoints": (1, MAX_STEPS), "warmup_steps": (0, MAX_STEPS),
            "patience": (0, MAX_STEPS)})
        _check(self.time_budget >= 0, f"train.time_budget={self.time_budget} must be >= 0")
        _check(self.lr > 0, f"train.lr={self.lr} must be > 0")
        _check(0 <= self.min_lr <= self.lr, f"train.min_lr={self.min_lr} must be in [0, lr={self.lr}]")
        _check(self.weight_decay >= 0, f"train.weight_decay={self.weight_decay} must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
        _check(0 < self.layer_lr_decay <= 1, f"train.layer_lr_decay={self.layer_lr_decay} must be in (0, 1]")
        _check(0 <= self.muon_momentum < 1, f"train.muon_momentum={self.muon_momentum} must be in [0, 1)")
        _check(not (self.optimizer == "muon" and self.strategy == "fsdp"),
               "train.optimizer=muon needs whole weight matrices on every rank; use --strategy ddp with it")
        _check(self.grad_clip >= 0, f"train.grad_clip={self.grad_clip} must be >= 0")
        _check(0 <= self.seed <= MAX_SEED, f"train.seed={self.seed} must be in [0, {MAX_SEED}]")
        _check(self.best_metric.startswith("val_"), f"train.best_metric={self.best_metric!r} must name a "
               "validation metric such as val_loss or val_accuracy")
        _check(all(k in LOG_SINKS for k in self.log_sinks),
               f"train.log={self.log!r}: give tensorboard, wandb or both, comma-separated")

    @property
    def log_sinks(self) -> list[str]:
        """train.log ("tensorboard,wandb") as a list."""
        return [k.strip() for k in self.log.split(",") if k.strip()]

    @property
    def tokens_per_step(self) -> int:
        """Sequences per optimizer step; multiply by the context length for tokens."""
        return self.batch_size * self.grad_accum


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (LoRA) for finetuning: W x + (alpha / rank) * B A x, with W frozen."""

    rank: int = 0  # 0 means full finetuning, no adapters
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Literal["attn", "mlp", "all"] = "attn"  # which projections get adapters

    def __post_init__(self) -> None:
        _check(0 <= self.rank <= MAX_WIDTH, f"lora.rank={self.rank} must be in [0, {MAX_WIDTH:,}] (0: no adapters)")
        _check(self.alpha > 0, f"lora.alpha={self.alpha} must be > 0")
        _check(0.0 <= self.dropout < 1.0, f"lora.dropout={self.dropout} must be in [0, 1)")


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation: the student's loss is soft_weight * T^2 * D(teacher || student at
    temperature T) + hard_weight * (its own task loss) + cosine_weight * (1 - cos(hidden states))."""

    temperature: float = 2.0
    kl: Literal["forward", "reverse", "jsd"] = "forward"  # KL(teacher||student) (Hinton), the reverse (MiniLLM), or JSD
    jsd_beta: float = 0.5  # jsd: the teacher's weight in the mixture both are compared with
    soft_weight: float = 1.0
    hard_weight: float = 0.5  # alpha: next token, masked token or class label
    cosine_weight: float = 0.0  # DistilBERT's loss on the final hidden states; needs equal widths

    def __post_init__(self) -> None:
        _check(self.temperature > 0, f"distill.temperature={self.temperature} must be > 0")
        _check(0.0 < self.jsd_beta < 1.0, f"distill.jsd_beta={self.jsd_beta} must be in (0, 1)")
        for name in ("soft_weight", "hard_weight", "cosine_weight"):
            _check(getattr(self, name) >= 0, f"distill.{name}={getattr(self, name)} must be >= 0")
        _check(self.soft_weight + self.hard_weight + self.cosine_weight > 0, "every distill weight is 0: no loss")


@dataclass(frozen=True)
class DPOConfig:
    """Preference tuning (`lmkit finetune --task dpo`). With margins m = log pi(y) - log ref(y) of the
    chosen (w) and rejected (l) replies, the loss of a pair is -log sigmoid(beta (m_w - m_l)) for
    "sigmoid" (DPO), (m_w - m_l - 1 / (2 beta))^2 on per-token margins for "ipo", and for the
    reference-free "simpo" -log sigmoid(beta (mean log pi(y_w) - mean log pi(y_l)) - gamma)."""

    loss: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"
    beta: float = 0.0  # 0: the loss's own default, 0.1 for sigmoid and ipo, 2.0 for simpo (the papers')
    gamma: float = 0.5  # simpo: the target reward margin

    def __post_init__(self) -> None:
        _check(0 <= self.beta <= 1e4, f"dpo.beta={self.beta} must be in [0, 10000] (0: the loss's default)")
        _check(0 <= self.gamma <= 1e4, f"dpo.gamma={self.gamma} must be in [0, 10000]")

    @property
    def strength(self) -> float:
        """beta, or the loss's default."""
        return self.beta or (2.0 if self.loss == "simpo" else 0.1)


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs; saved as JSON before step 0 and beside every checkpoint."""

    preset: str = "default"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def to_dict(self) -> dict[str, Any]:
        """Every section; of the model, the fields its architecture honours."""
        return {**dataclasses.asdict(self), "model": self.model.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> RunConfig:
        """Rebuild a saved config (e.g. a checkpoint's), rejecting unknown keys.

        Configs saved before each architecture declared its fields hold every model field, other
        architectures' too (their defaults, or a value the model never read): those are left out,
        so old checkpoints load as what they are."""
        sections = _split_layer(data, source)
        arch = sections.get("model", {}).get("arch", DEFAULT_ARCH)
        if isinstance(arch, str) and arch in MODEL_SETTINGS:  # else ModelConfig names what is wrong with it
            sections["model"] = {k: v for k, v in sections.get("model", {}).items() if k in MODEL_SETTINGS[arch].fields}
        return cls(preset=str(data.get("preset", "default")),
                   **{name: _build(SECTIONS[name], values, source) for name, values in sections.items()})

    def with_vocab_size(self, vocab_size: int) -> RunConfig:
        return dataclasses.replace(self, model=dataclasses.replace(self.model, vocab_size=vocab_size))


@dataclass(frozen=True)
class SampleConfig:
    """How `generate` picks tokens. Only lmkit.generate and lmkit.search read these."""

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0  # 0 disables top-k filtering
    top_p: float = 1.0  # 1.0 disables nucleus filtering
    greedy: bool = False
    num_samples: int = 1  # sequences returned per input (with beam search: the best ones, <= beam)
    seed: int | None = None  # None draws a fresh seed; the one used is reported
    beam: int = 1  # > 1: beam search of this width (deterministic; sampling settings do not apply)
    length_penalty: float = 1.0  # beam search ranks by log-prob / length ** this; 0 compares raw sums
    no_repeat_ngram_size: int = 0  # > 0: never produce an n-gram of this size twice
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the text (CTRL's penalty)
    stop: tuple[str, ...] = ()  # end a sequence when its text contains one of these (left out)

    def __post_init__(self) -> None:
        # Named as the flags spell them (--top-p: top_p), with the value given.
        check_range("max_new_tokens", self.max_new_tokens, 1, MAX_CONTEXT)
        check_range("seed", self.seed, 0, MAX_SEED)
        check_range("temperature", self.temperature, 0)
        check_range("top_k", self.top_k, 0, MAX_VOCAB_SIZE)
        check_range("top_p", self.top_p, 0, 1, low_open=True)
        check_range("num_samples", self.num_samples, 1, MAX_SAMPLES)
        check_range("beam", self.beam, 1, MAX_SAMPLES)
        _check(self.beam == 1 or self.num_samples <= self.beam,
               f"beam search returns at most beam={self.beam} sequences; asked for {self.num_samples}")
        check_range("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, MAX_CONTEXT)
        check_range("repetition_penalty", self.repetition_penalty, 0, low_open=True)
        _check(all(self.stop), "stop strings must not be empty")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


SECTIONS: dict[str, type] = {
    "tokenizer": TokenizerConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "lora": LoraConfig,
    "distill": DistillConfig,
    "dpo": DPOConfig,
}
TOP_LEVEL_KEYS = ("arch", "preset")

def preset_names(arch: str = DEFAULT_ARCH) -> list[str]:
    return list(PRESETS[arch])


def resolve(
    *,
    project_file: Path | None = None,
    config_file: Path | None = None,
    sets: typing.Sequence[str] = (),
    flags: dict[str, Any] | None = None,
    base: RunConfig | None = None,
) -> RunConfig:
    """Merge every config layer into one validated RunConfig.

    The lowest layer is the preset named by the layers (default: "default"), or BASE when given
    (finetuning starts from its checkpoint's config; then arch and preset cannot change, and the
    project file's arch, preset and [model] settings, which are for pretraining, are left out).

    Args:
        project_file: the project's lmkit.toml (skipped when missing).
        config_file: a --config FILE (TOML, or JSON such as a run's saved config.json).
        sets: repeatable `--set key=value`; keys are `section.field`, or a bare field name when
            only one section has it; values are TOML literals (bare words are strings).
        flags: dotted keys from dedicated command flags, e.g. {"train.max_steps": 100}.

    Raises:
        ConfigError: naming the key and the layer that set it.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    if project_file is not None and project_file.exists():
        project_layer = load_file(project_file)
        if base is not None:  # the model is the checkpoint's: the project's model settings are for pretraining
            project_layer = {k: v for k, v in project_layer.items() if k not in ("arch", "preset", "model")}
        layers.append((str(project_file), project_layer))
    layers += _command_layers(config_file, sets, flags)

    if base is not None:
        for source, layer in layers:
            if {"arch", "preset"} & set(layer) or _model_arch(layer) not in (None, base.model.arch):
                raise ConfigError(f"{source} sets arch or preset, but a finetune keeps its checkpoint's model")
        merged = {name: dataclasses.asdict(getattr(base, name)) for name in SECTIONS}
        preset = base.preset
    else:
        arch, preset = DEFAULT_ARCH, "default"
        for _, layer in layers:  # a saved config.json names its arch in its model section
            arch = layer.get("arch", _model_arch(layer) or arch)
            preset = layer.get("preset", preset)
        if arch not in ARCHS:
            raise ConfigError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
        if preset not in PRESETS[arch]:
            raise ConfigError(f"unknown preset {preset!r} for arch {arch}; "
                              f"choose one of: {', '.join(PRESETS[arch])}")
        merged = {name: dict(values) for name, values in PRESETS[arch][preset].items()}
        merged.setdefault("model", {})["arch"] = arch
        layers = [(f"preset {preset}", {"model": merged.pop("model")}), *layers]
    return RunConfig(preset=preset, **_apply(layers, merged, "the merged config", can_pick_arch=base is None))


def _model_arch(layer: dict[str, Any]) -> Any:
    model = layer.get("model")
    return model.get("arch") if isinstance(model, dict) else None


def _apply(layers: list[tuple[str, dict[str, Any]]], merged: dict[str, dict[str, Any]],
           source: str, can_pick_arch: bool = False) -> dict[str, Any]:
    """Each section of MERGED (its values so far) with LAYERS on top, built and checked; a layer
    that sets a model field its architecture does not honour is refused, naming it (CAN_PICK_ARCH:
    the fix may be another --arch)."""
    given = []
    for layer_source, layer in layers:
        for section, values in _split_layer(layer, layer_source).items():
            merged.setdefault(section, {}).update(values)
            if section == "model":
                given += [(name, value, layer_source) for name, value in values.items()]
    arch = merged.get("model", {}).get("arch", DEFAULT_ARCH)
    if isinstance(arch, str) and arch in MODEL_SETTINGS:  # else ModelConfig names what is wrong with it
        defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
        for name, value, layer_source in given:
            # A saved config.json of older lmkit holds every field, the others at their defaults.
            saved_default = layer_source.endswith(".json") and value == defaults[name]
            if name not in MODEL_SETTINGS[arch].fields and not saved_default:
                fix = f"leave it out of {'the command line' if layer_source == 'command line' else layer_source}"
                if can_pick_arch:
                    fix += f" or pick --arch {_or(_owners(name))}"
                raise ConfigError(f"model.{name} {_not_a_setting(name, arch)}; {fix}")
    return {name: _build(cls, merged.get(name, {}), source) for name, cls in SECTIONS.items()}


def _owners(name: str) -> list[str]:
    """The architectures that honour the model field NAME."""
    return [arch for arch, settings in MODEL_SETTINGS.items() if name in settings.fields]


def _not_a_setting(name: str, arch: str) -> str:
    return f"is not a {arch} setting (used by {', '.join(_owners(name))})"


def _or(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _command_layers(config_file: Path | None, sets: typing.Sequence[str],
                    flags: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """The layers a command line gives: --config FILE, --set, then its own flags (None: not given)."""
    layers: list[tuple[str, dict[str, Any]]] = []
    if config_file is not None:
        layers.append((str(config_file), load_file(config_file)))
    if sets:
        layers.append(("--set", _nest(dict(parse_set(item) for item in sets))))
        _check_top_level(layers[-1][1], "--set")
    if flags:
        layers.append(("command line", _nest({k: v for k, v in flags.items() if v is not None})))
    return layers


@dataclass(frozen=True)
class CommandLine:
    """The settings a command line gives, before they are merged: --config FILE, --set, its flags
    (dotted keys; None: not given)."""

    config_file: Path | None = None
    sets: tuple[str, ...] = ()
    flags: dict[str, Any] = field(default_factory=dict)

    def changes_to(self, saved: RunConfig, may_change: typing.Collection[str] = ()) -> list[str]:
        """What this command line would change in the SAVED config of a run, as "key: old -> new":
        the settings it gives that differ from the saved ones (an equal one is no change), but for
        the dotted keys in MAY_CHANGE. --resume refuses a run's command line only over these."""
        layers = _command_layers(self.config_file, self.sets, self.flags)
        changes = []
        for source, layer in layers:
            for key, old in (("arch", saved.model.arch), ("preset", saved.preset)):
                if key in layer and layer[key] != old:
                    changes.append(f"{key}: {old} -> {layer[key]} ({source})")
        plain = [(source, {k: v for k, v in layer.items() if k not in TOP_LEVEL_KEYS}) for source, layer in layers]
        requested = _apply(plain, {name: dataclasses.asdict(getattr(saved, name)) for name in SECTIONS},
                           "the command line")
        for name, cls in SECTIONS.items():
            for f in dataclasses.fields(cls):
                old, new = getattr(getattr(saved, name), f.name), getattr(requested[name], f.name)
                if old != new and f"{name}.{f.name}" not in may_change:
                    changes.append(f"{name}.{f.name}: {old!r} -> {new!r}")
        return changes


def load_file(path: Path) -> dict[str, Any]:
    """Read a TOML or JSON config file into a nested dict."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors write one) is not TOML
        if path.suffix == ".json":
            data = json.loads(text)
            if isinstance(data, dict) and isinstance(data.get("config"), dict):
                data = data["config"]  # a checkpoint's config.json nests the run config
        else:
            data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as err:  # ValueError: bad JSON, UTF-8, or a 4,300-digit number
        raise ConfigError(f"cannot parse config file {path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold an object of settings, not {type(data).__name__}")
    _check_top_level(data, str(path))
    return data


def _check_top_level(layer: dict[str, Any], source: str) -> None:
    """arch and preset are names: a table or number there is a slip (`[preset]` for `preset = ...`)."""
    for key in TOP_LEVEL_KEYS:
        if key in layer and not isinstance(layer[key], str):
            example = "tiny" if key == "preset" else "gpt"
            raise ConfigError(f'{key} in {source} must be a name, e.g. {key} = "{example}"; got {layer[key]!r:.60}')


def parse_set(item: str) -> tuple[str, Any]:
    """`model.n_layer=4` -> ("model.n_layer", 4); a bare field name is qualified if unambiguous."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # bare words such as gpt or bpe
    except ValueError:  # an integer of more than 4,300 digits, which Python will not read
        raise ConfigError(f"--set {key}: the number has {len(raw.strip()):,} digits; no setting takes one "
                          "that large") from None
    if "." not in key and key not in TOP_LEVEL_KEYS:
        owners = [name for name, cls in SECTIONS.items() if key in _field_types(cls)]
        if len(owners) == 1:
            key = f"{owners[0]}.{key}"
        elif len(owners) > 1:
            raise ConfigError(f"--set {key} is ambiguous; write one of: {', '.join(f'{o}.{key}' for o in owners)}")
        else:
            raise ConfigError(f"unknown config key {key!r} in --set{_suggest(key, _all_keys())}")
    return key, value


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '1.5h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip().lower()
    scale = units.get(text[-1:], None)
    number = text[:-1] if scale else text
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise ConfigError(f"cannot read duration {text!r}; write e.g. 90s, 15m or 1.5h") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"duration {text!r} must be positive")
    return seconds


def write_template(path: Path) -> None:
    """First use of a project: leave an editable, fully commented lmkit.toml at PATH, unless one is there."""
    if not path.exists():
        atomic_write_bytes(path, render_template().encode("utf-8"))


def render_template() -> str:
    """A commented lmkit.toml listing every key with its default, for users to edit."""
    lines = [
        "# lmkit project config. Uncomment a line to change it; command-line flags and --set win over this file.",
        "# Presets (tiny, default, small) set model and train values first; see `lmkit pretrain --help`.",
        f'# arch = "{DEFAULT_ARCH}"  # or: {", ".join(a for a in ARCHS if a != DEFAULT_ARCH)}',
        '# preset = "default"',
    ]
    for name, cls in SECTIONS.items():
        lines += ["", f"[{name}]"]
        for f in dataclasses.fields(cls):
            if name == "model" and f.name in ("arch", "vocab_size"):
                continue  # arch is top-level; vocab_size comes from the tokenizer
            owners = _owners(f.name) if name == "model" else []
            only = f"  # {', '.join(owners)} only" if 0 < len(owners) < len(MODEL_SETTINGS) else ""
            lines.append(f"# {f.name} = {_toml_literal(f.default)}{only}")
    return "\n".join(lines) + "\n"


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        section, _, name = key.rpartition(".")
        if section:
            nested.setdefault(section, {})[name] = value
        else:
            nested[name] = value
    return nested


def _split_layer(layer: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """Check a layer's shape and keys; return its sections."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in layer.items():
        if key in TOP_LEVEL_KEYS:
            continue
        if key not in SECTIONS:
            hint = _suggest(key, [*SECTIONS, *TOP_LEVEL_KEYS])
            raise ConfigError(f"unknown config section {key!r} in {source}{hint}")
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] in {source} must be a table of settings")
        known = _field_types(SECTIONS[key])
        for name in value:
            if name not in known:
                raise ConfigError(f"unknown config key '{key}.{name}' in {source}{_suggest(name, list(known))}")
        sections[key] = value
    return sections


def _build(cls: type, values: dict[str, Any], source: str) -> Any:
    """Type-check values against the dataclass annotations, then construct (which validates ranges)."""
    types = _field_types(cls)
    section = next(name for name, c in SECTIONS.items() if c is cls)
    checked = {name: _coerce(f"{section}.{name}", value, types[name], source) for name, value in values.items()}
    return cls(**checked)


def _coerce(key: str, value: Any, annotation: Any, source: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} in {source} is not one of: {', '.join(map(str, choices))}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} in {source} must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}={value!r} in {source} must be an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} in {source} must be a number")
        if isinstance(value, int) and abs(value) >= 2**1024:  # no float holds it (math.isfinite would overflow)
            raise ConfigError(f"{key} in {source} is a {len(str(abs(value)))}-digit number; it must be finite")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} in {source} must be finite")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} in {source} must be a string")
        return value
    raise AssertionError(f"unsupported config annotation {annotation!r} for {key}")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_keys() -> list[str]:
    return [name for cls in SECTIONS.values() for name in _field_types(cls)]


def _suggest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
