"""`lmkit distill`: train a smaller student to match a teacher checkpoint, and compare the two."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cli import display
from cli.options import (
    CheckpointOpt,
    Common,
    ConfigFile,
    DeviceOpt,
    Json,
    Keep,
    LogTo,
    MaxSteps,
    NewRun,
    ProjectDir,
    Quiet,
    Seed,
    Sets,
    common,
    exit_if_interrupted,
    user_errors,
)
from lmkit.errors import ConfigError


def distill(
    ctx: typer.Context,
    data: Annotated[Optional[Path], typer.Argument(
        show_default=False, help="What the teacher was trained on: a corpus (pretrained teacher), labelled "
        "examples (classifier) or source/target pairs (seq2seq).")] = None,
    teacher: Annotated[Optional[Path], typer.Option(
        "--teacher", show_default=False, help="The teacher: a checkpoint, run or project.")] = None,
    student_layers: Annotated[Optional[str], typer.Option(
        show_default=False, help="Teacher layers the student starts from, e.g. 0,2,4 (default: every other "
        "one, DistilBERT style, when the student is as wide as the teacher).")] = None,
    preset: Annotated[Optional[str], typer.Option(
        show_default=False, help="The student's shape from a preset of the teacher's arch (tiny, default, small).")
    ] = None,
    student: Annotated[Optional[Path], typer.Option(
        "--student", show_default=False, help="Start the student from this checkpoint instead.")] = None,
    val: Annotated[Optional[Path], typer.Option(
        show_default=False, help="Validation file for labelled examples or pairs (default: held back from DATA).")
    ] = None,
    kl: Annotated[Optional[str], typer.Option(
        show_default=False, help="forward (Hinton), reverse (MiniLLM) or jsd (default: forward).")] = None,
    temperature: Annotated[Optional[float], typer.Option(
        show_default=False, help="Softmax temperature of the soft targets (default 2).")] = None,
    config_file: ConfigFile = None,
    set_: Sets = None,
    max_steps: MaxSteps = None,
    log: LogTo = None,
    keep: Keep = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the latest distillation exactly.")] = False,
    new_run: NewRun = False,
    checkpoint: CheckpointOpt = None,
    json_out: Json = False,
    project: ProjectDir = None,
    device: DeviceOpt = None,
    seed: Seed = None,
    quiet: Quiet = False,
) -> None:
    """Distill the --teacher into a smaller student trained on DATA; print teacher vs student
    (parameters, size, speed, quality, retention). Loss weights: --set distill.soft_weight=...,
    distill.hard_weight (alpha), distill.cosine_weight."""
    from lmkit import config
    from lmkit import distill as dist
    from lmkit import project as proj

    opts = common(ctx, project, device, seed, quiet)
    with user_errors(), proj.Project.writing(opts.project) as p:
        flags = {"distill.kl": kl, "distill.temperature": temperature,
                 **opts.train_flags(max_steps=max_steps, keep=keep, log=log)}
        request = dist.DistillRequest(data, teacher, val, student, _layers(student_layers), preset)
        spec = None if resume else request.spec(p)
        with display.Display(opts.quiet) as shown:
            if spec is None:  # --resume: the run's own command line may come along; what it changes is refused
                command = config.CommandLine(config_file, tuple(set_ or ()), flags)
                result, summary = dist.resume(p, checkpoint, max_steps=max_steps, command=command, given=request,
                                              log=opts.say, progress=shown.training)
            else:
                result, summary = dist.distill(p, spec, config_file=config_file, sets=tuple(set_ or ()), flags=flags,
                                               continue_interrupted=not new_run, log=opts.say,
                                               progress=shown.training)
    _report(result, summary, p, json_out, opts)


def _report(result: Any, summary: Any, p: Any, json_out: bool, opts: Common) -> None:
    """The comparison (stdout), the run's summary (stderr), and how to resume a stopped run."""
    if json_out:
        typer.echo(json.dumps({**result.to_dict(), "summary": summary.to_dict()}))
    else:
        typer.echo(_table(summary))
        typer.echo(f"student: {result.outcome.best_checkpoint or result.outcome.checkpoint}")
        opts.say(display.run_summary(result, p))
    exit_if_interrupted(result.outcome.stopped_by, "distill", p.root)


def _layers(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """--student-layers 0,2,4 as layer numbers (None: not given)."""
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--student-layers expects teacher layer numbers such as 0,2,4; got {text!r}") from None


def _table(summary: Any) -> str:
    """Teacher and student side by side, and the ratios."""
    s = summary.to_dict()
    rows = [("parameters", f"{s['teacher_parameters']:,}", f"{s['student_parameters']:,}",
             f"{s['parameter_ratio']:.1%}"),
            ("size on disk", f"{s['teacher_mb']:.2f} MB", f"{s['student_mb']:.2f} MB",
             f"{s['student_mb'] / s['teacher_mb']:.1%}"),
            (f"speed ({s['speed_unit']})", f"{s['teacher_speed']:,.0f}", f"{s['student_speed']:,.0f}",
             f"{s['speedup']:.2f}x"),
            (s["metric"], f"{s['teacher_quality']:.4f}", f"{s['student_quality']:.4f}",
             f"retention {s['retention']:.1f}%")]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'teacher':>14}  {'student':>14}"]
    lines += [f"{name:<{width}}  {t:>14}  {st:>14}  {ratio}" for name, t, st, ratio in rows]
    return "\n".join(lines)
