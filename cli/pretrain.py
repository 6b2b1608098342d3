"""`lmkit pretrain`: train a model from scratch, doing first whatever the project lacks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cli import display
from cli.options import (
    Common,
    Compile,
    ConfigFile,
    DeviceOpt,
    Json,
    Keep,
    LogTo,
    MaxSteps,
    NewRun,
    Nproc,
    Precision,
    ProjectDir,
    Quiet,
    Seed,
    Sets,
    Strategy,
    common,
    exit_if_interrupted,
    hand_off_to_torchrun,
    is_main_process,
    user_errors,
)
from lmkit.presets import ARCH_HELP


def pretrain(
    ctx: typer.Context,
    corpora: Annotated[Optional[list[Path]], typer.Argument(
        show_default=False, help="Text files (.txt, .jsonl, .gz) (default: the project's prepared data).")] = None,
    arch: Annotated[Optional[str], typer.Option(show_default=False, help=ARCH_HELP)] = None,
    preset: Annotated[Optional[str], typer.Option(
        show_default=False, help="tiny (seconds, for smoke tests), default (~10 min on 2 CPU cores), small, or "
        "for llama long (~22 min on 2 CPU cores, context 128: the transfer-learning model).")] = None,
    config_file: ConfigFile = None,
    set_: Sets = None,
    max_steps: MaxSteps = None,
    log: LogTo = None,
    nproc: Nproc = None,
    strategy: Strategy = None,
    keep: Keep = None,
    compile_model: Compile = None,
    precision: Precision = None,
    time_budget: Annotated[Optional[str], typer.Option(
        show_default=False, help="Stop training after this long, e.g. 90s, 15m, 1.5h.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the latest run exactly where it stopped.")] = False,
    new_run: NewRun = False,
    json_out: Json = False,
    project: ProjectDir = None,
    device: DeviceOpt = None,
    seed: Seed = None,
    quiet: Quiet = False,
) -> None:
    """Train a model on CORPORA (tokenizer and data are built first if missing)."""
    from lmkit import config, train
    from lmkit import project as proj

    hand_off_to_torchrun(nproc)
    opts = common(ctx, project, device, seed, quiet)
    with user_errors(), proj.Project.writing(opts.project) as p:
        budget = config.parse_duration(time_budget) if time_budget else None
        flags = {"arch": arch, "preset": preset, "train.time_budget": budget,
                 **opts.train_flags(max_steps=max_steps, keep=keep, log=log, compile_model=compile_model,
                                    precision=precision, strategy=strategy)}
        with display.Display(opts.quiet) as shown:
            if resume:
                command = config.CommandLine(config_file, tuple(set_ or ()), flags)
                result = train.resume(p, max_steps=max_steps, time_budget=budget, command=command,
                                      corpora=list(corpora or []), log=opts.say, progress=shown.training)
            else:
                cfg = config.resolve(project_file=p.config_file, config_file=config_file, sets=set_ or (), flags=flags)
                result = train.pretrain(p, list(corpora or []), cfg, continue_interrupted=not new_run, log=opts.say,
                                        progress=shown.training, prepare_progress=shown.encoding)
    if is_main_process():  # the other ranks trained alongside rank 0, which reports
        _report(result, p, json_out, opts)


def _report(result: Any, p: Any, json_out: bool, opts: Common) -> None:
    """The checkpoint and its losses (stdout), the run's summary (stderr), and how to resume a stopped run."""
    out = result.outcome
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
    else:
        val = f", val loss {out.val_loss:.4f}" if out.val_loss is not None else ""
        typer.echo(f"{out.checkpoint}: step {result.state.step}, train loss {out.train_loss:.4f}{val}, "
                   f"{display.duration(result.state.elapsed)}, {out.tokens_per_sec:,.0f} tokens/s")
        opts.say(display.run_summary(result, p))
    exit_if_interrupted(out.stopped_by, "pretrain", p.root)
