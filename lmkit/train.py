"""The one training loop and what it keeps between steps (TrainState), the learning-rate schedule,
and `pretrain` / `resume`, which build whatever the project still lacks and run the loop.

The loop: AdamW (weight decay on matrices only), linear warmup then cosine decay, gradient
accumulation, clipping, periodic validation and checkpoints, a time budget, and SIGINT/SIGTERM
handling that saves a checkpoint before stopping. Finetuning and distillation reuse it with their
own model and loss function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmkit import checkpoint, corpus, distributed, prepare
from lmkit import sinks as sinks_lib
from lmkit.batches import to_device
from lmkit.config import CommandLine, ModelConfig, RunConfig, TrainConfig, write_template
from lmkit.device import autocast, grad_scaler, peak_flops, pick_device, remeasure_peak_flops
from lmkit.errors import CheckpointError, ConfigError, DataError, TrainingError
from lmkit.fileio import append_text, atomic_write_bytes, atomic_write_json, naming
from lmkit.models import ARCHS, build_model, count_parameters
from lmkit.objectives import Batch, LossFn, MetricsFn
from lmkit.optim import make_optimizer
from lmkit.project import Project, exclusive
from lmkit.tokenizer import Tokenizer, train_tokenizer

Log = Callable[[str], None]


@dataclass
class TrainState:
    """Counters that survive a resume; saved in every checkpoint instead of being re-derived."""

    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0
    best: float | None = None  # best value of train.best_metric so far
    best_step: int = 0  # the step that reached it
    evals_since_best: int = 0  # validations without improvement (for train.patience)
    elapsed: float = 0.0  # seconds spent training, across resumes (for the time budget)

    def improved(self, metrics: dict[str, float], cfg: TrainConfig) -> bool:
        """Record a validation; True when cfg.best_metric beat its best so far."""
        if cfg.best_metric not in metrics:
            raise ConfigError(f"train.best_metric={cfg.best_metric!r} is not measured here; "
                              f"choose one of: {', '.join(metrics)}")
        value, lower_is_better = metrics[cfg.best_metric], cfg.best_metric.endswith("loss")
        better = self.best is None or (value < self.best if lower_is_better else value > self.best)
        if better:
            self.best, self.best_step, self.evals_since_best = value, self.step, 0
        else:
            self.evals_since_best += 1
        return better


@dataclass(frozen=True)
class Progress:
    """What the loop reports after a step; `validation` is set only right after a validation."""

    step: int
    max_steps: int
    loss: float
    lr: float
    tokens_per_sec: float
    elapsed: float
    eta: float
    validation: dict[str, float] | None = None  # val_loss and any other metrics of the objective
    mfu: float | None = None  # model FLOPs utilization: achieved / the device's peak (lmkit.device.peak_flops)

    @property
    def val_loss(self) -> float | None:
        return self.validation["val_loss"] if self.validation else None


@dataclass(frozen=True)
class LoopOutcome:
    checkpoint: Path  # the last one saved
    train_loss: float  # at the last logged step
    validation: dict[str, float]  # the last validation's metrics
    tokens_per_sec: float  # over this session's steps
    stopped_by: int | None  # signal number when interrupted (SIGINT, SIGTERM)
    best_checkpoint: Path | None = None  # when the run keeps its best one

    @property
    def val_loss(self) -> float | None:
        return self.validation.get("val_loss")


@dataclass(frozen=True)
class TrainResult:
    run: str
    state: TrainState
    outcome: LoopOutcome
    parameters: int
    best_metric: str | None = None  # what outcome.best_checkpoint is best at, when the run keeps one

    def to_dict(self) -> dict[str, object]:
        best = self.outcome.best_checkpoint
        return {"run": self.run, "checkpoint": str(self.outcome.checkpoint), "step": self.state.step,
                "tokens": self.state.tokens_seen, "train_loss": self.outcome.train_loss, **self.outcome.validation,
                "best_metric": self.best_metric, "best": self.state.best, "best_step": self.state.best_step,
                "best_checkpoint": str(best) if best else None,
                "elapsed": round(self.state.elapsed, 2), "tokens_per_sec": round(self.outcome.tokens_per_sec, 1),
                "parameters": self.parameters, "interrupted": self.outcome.stopped_by is not None}


def learning_rate(step: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at the end of the run.

    The end is max_steps, or the time budget if that comes first (then the decay follows the clock).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.time_budget:
        progress = max(progress, elapsed / cfg.time_budget)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - cfg.min_lr)


@torch.no_grad()
def validate(model: nn.Module, batches: list[Batch], metrics_fn: MetricsFn, device: torch.device,
             precision: str) -> dict[str, float]:
    """METRICS_FN over fixed batches, in eval mode (no dropout), restoring the previous mode."""
    was_training = model.training
    model.eval()
    with autocast(device, precision):
        metrics = metrics_fn(model, [to_device(batch, device) for batch in batches])
    model.train(was_training)
    return metrics


@contextlib.contextmanager
def _stop_signals() -> Iterator[dict[str, int | None]]:
    """Turn the first SIGINT/SIGTERM into a request to stop after the current step (a second
    SIGINT interrupts at once; atomic writes keep the last complete checkpoint intact)."""
    request: dict[str, int | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: object) -> None:
        request["signal"] = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def train_loop(
    model: nn.Module,
    batches: Iterator[Batch],
    loss_fn: LossFn,
    cfg: TrainConfig,
    *,
    state: TrainState,
    optimizer: torch.optim.Optimizer,
    tokens_per_batch: int,
    validate: Callable[[], dict[str, float]],
    save: Callable[[TrainState, dict[str, float]], Path],
    metrics_file: Path,
    device: torch.device,
    progress: Callable[[Progress], None] | None = None,
    save_best: Callable[[TrainState, dict[str, float]], Path] | None = None,
    world: distributed.World = distributed.World(),
    scaler: torch.amp.GradScaler | None = None,
    also_log: Callable[[dict[str, Any]], None] | None = None,
    step_metrics: Callable[[], dict[str, float]] | None = None,
) -> LoopOutcome:
    """Train until max_steps, the time budget, early stopping or a stop signal; save a checkpoint
    at the end. With several ranks (WORLD), they stop together and rank 0 alone writes.

    Args:
        batches: endless micro-batches (tuples of CPU tensors).
        tokens_per_batch: tokens in one micro-batch, for throughput figures.
        validate: validation metrics of the current model, "val_loss" among them.
        save: writes a checkpoint of the current state (with the latest metrics) and returns its folder.
        save_best: writes the run's best checkpoint, called when cfg.best_metric improves.
        scaler: the gradient scaler of fp16 training (its state belongs in the checkpoints too).
        also_log: gets each metrics row too (TensorBoard, W&B: lmkit.sinks).
        step_metrics: more training metrics for each row (this rank's, over the steps since the last row).
    """
    model.train()
    if not world.is_main:
        progress, metrics_file, also_log = None, Path(os.devnull), None
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = tokens_per_batch * cfg.grad_accum
    count = _train_flops(model)
    peak = peak_flops(device) if count and world.is_main else 0.0  # MFU: of this rank's device, from its batches
    if peak:
        batches = tally = _FlopTally(batches, count)
    remeasured = False
    start, start_step, elapsed_before = time.perf_counter(), state.step, state.elapsed
    interval_start, interval_tokens = start, 0
    latest: dict[str, float] = {}  # train_loss and validation metrics as last measured
    best_path = None
    with _stop_signals() as stop, append_text(metrics_file) as metrics:
        finished = _finished(state, cfg)
        # The signal the ranks agreed to stop on. Only this decides: the handler may set
        # stop["signal"] at any bytecode (on one rank, after the vote), and a rank acting on that
        # alone would leave the others waiting in a collective; a signal after the vote counts at
        # the next one. One process has no one to agree with: it stops after the step in progress.
        stopping: int | None = None
        while not finished:
            if not world.enabled:
                stopping = stopping or stop["signal"]
            if stopping:
                break
            lr = learning_rate(state.step, cfg, state.elapsed)
            step_loss, grad_norm = _optimizer_step(model, params, batches, loss_fn, optimizer, lr, cfg, device, scaler,
                                                   world)
            state.step += 1
            state.tokens_seen += tokens_per_step
            state.elapsed = elapsed_before + time.perf_counter() - start
            interval_tokens += tokens_per_step
            finished, stopping = distributed.agree(world, _finished(state, cfg), stop["signal"])
            evaluating = state.step % cfg.eval_interval == 0 or finished
            saving = state.step % cfg.save_interval == 0 and not finished and not stopping
            if not (evaluating or finished or saving or stopping or state.step % cfg.log_interval == 0):
                continue

            # The one host sync per log interval (plus, with several ranks, the sum of their shares).
            latest["train_loss"] = distributed.total(world, step_loss).item()
            writes = saving or evaluating or finished or bool(stopping)  # a checkpoint may follow
            loss_ok = math.isfinite(latest["train_loss"])
            if not (loss_ok and (not writes or _all_finite(params, world))):
                # before anything is saved: the checkpoints already written stay finite
                what = "weights became NaN or inf" if loss_ok else f"loss became {latest['train_loss']}"
                raise TrainingError(f"the training {what} by step {state.step}: the run diverged (lower train.lr, "
                                    "raise train.warmup_steps, or use fp32); nothing of it after the last "
                                    "checkpoint was saved")
            now = time.perf_counter()
            norm = float(grad_norm)
            record = {"step": state.step, "loss": latest["train_loss"], "lr": lr, "tokens": state.tokens_seen,
                      "elapsed": round(state.elapsed, 3),
                      "tokens_per_sec": round(interval_tokens / max(now - interval_start, 1e-9), 1),
                      "grad_norm": round(norm, 6) if math.isfinite(norm) else None,  # before clipping
                      "peak_memory_mb": round(peak_memory_mb(device), 1), **(step_metrics() if step_metrics else {})}
            if peak:
                achieved = tally.take() / max(now - interval_start, 1e-9)
                if achieved > peak and not remeasured:  # the peak may have been measured on a busy machine
                    peak, remeasured = remeasure_peak_flops(device), True
                record["mfu"] = round(min(achieved / peak, 1.0), 4)
            if evaluating:
                val_metrics = validate()
                record.update(val_metrics)
                latest.update(val_metrics)
                if state.improved(val_metrics, cfg) and save_best:
                    best_path = save_best(state, dict(latest))
                finished = finished or bool(cfg.patience and state.evals_since_best >= cfg.patience)
            with naming(metrics_file):
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if also_log:
                also_log(record)
            if progress:
                eta = (cfg.max_steps - state.step) * (now - start) / (state.step - start_step)
                if cfg.time_budget:
                    eta = min(eta, cfg.time_budget - state.elapsed)
                progress(Progress(state.step, cfg.max_steps, record["loss"], lr, record["tokens_per_sec"],
                                  state.elapsed, max(eta, 0.0), val_metrics if evaluating else None,
                                  record.get("mfu")))
            interval_start, interval_tokens = time.perf_counter(), 0
            if saving:
                save(state, dict(latest))
        last_checkpoint = save(state, dict(latest))
    rate = (state.step - start_step) * tokens_per_step / max(time.perf_counter() - start, 1e-9)
    validation = {k: v for k, v in latest.items() if k.startswith("val_")}
    return LoopOutcome(last_checkpoint, latest.get("train_loss", math.nan), validation, rate, stopping,
                       best_path)


def _all_finite(params: list[nn.Parameter], world: distributed.World) -> bool:
    """Whether every weight is a finite number, on every rank (FSDP: each rank checks its shards)."""
    local = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in params)
    return not distributed.total(world, torch.tensor(float(not local))).item()


def _finished(state: TrainState, cfg: TrainConfig) -> bool:
    """max_steps reached, time budget spent, or no better validation for cfg.patience evaluations."""
    return (state.step >= cfg.max_steps or bool(cfg.time_budget and state.elapsed >= cfg.time_budget)
            or bool(cfg.patience and state.evals_since_best >= cfg.patience))


_NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)  # passes losses and steps through unchanged


def _optimizer_step(model: nn.Module, params: list[nn.Parameter], batches: Iterator[Batch], loss_fn: LossFn,
                    optimizer: torch.optim.Optimizer, lr: float, cfg: TrainConfig, device: torch.device,
                    scaler: torch.amp.GradScaler | None = None,
                    world: distributed.World = distributed.World()) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over cfg.grad_accum micro-batches; returns this rank's share of the step's
    loss (on DEVICE, unsynced; the shares of all ranks add up to the loss of the global batch) and
    the gradient norm before clipping.

    Token-weighted: each loss term is summed over every micro-batch of every rank and divided by
    its units (scored tokens, pairs, examples) in the whole global batch, counted before the first
    forward; so the gradient is the one of the global batch in one piece, however many scored
    tokens each micro-batch holds. With an enabled SCALER (fp16) the loss is scaled up for
    backward and the gradients unscaled before clipping; a step whose gradients overflowed is
    skipped and the scale lowered.
    """
    scaler = scaler or _NO_SCALER
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # train.layer_lr_decay
    micro_batches = [to_device(next(batches), device, non_blocking=True) for _ in range(cfg.grad_accum)]
    units = distributed.total(world, torch.stack([b.loss_units() for b in micro_batches]).sum(0)).clamp(min=1)
    total = torch.zeros((), device=device)
    for micro, batch in enumerate(micro_batches):
        with distributed.no_sync(model, micro < cfg.grad_accum - 1):  # ranks sync on the last micro-batch
            with autocast(device, cfg.precision):
                share = (loss_fn(model, batch) / units).sum()
            # DDP and FSDP average gradients over ranks; times world.size makes that their sum.
            scaler.scale(share * world.size).backward()
        total += share.detach()
    scaler.unscale_(optimizer)
    # the norm before clipping, for the metrics (without train.grad_clip nothing is clipped: max_norm inf)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm.detach()


def _train_flops(model: nn.Module) -> Callable[[Batch], float] | None:
    """The training FLOPs of a batch (its architecture's Arch.train_flops) for the lmkit model inside
    any wrapper (DDP, FSDP, torch.compile, a classifier); None for a model that is not lmkit's."""
    inner = model
    while not hasattr(inner, "config") and hasattr(inner, "module"):
        inner = inner.module
    config = getattr(inner, "config", None)
    if not isinstance(config, ModelConfig):
        return None
    return lambda batch: ARCHS[config.arch].train_flops(config, batch)


class _FlopTally:
    """BATCHES, adding up the training FLOPs (COUNT) of each one drawn: the work of the real tokens
    processed since the last take(), for MFU. The batches are still on the CPU: no device sync."""

    def __init__(self, batches: Iterator[Batch], count: Callable[[Batch], float]) -> None:
        self.batches, self.count, self.flops = batches, count, 0.0

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = next(self.batches)
        self.flops += self.count(batch)
        return batch

    def take(self) -> float:
        """The FLOPs since the last take."""
        flops, self.flops = self.flops, 0.0
        return flops


def peak_memory_mb(device: torch.device) -> float:
    """The most memory this process has held: CUDA's allocator peak on a GPU, else the process's
    peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


# --- pretraining: build what is missing, then train ---------------------------------------------

def ensure_tokenizer(project: Project, corpora: list[Path], cfg: RunConfig, log: Log) -> Tokenizer:
    """The project's tokenizer, trained on CORPORA first if the project has none."""
    if project.has_tokenizer():
        tokenizer = Tokenizer.load(project.tokenizer_model)
        log(f"using the project's tokenizer: {tokenizer.vocab_size} pieces, fingerprint {tokenizer.fingerprint} "
            "(tokenizer settings apply only to a new one: 'lmkit tokenize train --force')")
        return tokenizer
    if not corpora:
        raise DataError(f"no tokenizer in {project.root} and no corpus to train one; "
                        f"run 'lmkit pretrain CORPUS -p {project.root}'")
    log(f"training a {cfg.tokenizer.model_type} tokenizer (vocab {cfg.tokenizer.vocab_size}) on "
        f"{', '.join(map(str, corpora))}")
    tokenizer = train_tokenizer(corpus.iter_documents(corpora, cfg.data.text_field), project.tokenizer_model,
                                cfg.tokenizer)
    log(f"tokenizer: {tokenizer.vocab_size} pieces, fingerprint {tokenizer.fingerprint}")
    return tokenizer


def ensure_data(project: Project, corpora: list[Path], tokenizer: Tokenizer, cfg: RunConfig, log: Log,
                progress: Callable[[int, int], None] | None = None) -> prepare.PreparedData:
    """Prepared train/val token files for CORPORA (re-used when up to date), or the project's own."""
    if corpora:
        prepared = prepare.prepare(project, corpora, tokenizer, cfg.data, progress=progress)
        verb = "using prepared" if prepared.reused else "prepared"
    else:
        found = prepare.load_prepared(project, tokenizer)
        if found is None:
            raise DataError(f"no prepared data for this tokenizer in {project.root}; pass the corpus: "
                            f"'lmkit pretrain CORPUS -p {project.root}'")
        prepared, verb = found, "using prepared"
    log(f"{verb} data: {prepared.train.tokens:,} train / {prepared.val.tokens:,} val tokens")
    return prepared


def silent(message: str) -> None:
    """The log of ranks other than 0."""


def start_run(project: Project, cfg: RunConfig, world: distributed.World) -> str:
    """A new run in PROJECT, named by rank 0 (which writes its folder and config) for every rank.
    (What killed runs left behind went when the project's lock was taken: Project.clean_leftovers.)"""
    run = distributed.broadcast(world, project.new_run_name() if world.is_main else None)
    if world.is_main:
        project.run_dir(run).mkdir(parents=True, exist_ok=True)
        atomic_write_json(project.run_config_file(run), cfg.to_dict())
    return run


@exclusive
def pretrain(project: Project, corpora: list[Path], cfg: RunConfig, *, continue_interrupted: bool = False,
             log: Log = lambda _: None, progress: Callable[[Progress], None] | None = None,
             prepare_progress: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train a new model from scratch on CORPORA (or the project's prepared data) with CFG.

    Trains the tokenizer and prepares the data first when the project lacks them.
    CONTINUE_INTERRUPTED: when the project's latest run is a pretraining with this config on these
    corpora that stopped before its end, resume it instead of starting over.
    """
    if continue_interrupted:
        interrupted = interrupted_run(project, cfg, "pretrain", same_corpus(corpora))
        if interrupted:
            log(f"continuing the interrupted run with the same config from {interrupted} (--new-run starts over)")
            return resume(project, interrupted, log=log, progress=progress)
    corpora = corpus.corpus_files(corpora) if corpora else []
    world, device = distributed.setup(pick_device(cfg.train.device))
    distributed.check_batch(cfg.train.batch_size, world)
    log = log if world.is_main else silent

    def build_tokenizer() -> Tokenizer:
        write_template(project.config_file)
        return ensure_tokenizer(project, corpora, cfg, log)

    tokenizer = distributed.main_first(world, build_tokenizer)
    prepared = distributed.main_first(world, lambda: ensure_data(project, corpora, tokenizer, cfg, log,
                                                                 prepare_progress))
    cfg = cfg.with_vocab_size(tokenizer.vocab_size)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    run = start_run(project, cfg, world)
    log(f"{run}: {cfg.model.arch} with {count_parameters(model):,} parameters on {device}, "
        f"{cfg.train.max_steps} steps of {cfg.train.tokens_per_step * cfg.model.max_seq_len:,} tokens")
    return run_training(project, run, cfg, model, tokenizer, pretraining_plan(cfg, prepared, tokenizer),
                        state=TrainState(), snapshot=None, device=device, progress=progress)


def run_kind(ckpt: checkpoint.Checkpoint) -> str:
    """Which command trained CKPT: "finetune", "distill" or "pretrain"."""
    return next((kind for kind in ("finetune", "distill") if kind in ckpt.meta), "pretrain")


def interrupted_run(project: Project, cfg: RunConfig, kind: str,
                    same_inputs: Callable[[checkpoint.Checkpoint], bool]) -> Path | None:
    """The project's latest checkpoint when it is a run of KIND ("pretrain", "finetune", "distill")
    that stopped before its end (Ctrl-C, SIGTERM, a crash after a periodic save) and was started
    with CFG on inputs SAME_INPUTS accepts: running the same command again should continue that
    run rather than start another."""
    try:
        ckpt = checkpoint.Checkpoint(project.latest_checkpoint())
        steps = project.run_checkpoints(ckpt.run)  # latest may name the run's best, not where it ended
        if steps and steps[-1] != ckpt.path and checkpoint.Checkpoint(steps[-1]).step > ckpt.step:
            ckpt = checkpoint.Checkpoint(steps[-1])
        snapshot = ckpt.trainer()
    except CheckpointError:
        return None
    if snapshot is None or run_kind(ckpt) != kind or _finished(TrainState(**snapshot.state), ckpt.config.train):
        return None
    if ckpt.config != cfg.with_vocab_size(ckpt.config.model.vocab_size) or not same_inputs(ckpt):
        return None
    return ckpt.path


def same_corpus(corpora: list[Path]) -> Callable[[checkpoint.Checkpoint], bool]:
    """For interrupted_run: a pretraining checkpoint of CORPORA (any, when none are named: the
    project's prepared data)."""
    sources = corpus.fingerprint(corpus.corpus_files(corpora)) if corpora else None
    return lambda ckpt: sources is None or ckpt.meta.get("data", {}).get("sources") == sources


def continuation(ckpt: checkpoint.Checkpoint, snapshot: checkpoint.TrainerSnapshot, *, max_steps: int | None = None,
                 time_budget: float | None = None) -> tuple[RunConfig, TrainState]:
    """The config and state a resumed run goes on with: the checkpoint's, with only the run's
    length changed (MAX_STEPS, TIME_BUDGET) when given.

    Raises:
        ConfigError: the run is already at its max_steps.
    """
    train_cfg = ckpt.config.train
    if max_steps is not None:
        train_cfg = dataclasses.replace(train_cfg, max_steps=max_steps)
    if time_budget is not None:
        train_cfg = dataclasses.replace(train_cfg, time_budget=time_budget)
    state = TrainState(**snapshot.state)
    if state.step >= train_cfg.max_steps:
        raise ConfigError(f"{ckpt.path} is at step {state.step}, already at max_steps={train_cfg.max_steps}; "
                          "pass a larger --max-steps to train further")
    return dataclasses.replace(ckpt.config, train=train_cfg), state


def refuse_changes(ckpt: checkpoint.Checkpoint, command: CommandLine | None,
                   given: dict[str, tuple[Any, Any]], may_change: tuple[str, ...]) -> None:
    """--resume with the run's own command line is fine (people append --resume to what they ran);
    a setting that differs from the saved run is refused, named with its old and new value.

    Args:
        command: the settings given on the command line (None: none).
        given: {name: (as given, as the run saved it)} for the run's inputs (data files, base,
            teacher); a None given value was not given.
        may_change: dotted keys of settings that may change (the run's length).
    """
    changes = command.changes_to(ckpt.config, may_change) if command else []
    changes += [f"{key}: {old!r} -> {new!r}" for key, (new, old) in given.items() if new is not None and new != old]
    if changes:
        allowed = " and ".join("--" + key.rpartition(".")[2].replace("_", "-") for key in may_change)
        raise ConfigError(f"--resume continues {ckpt.run} as it was saved, but this command line changes "
                          f"{'; '.join(changes)}; only {allowed} may change (leave out --resume for a new run)")


@exclusive
def resume(project: Project, checkpoint_path: Path | None = None, *, max_steps: int | None = None,
           time_budget: float | None = None, command: CommandLine | None = None, corpora: list[Path] | None = None,
           log: Log = lambda _: None, progress: Callable[[Progress], None] | None = None) -> TrainResult:
    """Continue a run from its checkpoint (default: the project's latest) exactly where it stopped.

    Only the run's length may change (MAX_STEPS, TIME_BUDGET); everything else comes from the
    checkpoint. COMMAND and CORPORA, the rest of the command line, must agree with the run.
    """
    ckpt, snapshot = checkpoint.resumable(checkpoint_path, project, log)
    saved = ckpt.meta.get("data", {}).get("sources") or []
    given = corpus.fingerprint(corpus.corpus_files(corpora)) if corpora else None
    if given is not None and [f["path"] for f in given] == [f["path"] for f in saved] and given != saved:
        raise DataError(f"the corpus files of {ckpt.run} changed since it started, so it cannot resume exactly")
    refuse_changes(ckpt, command, {"corpora": ([f["path"] for f in given] if given else None,
                                               [f["path"] for f in saved])}, ("train.max_steps", "train.time_budget"))
    cfg, state = continuation(ckpt, snapshot, max_steps=max_steps, time_budget=time_budget)
    tokenizer = ckpt.tokenizer()
    project.require_tokenizer(tokenizer.fingerprint, f"the checkpoint {ckpt.path}")
    prepared = prepare.load_prepared(project, tokenizer)
    if prepared is None:
        raise DataError(f"{project.root} has no data prepared with tokenizer {tokenizer.fingerprint}; "
                        "re-run 'lmkit tokenize prepare CORPUS' with the original corpus")
    if ckpt.meta.get("data") and ckpt.meta["data"] != _data_identity(prepared):
        raise DataError(f"the data prepared in {project.root} changed since {ckpt.run} started, so it cannot resume "
                        "exactly; prepare the original corpus again, or start a new run")
    world, device = distributed.setup(pick_device(cfg.train.device))
    log = log if world.is_main else silent
    model = ckpt.model(device)
    if world.is_main:
        truncate_metrics(project.metrics_file(ckpt.run), state.step)
    log(f"resuming {ckpt.run} from step {state.step} ({ckpt.path})")
    return run_training(project, ckpt.run, cfg, model, tokenizer, pretraining_plan(cfg, prepared, tokenizer),
                        state=state, snapshot=snapshot, device=device, progress=progress)


@dataclass
class RunPlan:
    """What a run trains on and how it is scored, besides the model: all that differs between
    pretraining GPT or BERT, finetuning a classifier, or instruction tuning."""

    batches: Any  # endless training batches, with state_dict() / load_state_dict() for exact resume
    val_batches: list[Batch]
    loss_fn: LossFn
    metrics_fn: MetricsFn
    tokens_per_batch: int
    task: str = "lm"
    meta: dict[str, Any] = field(default_factory=dict)  # more checkpoint metadata (labels, base, data)
    adapters_only: bool = False  # LoRA: checkpoints hold the trainable parameters only
    keep_best: bool = False  # keep checkpoints/<run>/best by train.best_metric; it is the result
    val_bytes_per_token: float | None = None  # a decoder on text: val_loss also as bits per byte
    summary: str | None = None  # one line for the log on the task's examples
    step_metrics: Callable[[], dict[str, float]] | None = None  # more of each metrics row, since the last
    unused_parameters: bool = False  # the model has parameters the task never uses (a classifier's LM head)


def run_training(project: Project, run: str, cfg: RunConfig, model: nn.Module, tokenizer: Tokenizer, plan: RunPlan,
                 *, state: TrainState, snapshot: checkpoint.TrainerSnapshot | None, device: torch.device,
                 progress: Callable[[Progress], None] | None) -> TrainResult:
    """Run the loop for PLAN with checkpoints in PROJECT; restore SNAPSHOT first when resuming."""
    tcfg = cfg.train
    world = distributed.from_env()
    for module in model.modules():  # the backbone of a classifier too
        if hasattr(module, "grad_checkpoint"):
            module.grad_checkpoint = tcfg.grad_checkpoint
    # DDP wraps the model; FSDP shards it in place (so `model` itself is then sharded too).
    train_model = distributed.wrap(model, world, tcfg.strategy, unused_parameters=plan.unused_parameters)
    optimizer = make_optimizer(model, tcfg)
    scaler = grad_scaler(device, tcfg.precision)
    if snapshot is not None:
        distributed.load_optimizer_state(model, optimizer, snapshot.optimizer)
        plan.batches.load_state_dict(snapshot.sampler)
        _set_rng_state(snapshot.rng)
        if snapshot.scaler:
            scaler.load_state_dict(snapshot.scaler)
    if tcfg.compile:
        train_model = torch.compile(train_model)

    def write(path: Path, st: TrainState, metrics: dict[str, float]) -> Path:
        # Sharded weights and optimizer state are gathered by all ranks together, onto rank 0.
        weights, optimizer_state = distributed.model_state(model), distributed.optimizer_state(model, optimizer)
        if not world.is_main:
            return path
        trainer = checkpoint.TrainerSnapshot(dataclasses.asdict(st), optimizer_state, _rng_state(),
                                             plan.batches.state_dict(), scaler.state_dict())
        checkpoint.save(path, model=model, config=cfg, tokenizer=tokenizer, run=run, step=st.step, metrics=metrics,
                        trainer=trainer, task=plan.task, extra=plan.meta, adapters_only=plan.adapters_only,
                        weights=weights)
        return path

    def save(st: TrainState, metrics: dict[str, float]) -> Path:
        path = write(project.checkpoint_dir(run, st.step), st, metrics)
        if world.is_main:
            checkpoint.set_latest(project, path)
            checkpoint.prune(project, run, tcfg.keep_checkpoints)
        return path

    # Each rank scores its share of the validation batches (all of them when there are fewer than
    # ranks, or, with FSDP, whose forward is collective, when they do not divide evenly); the metrics
    # are averaged over ranks. The unwrapped model: same weights, its own methods.
    val = plan.val_batches
    even = len(val) % world.size == 0 if distributed.is_sharded(model) else len(val) >= world.size
    mine = val[world.rank::world.size] if even else val
    scored = model if world.enabled else train_model

    def validation() -> dict[str, float]:
        metrics = validate(scored, mine, plan.metrics_fn, device, tcfg.precision)
        metrics = distributed.mean_metrics(world, metrics, int(sum(b.loss_units()[0] for b in mine)))
        if plan.val_bytes_per_token and "val_loss" in metrics:  # the validation text's average bytes per token
            metrics["val_bits_per_byte"] = metrics["val_loss"] / math.log(2) / plan.val_bytes_per_token
        return metrics

    sinks = sinks_lib.Sinks(tcfg.log_sinks, project.run_dir(run), run, cfg.to_dict()) if tcfg.log and world.is_main \
        else None
    try:
        outcome = train_loop(
            train_model, distributed.batches(plan.batches, world), plan.loss_fn, tcfg, state=state,
            optimizer=optimizer, tokens_per_batch=plan.tokens_per_batch, validate=validation, save=save,
            metrics_file=project.metrics_file(run), device=device, progress=progress,
            save_best=(lambda st, m: write(project.best_checkpoint_dir(run), st, m)) if plan.keep_best else None,
            world=world, scaler=scaler, also_log=sinks.log if sinks else None, step_metrics=plan.step_metrics)
    finally:
        if sinks:
            sinks.close()
    del train_model  # DDP's reducer holds the process group: release it before the group is destroyed
    distributed.finish(world)
    best = project.best_checkpoint_dir(run)
    if plan.keep_best and outcome.stopped_by is None and best.is_dir():  # also when a resumed session found none
        outcome = dataclasses.replace(outcome, best_checkpoint=best)
        if world.is_main:
            checkpoint.set_latest(project, best)  # a finished run's result is its best model
    return TrainResult(run, state, outcome, count_parameters(model), tcfg.best_metric if plan.keep_best else None)


def pretraining_plan(cfg: RunConfig, prepared: prepare.PreparedData, tokenizer: Tokenizer) -> RunPlan:
    """What pretraining means for cfg.model.arch (its objective, batches and metrics), on PREPARED data."""
    objective = ARCHS[cfg.model.arch].pretraining(cfg, prepared.train.array(tokenizer.vocab_size),
                                                   prepared.val.array(tokenizer.vocab_size), tokenizer)
    decoder = ARCHS[cfg.model.arch].decoding == "continue"  # its val_loss is nats per next token
    return RunPlan(objective.batches, objective.val_batches, objective.loss_fn, objective.metrics_fn,
                   objective.tokens_per_batch, meta={"data": _data_identity(prepared)},
                   val_bytes_per_token=prepared.val.bytes_per_token if decoder else None)


def _data_identity(prepared: prepare.PreparedData) -> dict[str, object]:
    meta = prepared.train.meta
    return {"sources": meta["sources"], "train_tokens": meta["tokens"], "val_tokens": prepared.val.tokens}


def _rng_state() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def _set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after STEP (written before a crash, and about to be redone), and any
    line a kill tore in half; the folder is made if a missing runs/ took it along."""
    def logged_by(line: str) -> bool:
        try:
            record = json.loads(line)
        except ValueError:
            return False  # torn by a kill mid-write
        return isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step

    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    kept = [line if line.endswith("\n") else line + "\n" for line in text.splitlines(keepends=True)
            if line.strip() and logged_by(line)]
    atomic_write_bytes(path, "".join(kept).encode("utf-8"))
