"""Knowledge distillation: a small student learns to match a large, frozen teacher.

The student's loss (weights in DistillConfig):
  soft    T^2 * D(teacher || student) on the output distributions at temperature T (Hinton et
          al. 2015; T^2 keeps its gradients on the scale of the hard loss as T changes). D is the
          forward KL, the reverse KL (MiniLLM: the student covers the teacher's main modes rather
          than all of them), or the generalised Jensen-Shannon divergence.
  hard    the student's own task loss: next token (GPT, seq2seq), masked token (BERT), label.
  cosine  1 - cos(student hidden, teacher hidden) on the final hidden states (DistilBERT), when
          the widths match.

Every model kind: GPT on a corpus (token-level), BERT (DistilBERT's triple loss: soft MLM + hard
MLM + cosine), classifiers (class logits), and the encoder-decoder (decoder tokens). The teacher
runs in eval mode under no_grad, its logits computed on the fly for each batch; nothing is cached.
A student of the teacher's width starts from the teacher's embeddings and a subset of its layers
(DistilBERT: every other one); of another width, from random weights.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmkit import checkpoint, corpus, distributed, prepare
from lmkit.batches import IGNORE, Batch, to_device
from lmkit.config import PRESETS, CommandLine, DistillConfig, ModelConfig, RunConfig, resolve
from lmkit.device import autocast, pick_device
from lmkit.errors import CheckpointError, ConfigError, DataError
from lmkit.finetune import FinetuneSpec, task_plan
from lmkit.models import ARCHS, build_model, count_parameters
from lmkit.models.arch import Distillation, Scored
from lmkit.models.heads import SequenceClassifier
from lmkit.project import Project, exclusive
from lmkit.tasks import task_of
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
    run_kind,
    run_training,
    start_run,
    truncate_metrics,
    validate,
)

# --- losses -------------------------------------------------------------------------------------

def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, kind: str = "forward",
                     beta: float = 0.5) -> torch.Tensor:
    """T^2 * D(teacher || student) between the softened distributions of logits (N, K), averaged
    over the N rows. kind: "forward" KL(p_t || p_s), "reverse" KL(p_s || p_t), or "jsd":
    beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    if kind == "forward":
        divergence = (log_t.exp() * (log_t - log_s)).sum(-1)
    elif kind == "reverse":
        divergence = (log_s.exp() * (log_s - log_t)).sum(-1)
    elif kind == "jsd":
        log_m = torch.logsumexp(torch.stack([log_t + torch.log(torch.tensor(beta)),
                                             log_s + torch.log(torch.tensor(1 - beta))]), dim=0)
        divergence = (beta * (log_t.exp() * (log_t - log_m)).sum(-1)
                      + (1 - beta) * (log_s.exp() * (log_s - log_m)).sum(-1))
    else:
        raise ValueError(f"unknown divergence {kind!r}")
    return divergence.mean() * temperature ** 2


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(student_i, teacher_i) over rows of hidden states (N, C)."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


@dataclass
class DistillLoss:
    """loss_fn(student, batch) for the training loop; the teacher rides along, frozen."""

    teacher: nn.Module
    cfg: DistillConfig
    scored: Callable[[nn.Module, Batch], Scored]  # what both models' outputs are compared on
    cosine: bool  # widths match and cosine_weight > 0

    def __call__(self, student: nn.Module, batch: Batch) -> torch.Tensor:
        """Summed losses in the first term of batch.loss_units() (the scored tokens or examples,
        the rows of Scored.logits), zeros for the others (BERT's NSP is not distilled)."""
        s = self.scored(student, batch)
        with torch.no_grad():
            t = self.scored(self.teacher, batch)
        rows = s.logits.size(0)
        loss = torch.zeros((), device=s.logits.device)
        if self.cfg.soft_weight:
            soft = soft_target_loss(s.logits, t.logits, self.cfg.temperature, self.cfg.kl, self.cfg.jsd_beta)
            loss = loss + self.cfg.soft_weight * soft * rows
        if self.cfg.hard_weight and (s.labels != IGNORE).any():
            hard = F.cross_entropy(s.logits.float(), s.labels, ignore_index=IGNORE, reduction="sum")
            loss = loss + self.cfg.hard_weight * hard
        if self.cosine:
            # per hidden row, counted as the scored rows (the same rows but for BERT, whose cosine
            # covers every real token: there it is each micro-batch's mean, weighed by its masked tokens)
            loss = loss + self.cfg.cosine_weight * cosine_loss(s.hidden, t.hidden) * rows
        return torch.cat([loss.reshape(1), loss.new_zeros(len(batch.loss_units()) - 1)])


# --- the student --------------------------------------------------------------------------------

_LAYER = re.compile(r"(^|\.)(h|layers)\.(\d+)\.")  # GPT/seq2seq stacks are .h.N., BERT's .layers.N.


def init_from_teacher(student: nn.Module, teacher: nn.Module, layers: list[int]) -> int:
    """Copy into STUDENT (same width) the teacher's weights: layer i of each stack from teacher
    layer layers[i], everything outside the stacks (embeddings, norms, heads) as is. Returns the
    number of tensors copied."""
    source = teacher.state_dict()
    copied = 0
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            match = _LAYER.search(name)
            origin = name
            if match:
                index = int(match.group(3))
                origin = name[:match.start(3)] + str(layers[index]) + name[match.end(3):]
            if origin in source and source[origin].shape == tensor.shape:
                tensor.copy_(source[origin])
                copied += 1
    return copied


def evenly_spaced(n_student: int, n_teacher: int) -> list[int]:
    """Which teacher layers a shallower student starts from: 0, 2, 4, ... for half the depth."""
    return [round(i * n_teacher / n_student) for i in range(n_student)]


_SHAPE = ("d_model", "n_layer", "n_head", "n_kv_head", "d_ff", "head_dim")  # a student's shape


def student_config(teacher: ModelConfig, preset: str | None, layers: list[int] | None) -> ModelConfig:
    """The teacher's model config with a preset's shape (if given) and len(LAYERS) layers (if given)."""
    cfg = teacher
    if preset:
        if preset not in PRESETS[teacher.arch]:
            raise ConfigError(f"unknown preset {preset!r} for arch {teacher.arch}; "
                              f"choose one of: {', '.join(PRESETS[teacher.arch])}")
        # the shape the preset gives a new model: its own values over the defaults (GPT's "default" is
        # the defaults), so a teacher's other width or depth never carries over
        defaults = ModelConfig()
        shape = {k: getattr(defaults, k) for k in _SHAPE}
        shape.update({k: v for k, v in PRESETS[teacher.arch][preset].get("model", {}).items() if k != "max_seq_len"})
        cfg = dataclasses.replace(cfg, **shape)
    if layers is not None:
        if not layers or any(not 0 <= i < teacher.n_layer for i in layers):
            raise ConfigError(f"--student-layers must name teacher layers 0..{teacher.n_layer - 1}; got {layers}")
        cfg = dataclasses.replace(cfg, n_layer=len(layers))
    return cfg


# --- the run ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistillSpec:
    data: str
    teacher: str  # checkpoint folder
    val: str | None = None
    student: str | None = None  # a checkpoint to start the student from, instead of the teacher's layers
    layers: tuple[int, ...] | None = None  # teacher layers the student starts from
    preset: str | None = None  # the student's shape


@dataclass(frozen=True)
class DistillRequest:
    """The inputs a `lmkit distill` command line names, as given (None: not given). The teacher and
    a --student may be a checkpoint, run or project (see lmkit.checkpoint.resolve)."""

    data: Path | None = None
    teacher: Path | None = None
    val: Path | None = None
    student: Path | None = None
    layers: tuple[int, ...] | None = None
    preset: str | None = None

    def spec(self, project: Project) -> DistillSpec:
        """The new distillation these inputs ask for, its paths resolved in PROJECT.

        Raises:
            ConfigError: the data or the teacher is not given.
            CheckpointError: the teacher or the student is no checkpoint.
        """
        if self.data is None or self.teacher is None:
            raise ConfigError("give the data and the teacher: lmkit distill DATA --teacher CHECKPOINT")
        return DistillSpec(**self._resolved(project), layers=self.layers, preset=self.preset)

    def changes(self, project: Project, saved: DistillSpec) -> dict[str, tuple[Any, Any]]:
        """{field: (as given, as SAVED has it)} of each field given, for train.refuse_changes: what a
        --resume with these inputs would change of the run that SAVED describes."""
        given = {**self._resolved(project), "layers": list(self.layers) if self.layers is not None else None,
                 "preset": self.preset}  # as saved: layers a list
        return {name: (value, getattr(saved, name)) for name, value in given.items() if value is not None}

    def _resolved(self, project: Project) -> dict[str, str | None]:
        """The paths given, absolute (teacher and student: their checkpoint folders), as DistillSpec keeps them."""
        def folder(path: Path | None) -> str | None:
            return str(checkpoint.resolve(path, project).resolve()) if path else None

        return {"data": str(self.data.resolve()) if self.data else None, "teacher": folder(self.teacher),
                "val": str(self.val.resolve()) if self.val else None, "student": folder(self.student)}


@dataclass(frozen=True)
class Summary:
    """Teacher vs student after distillation, measured in the same run on the same validation data."""

    teacher_parameters: int
    student_parameters: int
    teacher_mb: float  # model.safetensors on disk
    student_mb: float
    teacher_speed: float  # inference throughput on the validation batches (unit below)
    student_speed: float
    speed_unit: str  # "tokens/s" or "examples/s"
    metric: str  # the quality measure compared
    teacher_quality: float
    student_quality: float

    @property
    def retention(self) -> float:
        """Student quality as % of the teacher's: accuracy ratio, or teacher loss / student loss."""
        if self.metric.endswith("loss"):
            return 100 * self.teacher_quality / self.student_quality
        return 100 * self.student_quality / self.teacher_quality

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "retention": round(self.retention, 2),
                "parameter_ratio": round(self.student_parameters / self.teacher_parameters, 4),
                "speedup": round(self.student_speed / self.teacher_speed, 3)}


def kind_of(ckpt: checkpoint.Checkpoint) -> tuple[str, str]:
    """(architecture, "classify" or "lm"): a student must be of its teacher's kind."""
    if not task_of(ckpt).distillable:
        raise CheckpointError(f"{ckpt.path} is a checkpoint for task {ckpt.task!r}, which lmkit cannot distill yet")
    return ckpt.config.model.arch, "lm" if task_of(ckpt).language_model else "classify"


def distillation_of(ckpt: checkpoint.Checkpoint) -> Distillation:
    """How the teacher CKPT's kind of model is distilled: any classifier alike, else as its architecture says."""
    return task_of(ckpt).distillation or ARCHS[ckpt.config.model.arch].distillation


def same_width(student: ModelConfig, teacher: ModelConfig) -> bool:
    """Every layer of STUDENT has the shape of the teacher's (only depth, context and dropout may differ),
    so the student can start from the teacher's layers."""
    return dataclasses.replace(student, n_layer=teacher.n_layer, max_seq_len=teacher.max_seq_len,
                               dropout=teacher.dropout) == teacher


@exclusive
def distill(project: Project, spec: DistillSpec, *, config_file: Path | None = None, sets: tuple[str, ...] = (),
            flags: dict[str, Any] | None = None, continue_interrupted: bool = False, log: Log = lambda _: None,
            progress: Callable[[Progress], None] | None = None) -> tuple[TrainResult, Summary]:
    """Train a student on SPEC.data to match the teacher SPEC.teacher; a new run in PROJECT.

    CONTINUE_INTERRUPTED: when the project's latest run is this same distillation (spec, config,
    teacher and data unchanged) stopped before its end, resume it instead of starting over.

    Raises:
        CheckpointError: the teacher cannot be distilled, or a --student's tokenizer differs.
        DataError, ConfigError: bad data or settings.
    """
    teacher_ckpt = checkpoint.Checkpoint(Path(spec.teacher))
    kind, traits = kind_of(teacher_ckpt), distillation_of(teacher_ckpt)
    project.require_tokenizer(teacher_ckpt.tokenizer_fingerprint, f"the teacher {teacher_ckpt.path}")
    tokenizer = teacher_ckpt.tokenizer()
    start_ckpt = checkpoint.Checkpoint(Path(spec.student)) if spec.student else None
    if start_ckpt and start_ckpt.tokenizer_fingerprint != teacher_ckpt.tokenizer_fingerprint:
        raise CheckpointError(f"the student {start_ckpt.path} uses tokenizer {start_ckpt.tokenizer_fingerprint} but "
                              f"the teacher {teacher_ckpt.path} uses {teacher_ckpt.tokenizer_fingerprint}; "
                              "distillation compares their outputs token by token, so they must share one")
    if start_ckpt and kind_of(start_ckpt) != kind:
        raise CheckpointError(f"the student {start_ckpt.path} is a {' '.join(kind_of(start_ckpt))} model; the "
                              f"teacher is a {' '.join(kind)} model")

    layers = list(spec.layers) if spec.layers is not None else None
    base_model = start_ckpt.config.model if start_ckpt else student_config(teacher_ckpt.config.model, spec.preset,
                                                                           layers)
    # The teacher's own recipe (steps, batch, learning rate): same steps and data, smaller model.
    defaults = dataclasses.replace(teacher_ckpt.config, model=base_model,
                                   distill=DistillConfig(**traits.weights))
    cfg = resolve(project_file=project.config_file, config_file=config_file, sets=sets, flags=flags, base=defaults)
    if cfg.model.max_seq_len > teacher_ckpt.config.model.max_seq_len:
        raise ConfigError(f"the student's max_seq_len {cfg.model.max_seq_len} exceeds the teacher's "
                          f"{teacher_ckpt.config.model.max_seq_len}: the teacher could not read its inputs")
    if layers is not None and len(layers) != cfg.model.n_layer:
        raise ConfigError(f"--student-layers names {len(layers)} layers but model.n_layer is {cfg.model.n_layer}")
    _single_process()
    identity = _identity(spec, teacher_ckpt)
    if continue_interrupted:
        interrupted = interrupted_run(project, cfg, "distill", lambda ck: ck.meta["distill"] == identity)
        if interrupted:
            log(f"continuing the interrupted run with the same teacher, data and config from {interrupted} "
                "(--new-run starts over)")
            return resume(project, interrupted, log=log, progress=progress)

    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    teacher = teacher_ckpt.model(device).requires_grad_(False).eval()
    plan = _plan(project, spec, cfg, teacher_ckpt, tokenizer, identity)
    if start_ckpt:
        student = start_ckpt.model(device, model_config=cfg.model)
        origin = f"from {start_ckpt.path}"
    else:
        student = build_model(cfg.model).to(device)
        if task_of(teacher_ckpt).head:
            student = task_of(teacher_ckpt).head(student, teacher_ckpt.meta)
        if same_width(cfg.model, teacher_ckpt.config.model):
            chosen = layers or evenly_spaced(cfg.model.n_layer, teacher_ckpt.config.model.n_layer)
            init_from_teacher(student, teacher, chosen)
            origin = f"from the teacher's embeddings and layers {chosen}"
        else:
            origin = "from random weights (its width differs from the teacher's)"
    cosine = _attach_loss(plan, teacher, traits, cfg, teacher_ckpt.config.model, log)

    run = start_run(project, cfg, distributed.World())
    log(f"{run}: distilling {teacher_ckpt.path} ({count_parameters(teacher):,} parameters) into a "
        f"{cfg.model.n_layer}-layer, {cfg.model.d_model}-wide student ({count_parameters(student):,}) {origin}; "
        f"T={cfg.distill.temperature:g}, {cfg.distill.kl} KL, weights soft {cfg.distill.soft_weight:g} / hard "
        f"{cfg.distill.hard_weight:g} / cosine {cfg.distill.cosine_weight if cosine else 0:g}")
    result = run_training(project, run, cfg, student, tokenizer, plan, state=TrainState(), snapshot=None,
                          device=device, progress=progress)
    return result, _summary(result, teacher, teacher_ckpt, plan, cfg, device)


@exclusive
def resume(project: Project, checkpoint_path: Path | None = None, *, max_steps: int | None = None,
           command: CommandLine | None = None, given: DistillRequest | None = None, log: Log = lambda _: None,
           progress: Callable[[Progress], None] | None = None) -> tuple[TrainResult, Summary]:
    """Continue an interrupted distillation (default: the project's latest checkpoint) exactly
    where it stopped: same teacher (checked by its weights), data, student state and RNG.
    COMMAND and GIVEN (the inputs named; those not given are taken as saved), the rest of the
    command line, must agree with the run; only its length (MAX_STEPS) may change.

    Raises:
        ConfigError: the command line changes the run (each change named, old and new).
        CheckpointError: nothing to resume, or the teacher gone or changed.
        DataError: the data changed since the run started.
    """
    _single_process()
    ckpt, snapshot = checkpoint.resumable(checkpoint_path, project, log)
    if run_kind(ckpt) != "distill":
        raise CheckpointError(f"{ckpt.path} is not a resumable distillation checkpoint")
    saved = ckpt.meta["distill"]
    spec = DistillSpec(**{f.name: saved[f.name] for f in dataclasses.fields(DistillSpec)})
    refuse_changes(ckpt, command, given.changes(project, spec) if given else {}, ("train.max_steps",))
    cfg, state = continuation(ckpt, snapshot, max_steps=max_steps)
    if not (Path(spec.teacher) / "config.json").is_file():
        raise CheckpointError(f"the teacher of {ckpt.run}, {spec.teacher}, is gone; restore it to resume")
    teacher_ckpt = checkpoint.Checkpoint(Path(spec.teacher))
    if _identity(spec, teacher_ckpt) != saved:
        raise CheckpointError(f"the teacher {spec.teacher} has changed since {ckpt.run} started, so it cannot "
                              "resume exactly; start a new distillation")
    traits = distillation_of(teacher_ckpt)
    device = pick_device(cfg.train.device)
    teacher = teacher_ckpt.model(device).requires_grad_(False).eval()
    tokenizer = ckpt.tokenizer()
    plan = _plan(project, spec, cfg, teacher_ckpt, tokenizer, saved)
    if plan.meta.get("data") != ckpt.meta.get("data"):
        raise DataError(f"the distillation data of {ckpt.run} changed since it started, so it cannot resume exactly")
    _attach_loss(plan, teacher, traits, cfg, teacher_ckpt.config.model, log)
    student = ckpt.model(device)
    truncate_metrics(project.metrics_file(ckpt.run), state.step)
    log(f"resuming {ckpt.run} from step {state.step} ({ckpt.path})")
    result = run_training(project, ckpt.run, cfg, student, tokenizer, plan, state=state, snapshot=snapshot,
                          device=device, progress=progress)
    return result, _summary(result, teacher, teacher_ckpt, plan, cfg, device)


def _single_process() -> None:
    if distributed.from_env().enabled:
        raise ConfigError("lmkit distill runs in one process for now (its loss reads the student's hidden "
                          "states, which DistributedDataParallel does not see); start it without torchrun")


def _identity(spec: DistillSpec, teacher: checkpoint.Checkpoint) -> dict[str, Any]:
    """What a distillation run's checkpoints record of its inputs; a resume requires the same."""
    return {**dataclasses.asdict(spec), "layers": list(spec.layers) if spec.layers else None,
            "teacher_weights": teacher.weights_fingerprint()}


def _attach_loss(plan: RunPlan, teacher: nn.Module, traits: Distillation, cfg: RunConfig,
                 teacher_model: ModelConfig, log: Log) -> bool:
    """Make PLAN's loss the distillation loss against TEACHER; True when the cosine term is on."""
    cosine = cfg.distill.cosine_weight > 0 and cfg.model.d_model == teacher_model.d_model
    if cfg.distill.cosine_weight > 0 and not cosine:
        log("cosine loss off: the student's width differs from the teacher's")
    if cosine and not traits.compares_hidden:
        cosine = False
        log(f"cosine loss off: not defined for {cfg.model.arch}")
    plan.loss_fn = DistillLoss(teacher, cfg.distill, traits.scored, cosine)
    return cosine


def _summary(result: TrainResult, teacher: nn.Module, teacher_ckpt: checkpoint.Checkpoint, plan: RunPlan,
             cfg: RunConfig, device: torch.device) -> Summary:
    """Teacher vs the run's final student (its best checkpoint when it keeps one)."""
    final = result.outcome.best_checkpoint or result.outcome.checkpoint
    student = checkpoint.Checkpoint(final).model(device)
    return summarize(teacher, student, teacher_ckpt.path, final, plan, distillation_of(teacher_ckpt), cfg, device)


def _plan(project: Project, spec: DistillSpec, cfg: RunConfig, teacher: checkpoint.Checkpoint,
          tokenizer: Any, identity: dict[str, Any]) -> RunPlan:
    """Batches and validation as for training the teacher's task on SPEC.data: pretraining batches
    from a corpus for a pretrained teacher, the task's examples for a finetuned one."""
    if task_of(teacher).data is None:  # a pretrained model (or one finetuned on more text)
        if spec.val:
            raise ConfigError("distilling a language model holds back part of DATA for validation "
                              "(--set data.val_fraction=...); leave out --val")
        files = corpus.check_files([Path(spec.data)])
        prepared = prepare.prepare(project, files, tokenizer, cfg.data, dataset="distill")
        plan = pretraining_plan(cfg, prepared, tokenizer)
        plan.keep_best, plan.meta["distill"] = True, identity
        return plan
    plan = task_plan(project, FinetuneSpec(teacher.task, spec.data, spec.teacher, spec.val), cfg, tokenizer)
    if "labels" in plan.meta and plan.meta["labels"] != teacher.labels:
        raise DataError(f"{spec.data} has labels {plan.meta['labels']}; the teacher classifies into {teacher.labels}")
    plan.meta.pop("finetune", None)
    plan.meta["distill"] = identity
    return plan


@torch.no_grad()
def summarize(teacher: nn.Module, student: nn.Module, teacher_path: Path, student_path: Path, plan: RunPlan,
              traits: Distillation, cfg: RunConfig, device: torch.device) -> Summary:
    """Sizes, same-run inference speed (median of 3 passes over the validation batches) and
    validation quality (traits.metric) of teacher and student."""
    batches = [to_device(b, device) for b in plan.val_batches]
    quality = [validate(m, plan.val_batches, plan.metrics_fn, device, cfg.train.precision)[traits.metric]
               for m in (teacher, student)]
    units = sum(b.size for b in batches)  # examples of a classifier, else tokens
    unit = "examples/s" if isinstance(student, SequenceClassifier) else "tokens/s"
    speeds = [units / _median_seconds(lambda m=m: [traits.scored(m, b) for b in batches], device) for m in
              (teacher, student)]

    def megabytes(path: Path) -> float:
        return round((path / "model.safetensors").stat().st_size / 1e6, 3)

    return Summary(count_parameters(teacher), count_parameters(student), megabytes(teacher_path),
                   megabytes(student_path), round(speeds[0], 1), round(speeds[1], 1), unit, traits.metric, quality[0],
                   quality[1])


def _median_seconds(work: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    times = []
    with autocast(device):
        work()  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            work()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
