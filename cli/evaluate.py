"""`lmkit eval`: score a text file with a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.options import CheckpointOpt, DeviceOpt, Json, ProjectDir, Quiet, common, user_errors


def evaluate(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(show_default=False, help="Text file to score.")],
    stride: Annotated[Optional[int], typer.Option(
        min=1, show_default=False, help="GPT: tokens between window starts (default: half the context).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward pass.")] = 8,
    json_out: Json = False,
    checkpoint: CheckpointOpt = None,
    project: ProjectDir = None,
    device: DeviceOpt = None,
    quiet: Quiet = False,
) -> None:
    """Score a checkpoint on FILE: GPT loss, perplexity, bits per byte; BERT MLM and NSP accuracy."""
    from lmkit import checkpoint as ckpt_lib
    from lmkit import corpus
    from lmkit import device as dev
    from lmkit import evaluate as ev
    from lmkit import project as proj

    opts = common(ctx, project, device, quiet=quiet)
    with user_errors():
        text = corpus.read_text(file)
        ckpt = ckpt_lib.Checkpoint(ckpt_lib.resolve(checkpoint, proj.Project.open(opts.project, create=False)))
        ckpt.require_task("lm", "eval")
        where = dev.pick_device(opts.device)
        model, tokenizer = ckpt.model(where), ckpt.tokenizer()
        if ckpt.config.model.arch == "bert":
            result = ev.evaluate_bert(model, tokenizer, text, where, batch_size=batch_size)
        else:
            result = ev.evaluate_lm(model, tokenizer, text, where, stride=stride, batch_size=batch_size)
    report = {"file": str(file), "checkpoint": str(ckpt.path), "arch": ckpt.config.model.arch, **result.to_dict()}
    if json_out:
        typer.echo(json.dumps(report))
        return
    width = max(map(len, report))
    for key, value in report.items():
        typer.echo(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
