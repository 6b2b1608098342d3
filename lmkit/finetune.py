"""Finetuning a pretrained checkpoint (transfer learning): sequence classification, instruction
tuning on prompt/completion pairs, multi-turn chat on the assistant's turns, source -> target
rewriting with the encoder-decoder, or more language-model training on new text -- with all
weights trained, or with LoRA adapters on a frozen model. Every task runs on the shared loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lmkit import chat, checkpoint, corpus, distributed, lora, objectives, prepare, tasks
from lmkit.config import CommandLine, ConfigError, RunConfig, TrainConfig, resolve
from lmkit.device import pick_device
from lmkit.errors import CheckpointError, DataError
from lmkit.fileio import check_target_dir
from lmkit.models import ARCHS, build_model, count_parameters
from lmkit.models.heads import SequenceClassifier
from lmkit.project import Project, exclusive, project_holding
from lmkit.tokenizer import Tokenizer
from lmkit.train import (
    Log,
    Progress,
    RunPlan,
    TrainResult,
    TrainState,
    continuation,
    interrupted_run,
    pretraining_plan,
    refuse_changes,
    run_training,
    silent,
    start_run,
    truncate_metrics,
)

Task = Literal["chat", "classify", "instruct", "lm", "seq2seq"]
TASKS: tuple[str, ...] = ("chat", "classify", "instruct", "lm", "seq2seq")
LM_TASKS = ("chat", "instruct")  # their checkpoints are language models (task "lm"), finetuned
TASKS_WITH_HEADS = ("classify",)  # their checkpoints are the base model plus a head: not a base for more

# Finetuning recipes (override any with --set train.*): short runs at a lower learning rate than
# pretraining, validated often, keeping the best checkpoint by the task's own metric.
FINETUNE_TRAIN: dict[str, dict[str, Any]] = {
    "classify": {"batch_size": 32, "max_steps": 600, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 60,
                 "weight_decay": 0.01, "eval_interval": 50, "log_interval": 10, "save_interval": 100_000,
                 "best_metric": "val_accuracy"},
    "instruct": {"batch_size": 16, "max_steps": 500, "lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 50,
                 "weight_decay": 0.01, "eval_interval": 50, "log_interval": 10, "save_interval": 100_000},
    "chat": {"batch_size": 16, "max_steps": 500, "lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 50,
             "weight_decay": 0.01, "eval_interval": 50, "log_interval": 10, "save_interval": 100_000},
    "seq2seq": {"batch_size": 32, "max_steps": 1500, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100,
                "weight_decay": 0.01, "eval_interval": 100, "log_interval": 10, "save_interval": 100_000},
    "lm": {"max_steps": 500, "lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 50, "eval_interval": 50,
           "log_interval": 10, "save_interval": 100_000},
}
# Small labelled sets overfit fast (a passage's character names identify its play): finetune with
# dropout, as BERT did, even where pretraining had none. Only dropout may differ from the base model.
FINETUNE_DROPOUT: dict[str, float | None] = {"classify": 0.1, "instruct": 0.1, "chat": 0.1, "seq2seq": 0.1,
                                             "lm": None}
VAL_FRACTION = 0.1  # held back for validation when no --val file is given


@dataclass(frozen=True)
class FinetuneSpec:
    """The inputs of a finetuning run; saved in its checkpoints so that --resume can rebuild it."""

    task: Task
    data: str
    base: str  # the pretrained checkpoint folder
    val: str | None = None
    scratch: bool = False  # a baseline: the base's shape and tokenizer, but freshly initialised weights
    chat_template: str | None = None  # chat: a Jinja template file instead of the tokenizer's own


@exclusive
def finetune(project: Project, spec: FinetuneSpec, *, config_file: Path | None = None, sets: tuple[str, ...] = (),
             flags: dict[str, Any] | None = None, merge: bool = False, continue_interrupted: bool = False,
             log: Log = lambda _: None, progress: Callable[[Progress], None] | None = None) -> TrainResult:
    """Finetune the checkpoint SPEC.base on SPEC.data for SPEC.task in a new run of PROJECT.

    CONTINUE_INTERRUPTED: when the project's latest run is this same finetune (spec, config and
    data files unchanged) stopped before its end, resume it instead of starting over.

    Raises:
        CheckpointError: the base checkpoint does not suit the task.
        DataError, ConfigError: bad task data or settings.
    """
    base = checkpoint.Checkpoint(Path(spec.base))
    if spec.task not in ARCHS[base.config.model.arch].tasks:
        able = [arch.name for arch in ARCHS.values() if spec.task in arch.tasks]
        raise CheckpointError(f"{base.path} is a {base.config.model.arch} checkpoint; 'lmkit finetune --task "
                              f"{spec.task}' needs a {', '.join(able[:-1]) + ' or ' if able[1:] else ''}{able[-1]} one")
    if base.task != "lm" and (base.task != spec.task or spec.task in TASKS_WITH_HEADS):
        base.require_task("lm", "finetune")  # a finetuned rewriter may learn more pairs; a classifier is final
    dropout = FINETUNE_DROPOUT[spec.task]
    model_defaults = base.config.model if dropout is None else dataclasses.replace(base.config.model, dropout=dropout)
    defaults = dataclasses.replace(base.config, model=model_defaults, train=TrainConfig(**FINETUNE_TRAIN[spec.task]))
    cfg = resolve(project_file=project.config_file, config_file=config_file, sets=sets, flags=flags, base=defaults)
    if dataclasses.replace(cfg.model, dropout=base.config.model.dropout, pooling=base.config.model.pooling) \
            != base.config.model:
        raise ConfigError("a finetune keeps the pretrained model's shape; only model.dropout and model.pooling "
                          "may change")
    if merge and not cfg.lora.rank:
        raise ConfigError("--merge folds LoRA adapters into the weights; it needs --lora-rank")
    if spec.chat_template and spec.task != "chat":
        raise ConfigError("--chat-template applies to --task chat")
    if spec.scratch and cfg.lora.rank:
        raise ConfigError("--scratch trains every weight from a fresh start; LoRA on frozen random weights "
                          "would learn next to nothing, so leave out --lora-rank")
    if continue_interrupted:
        sources = corpus.fingerprint(corpus.check_files(_files(spec)))
        interrupted = interrupted_run(project, cfg, "finetune", lambda ck: ck.meta["finetune"] == dataclasses.asdict(
            spec) and ck.meta.get("data", {}).get("sources") == sources)
        if interrupted:
            log(f"continuing the interrupted run with the same data and config from {interrupted} "
                "(--new-run starts over)")
            return resume(project, interrupted, merge=merge, log=log, progress=progress)
    project.require_tokenizer(base.tokenizer_fingerprint, f"the base checkpoint {base.path}")
    tokenizer = base.tokenizer()
    if spec.chat_template:  # it travels in the checkpoints, with the tokenizer
        tokenizer = tokenizer.with_chat_template(chat.load_template(Path(spec.chat_template)))
    world, device = distributed.setup(pick_device(cfg.train.device))
    distributed.check_batch(cfg.train.batch_size, world)
    log = log if world.is_main else silent
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device) if spec.scratch else base.model(device, model_config=cfg.model)
    plan = distributed.main_first(world, lambda: task_plan(project, spec, cfg, tokenizer))
    if spec.task == "classify":
        model = SequenceClassifier(model, len(plan.meta["labels"])).to(device)
    if cfg.lora.rank:
        lora.add_adapters(model, cfg.lora)
        plan.adapters_only = True
        plan.meta["base"] = {"path": str(base.path.resolve()), "weights": base.weights_fingerprint()}
    trainable = count_parameters(model, trainable_only=True)
    run = start_run(project, cfg, world)
    start = f"a fresh {cfg.model.arch} shaped like {base.path}" if spec.scratch else str(base.path)
    log(f"{run}: finetuning {start} for {spec.task}; trainable parameters {trainable:,} of "
        f"{count_parameters(model):,} ({trainable / count_parameters(model):.2%}) on {device}")
    if "chat" in plan.meta:
        log(chat_summary(plan.meta["chat"], cfg.model.max_seq_len))
    result = run_training(project, run, cfg, model, tokenizer, plan, state=TrainState(), snapshot=None,
                          device=device, progress=progress)
    if merge:
        _merge_at_end(project, result, world, log)
    return result


@exclusive
def resume(project: Project, checkpoint_path: Path | None = None, *, max_steps: int | None = None,
           command: CommandLine | None = None, given: dict[str, Any] | None = None, merge: bool = False,
           progress: Callable[[Progress], None] | None = None, log: Log = lambda _: None) -> TrainResult:
    """Continue an interrupted finetuning run (default: the project's latest checkpoint) exactly.
    COMMAND and GIVEN (FinetuneSpec fields; None: not given), the rest of the command line, must
    agree with the run; only its length (MAX_STEPS) may change. MERGE as for finetune."""
    ckpt, snapshot = checkpoint.resumable(checkpoint_path, project, log)
    if "finetune" not in ckpt.meta:
        raise CheckpointError(f"{ckpt.path} is not a resumable finetuning checkpoint")
    spec = FinetuneSpec(**ckpt.meta["finetune"])
    refuse_changes(ckpt, command, {k: (v, getattr(spec, k)) for k, v in (given or {}).items()}, ("train.max_steps",))
    if merge and not ckpt.config.lora.rank:
        raise ConfigError("--merge folds LoRA adapters into the weights; this run has none")
    cfg, state = continuation(ckpt, snapshot, max_steps=max_steps)
    world, device = distributed.setup(pick_device(cfg.train.device))
    log = log if world.is_main else silent
    model = ckpt.model(device)
    tokenizer = ckpt.tokenizer()
    plan = distributed.main_first(world, lambda: task_plan(project, spec, cfg, tokenizer))
    if plan.meta.get("data") != ckpt.meta.get("data"):
        raise DataError(f"the finetuning data of {ckpt.run} changed since it started, so it cannot resume exactly")
    if cfg.lora.rank:
        plan.adapters_only, plan.meta["base"] = True, ckpt.meta["base"]
    if world.is_main:
        truncate_metrics(project.metrics_file(ckpt.run), state.step)
    log(f"resuming {ckpt.run} from step {state.step} ({ckpt.path})")
    result = run_training(project, ckpt.run, cfg, model, tokenizer, plan, state=state, snapshot=snapshot,
                          device=device, progress=progress)
    if merge:
        _merge_at_end(project, result, world, log)
    return result


def _merge_at_end(project: Project, result: TrainResult, world: distributed.World, log: Log) -> None:
    """--merge: a finished LoRA run's best checkpoint, merged, becomes the project's latest."""
    if result.outcome.stopped_by is None and world.is_main:
        merged = merge_checkpoint(result.outcome.best_checkpoint or result.outcome.checkpoint,
                                  project.checkpoints_dir / result.run / "merged", force=True,  # the run's own folder
                                  moving_latest=True)
        checkpoint.set_latest(project, merged)
        log(f"merged the adapters into {merged}")


def merge_checkpoint(adapter_path: Path, out: Path, force: bool = False, *, moving_latest: bool = False) -> Path:
    """Write a full checkpoint at OUT with the LoRA adapters of ADAPTER_PATH folded into the weights;
    it gives the same outputs and needs neither the base checkpoint nor LoRA code. OUT must be new
    or empty, or with FORCE an lmkit checkpoint that nothing refers to (checkpoint.referrers: not
    the adapters' base, nor the project's latest unless MOVING_LATEST, the caller pointing it anew).
    Holds the lock of the project OUT lies in.

    Raises:
        CheckpointError: ADAPTER_PATH holds no adapters, OUT is ADAPTER_PATH itself, or something
            refers to OUT.
        LmkitError: OUT cannot be written (see fileio.check_target_dir).
    """
    ckpt = checkpoint.Checkpoint(adapter_path)
    if ckpt.meta.get("weights") != "adapters":
        raise CheckpointError(f"{adapter_path} holds full weights already; there is nothing to merge")
    if out.resolve() == ckpt.path.resolve():
        raise CheckpointError(f"{out} is the adapter checkpoint itself; write the merged one somewhere else")
    owner = project_holding(out)
    with owner.lock() if owner else contextlib.nullcontext():
        check_target_dir(out, "checkpoint", checkpoint.is_checkpoint_dir, force)
        if out.exists():
            checkpoint.refuse_referenced(out, ckpt.path, ignore_latest=moving_latest)
        model = lora.merge_adapters(ckpt.model())
        extra = {k: ckpt.meta[k] for k in ("labels", "data", "finetune") if k in ckpt.meta}
        checkpoint.save(out, model=model, config=ckpt.config, tokenizer=ckpt.tokenizer(), run=ckpt.run,
                        step=ckpt.step, metrics=ckpt.meta.get("metrics"), task=ckpt.task,
                        extra={**extra, "merged_from": str(adapter_path)})
    return out


def task_plan(project: Project, spec: FinetuneSpec, cfg: RunConfig, tokenizer: Tokenizer) -> RunPlan:
    """Batches, loss and metrics for SPEC.task; validation from SPEC.val or held back from the data."""
    tcfg = cfg.train
    files = _files(spec)
    meta: dict[str, Any] = {"finetune": dataclasses.asdict(spec), "data": {"sources": corpus.fingerprint(
        corpus.check_files(files))}}
    if spec.task == "lm":
        if spec.val:
            raise ConfigError("--task lm holds back part of DATA for validation (--set data.val_fraction=...); "
                              "leave out --val")
        prepared = prepare.prepare(project, files[:1], tokenizer, cfg.data, dataset="finetune")
        plan = pretraining_plan(cfg, prepared, tokenizer)
        plan.meta, plan.keep_best = meta, True
        return plan
    data = TASK_DATA[spec.task](spec, cfg, tokenizer)
    meta.update(data.meta)
    mean_len = sum(len(r[0]) for r in data.rows) / len(data.rows)
    return RunPlan(tasks.EpochBatches(data.rows, tcfg.batch_size, tcfg.seed, data.collate),
                   tasks.fixed_batches(data.val_rows, tcfg.batch_size, data.collate), data.loss_fn, data.metrics_fn,
                   int(tcfg.batch_size * mean_len), task="lm" if spec.task in LM_TASKS else spec.task,
                   meta=meta, keep_best=True)


@dataclass
class TaskData:
    """A finetuning task's examples, encoded, and how they are batched and scored."""

    rows: list[Any]  # encoded training examples; row[0] is the token ids
    val_rows: list[Any]
    collate: Callable[[Any], Any]  # rows -> a batch
    loss_fn: objectives.LossFn
    metrics_fn: objectives.MetricsFn
    meta: dict[str, Any] = field(default_factory=dict)  # checkpoint metadata (a classifier's labels)


def _classify_data(spec: FinetuneSpec, cfg: RunConfig, tokenizer: Tokenizer) -> TaskData:
    examples = tasks.read_labelled(Path(spec.data))
    train, val = ((examples, tasks.read_labelled(Path(spec.val))) if spec.val
                  else tasks.stratified_split(examples, VAL_FRACTION, cfg.train.seed))
    labels = tasks.label_set(train)
    layout = ARCHS[cfg.model.arch].pair_layout(tokenizer)

    def encode(examples: list[tasks.LabelledText]) -> list[tasks.Encoded]:
        return tasks.encode_labelled(examples, tokenizer, labels, layout, cfg.model.max_seq_len)

    return TaskData(encode(train), encode(val), tasks.collate_labelled(tokenizer.pad_id), objectives.classify_loss,
                    objectives.classify_metrics, {"labels": labels})


def _seq2seq_data(spec: FinetuneSpec, cfg: RunConfig, tokenizer: Tokenizer) -> TaskData:
    pairs, val_pairs = _pairs_and_val(tasks.read_source_targets, spec)
    max_len = cfg.model.max_seq_len
    return TaskData(tasks.encode_source_targets(pairs, tokenizer, max_len),
                    tasks.encode_source_targets(val_pairs, tokenizer, max_len),
                    tasks.collate_source_targets(tokenizer.pad_id, tokenizer.eos_id), objectives.seq2seq_loss,
                    objectives.seq2seq_metrics)


def _instruct_data(spec: FinetuneSpec, cfg: RunConfig, tokenizer: Tokenizer) -> TaskData:
    pairs, val_pairs = _pairs_and_val(tasks.read_prompt_completions, spec)
    max_len = cfg.model.max_seq_len
    return TaskData(tasks.encode_prompt_completions(pairs, tokenizer, max_len),
                    tasks.encode_prompt_completions(val_pairs, tokenizer, max_len),
                    tasks.collate_prompt_completions(tokenizer.pad_id), objectives.causal_lm_loss,
                    objectives.causal_lm_metrics)


def _chat_data(spec: FinetuneSpec, cfg: RunConfig, tokenizer: Tokenizer) -> TaskData:
    conversations, val_conversations = _pairs_and_val(chat.read_conversations, spec)
    form = chat.ChatFormat(tokenizer)
    train, counts = chat.encode_for_training(form, conversations, cfg.model.max_seq_len, str(spec.data))
    val, _ = chat.encode_for_training(form, val_conversations, cfg.model.max_seq_len, str(spec.val or spec.data))
    return TaskData([(e.ids, e.learn) for e in train], [(e.ids, e.learn) for e in val],
                    tasks.collate_learned(tokenizer.pad_id), objectives.causal_lm_loss, objectives.causal_lm_metrics,
                    {"chat": counts})


def chat_summary(counts: dict[str, int], max_len: int) -> str:
    """One line on how the conversations fit the context."""
    cut = [f"{counts[key]:,} {what}" for key, what in (("turns", "cut after their last whole turn that fits"),
                                                        ("mid-turn", "cut inside their first reply"),
                                                        ("dropped", "left out (no reply token fits)")) if counts[key]]
    return (f"{counts['conversations']:,} training conversations, {counts['assistant_tokens']:,} assistant tokens "
            f"to learn; context {max_len}" + (f": {', '.join(cut)}" if cut else ": all fit whole"))


TASK_DATA: dict[str, Callable[[FinetuneSpec, RunConfig, Tokenizer], TaskData]] = {
    "classify": _classify_data, "seq2seq": _seq2seq_data, "instruct": _instruct_data, "chat": _chat_data}


def _files(spec: FinetuneSpec) -> list[Path]:
    return [Path(p) for p in (spec.data, spec.val, spec.chat_template) if p]


def _pairs_and_val(read: Callable[[Path], list], spec: FinetuneSpec) -> tuple[list, list]:
    """(training pairs, validation pairs) read from SPEC.data and SPEC.val, or every tenth pair of
    SPEC.data (in file order) held back when there is no SPEC.val."""
    pairs = read(Path(spec.data))
    if spec.val:
        return pairs, read(Path(spec.val))
    train, val = [p for i, p in enumerate(pairs) if i % 10], pairs[::10]
    if not train or not val:
        raise DataError(f"{spec.data}: too few examples to hold some back for validation; pass --val FILE")
    return train, val
