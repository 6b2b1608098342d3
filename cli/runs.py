"""`lmkit runs` (a table of a project's runs) and `lmkit plot` (their curves as an image)."""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli import display
from cli.options import Json, ProjectDir, Quiet, common, user_errors


class XAxis(str, Enum):  # noqa: UP042 - Typer renders str-Enums as choices
    step = "step"
    tokens = "tokens"
    time = "time"


class Metric(str, Enum):  # noqa: UP042
    loss = "loss"
    bpb = "bpb"


def runs(ctx: typer.Context, json_out: Json = False, project: ProjectDir = None, quiet: Quiet = False) -> None:
    """The project's runs, oldest first: arch, task, parameters, steps, tokens, wall time, last and
    best validation, bits per byte, and whether each finished, was interrupted or is running."""
    from lmkit import project as proj
    from lmkit import runs as runs_lib

    opts = common(ctx, project, quiet=quiet)
    with user_errors():
        found = runs_lib.list_runs(proj.Project.open(opts.project, create=False))
    if json_out:
        for run in found:
            typer.echo(json.dumps(run.to_dict()))
        return
    if not found:
        typer.echo("no runs yet")
        return
    header = ["run", "kind", "arch", "task", "params", "steps", "tokens", "time", "last val", "best val",
              "bpb", "status", "started"]
    rows = [[r.run, r.kind, r.arch, r.task, f"{r.parameters / 1e6:.2f}M" if r.parameters else "-",
             f"{r.steps}/{r.max_steps}", f"{r.tokens:,}", display.duration(r.wall_s),
             _number(r.last_val), _number(r.best_val) + (f" @{r.best_step}" if r.best_step else ""),
             _number(r.bits_per_byte), r.status, time.strftime("%Y-%m-%d %H:%M", time.localtime(r.started))]
            for r in found]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())


def plot(
    ctx: typer.Context,
    targets: Annotated[Optional[list[str]], typer.Argument(
        show_default=False, help="Projects (all their runs), run folders (PROJECT/runs/runN) or run names of "
        "the -p project (default: every run of the project).")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", show_default=False, help="The image: .png or .svg (default: PROJECT/curves.png).")] = None,
    metric: Annotated[Metric, typer.Option(help="loss (nats per token) or bpb (bits per byte).")] = Metric.loss,
    x: Annotated[XAxis, typer.Option("--x", help="What the curves run along.")] = XAxis.step,
    log: Annotated[bool, typer.Option("--log", help="Log scale for the metric.")] = False,
    size: Annotated[str, typer.Option(help="Width x height in pixels.")] = "900x540",
    project: ProjectDir = None,
    quiet: Quiet = False,
) -> None:
    """Train and validation curves of one or more runs on one figure, with a legend (run, arch,
    parameters)."""
    from lmkit import plot as plot_lib
    from lmkit import project as proj
    from lmkit import runs as runs_lib

    opts = common(ctx, project, quiet=quiet)
    with user_errors():
        width, height = plot_lib.parse_size(size)
        home = proj.Project.open(opts.project, create=False)
        chosen = runs_lib.named_runs(home, targets)
        written = out or home.curves_image()
        left_out = plot_lib.plot_runs(chosen, written, metric=metric.value, x=x.value, log=log, size=(width, height))
    for run in left_out:
        opts.say(f"left out {Path(run.project).name}/{run.run}: no bits per byte for a {run.kind} run")
    typer.echo(str(written))


def _number(value: Optional[float]) -> str:
    return f"{value:.4f}" if value is not None else "-"

