"""Finetuning a pretrained checkpoint (transfer learning) for one of the tasks of lmkit.tasks.TASKS
(sequence classification, instruction tuning, chat, source -> target rewriting, more language
modelling, preference tuning) -- with all weights trained, or with LoRA adapters on a frozen
model. Every task runs on the shared loop; what differs by task is the task's record.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmkit import chat, checkpoint, corpus, distributed, finetune_data, lora, prepare
from lmkit.config import CommandLine, ConfigError, RunConfig, TrainConfig, resolve
from lmkit.device import pick_device
from lmkit.errors import CheckpointError, DataError
from lmkit.fileio import check_target_dir
from lmkit.models import ARCHS, build_model, count_parameters
from lmkit.project import Project, exclusive, project_holding
from lmkit.tasks import TASKS, FinetuneSpec, task_of
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

__all__ = ["FinetuneSpec", "finetune", "merge_checkpoint", "resume", "task_plan"]


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
    task = TASKS[spec.task]
    base = checkpoint.Checkpoint(Path(spec.base))
    if spec.task not in ARCHS[base.config.model.arch].tasks:
        able = [arch.name for arch in ARCHS.values() if spec.task in arch.tasks]
        raise CheckpointError(f"{base.path} is a {base.config.model.arch} checkpoint; 'lmkit finetune --task "
                              f"{spec.task}' needs a {', '.join(able[:-1]) + ' or ' if able[1:] else ''}{able[-1]} one")
    if not task_of(base).language_model:  # a classifier is final
        raise CheckpointError(f"{base.path} is a checkpoint for task {base.task!r}; 'lmkit finetune' needs one "
                              "for task 'lm' (a language model: pretrained, or finetuned for text)")
    if task.check:
        task.check(spec)
    model_defaults = base.config.model if task.dropout is None else dataclasses.replace(base.config.model,
                                                                                       dropout=task.dropout)
    defaults = dataclasses.replace(base.config, model=model_defaults, train=TrainConfig(**task.train))
    cfg = resolve(project_file=project.config_file, config_file=config_file, sets=sets, flags=flags, base=defaults)
    if dataclasses.replace(cfg.model, dropout=base.config.model.dropout, pooling=base.config.model.pooling) \
            != base.config.model:
        raise ConfigError("a finetune keeps the pretrained model's shape; only model.dropout and model.pooling "
                          "may change")
    if merge and not cfg.lora.rank:
        raise ConfigError("--merge folds LoRA adapters into the weights; it needs --lora-rank")
    if spec.chat_template and not task.chat_template:
        able = " or ".join(t.name for t in TASKS.values() if t.chat_template)
        raise ConfigError(f"--chat-template applies to --task {able}")
    if spec.scratch and cfg.lora.rank:
        raise ConfigError("--scratch trains every weight from a fresh start; LoRA on frozen random weights "
                          "would learn next to nothing, so leave out --lora-rank")
    if continue_interrupted:
        sources = corpus.fingerprint(corpus.check_files(spec.files()))
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
    plan = distributed.main_first(world, lambda: task_plan(project, spec, cfg, tokenizer, model, device))
    if task.head:
        model = task.head(model, plan.meta)
    if cfg.lora.rank:
        lora.add_adapters(model, cfg.lora)
        plan.adapters_only = True
        plan.meta["base"] = {"path": str(base.path.resolve()), "weights": base.weights_fingerprint()}
    trainable = count_parameters(model, trainable_only=True)
    run = start_run(project, cfg, world)
    start = f"a fresh {cfg.model.arch} shaped like {base.path}" if spec.scratch else str(base.path)
    log(f"{run}: finetuning {start} for {spec.task}; trainable parameters {trainable:,} of "
        f"{count_parameters(model):,} ({trainable / count_parameters(model):.2%}) on {device}")
    if plan.summary:
        log(plan.summary)
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
    # a task with a reference scores it with the starting checkpoint, loaded for that alone
    plan = distributed.main_first(world, lambda: task_plan(project, spec, cfg, tokenizer, _starting_model(
        spec, device), device))
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


def _starting_model(spec: FinetuneSpec, device: torch.device) -> nn.Module | None:
    """The model SPEC's run started from, when its task keeps it as a reference."""
    return checkpoint.Checkpoint(Path(spec.base)).model(device) if TASKS[spec.task].reference else None


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


def task_plan(project: Project, spec: FinetuneSpec, cfg: RunConfig, tokenizer: Tokenizer,
              start: nn.Module | None = None, device: torch.device | None = None) -> RunPlan:
    """Batches, loss and metrics for SPEC.task; validation from SPEC.val or held back from the data.
    START: the model finetuning starts from, for a task that keeps it as its reference (on DEVICE)."""
    task, tcfg = TASKS[spec.task], cfg.train
    meta: dict[str, Any] = {"finetune": dataclasses.asdict(spec), "data": {"sources": corpus.fingerprint(
        corpus.check_files(spec.files()))}}
    if task.data is None:  # text, batched as the architecture pretrains
        if spec.val:
            raise ConfigError(f"--task {spec.task} holds back part of DATA for validation "
                              "(--set data.val_fraction=...); leave out --val")
        prepared = prepare.prepare(project, spec.files()[:1], tokenizer, cfg.data, dataset="finetune")
        plan = pretraining_plan(cfg, prepared, tokenizer)
        plan.meta, plan.keep_best, plan.task = meta, True, spec.task
        return plan
    data = task.data(spec, cfg, tokenizer)
    if task.reference and start is not None:
        data = task.reference(start, data, cfg, device or torch.device("cpu"))
    meta.update(data.meta)
    mean_len = data.tokens_per_row or sum(len(r[0]) for r in data.rows) / len(data.rows)
    return RunPlan(finetune_data.EpochBatches(data.rows, tcfg.batch_size, tcfg.seed, data.collate),
                   finetune_data.fixed_batches(data.val_rows, tcfg.batch_size, data.collate), data.loss_fn,
                   data.metrics_fn, int(tcfg.batch_size * mean_len), task=spec.task, meta=meta, keep_best=True,
                   summary=data.summary, step_metrics=data.step_metrics, unused_parameters=task.unused_parameters)
