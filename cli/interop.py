"""`lmkit import` and `lmkit export`: Hugging Face model directories (GPT-2, BERT, Llama, Qwen2, Qwen3,
Mistral) in and out."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.options import Json, ProjectDir, Quiet, common, user_errors


class ExportFormat(str, Enum):  # noqa: UP042 - Typer renders str-Enums as choices
    hf = "hf"


def import_model(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(
        show_default=False, help="A Hugging Face model directory (config.json, model.safetensors, tokenizer.json) "
        "of a GPT-2 or BERT model.")],
    project: ProjectDir = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Import a Hugging Face GPT-2, BERT, Llama, Qwen2/3 or Mistral model (and its tokenizer) as the
    project's latest checkpoint, for generate, eval, finetune and distill."""
    from lmkit import interop
    from lmkit import project as proj

    opts = common(ctx, project, quiet=quiet)
    with user_errors(), proj.Project.writing(opts.project) as p:
        path = interop.import_hf(source, p)
        report = interop.describe(path)
    if json_out:
        typer.echo(json.dumps(report))
    else:
        typer.echo(f"{path}: {report['arch']} with {report['parameters']:,} parameters, "
                   f"{report['vocab_size']:,}-token tokenizer")


def export_model(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(show_default=False, help="The directory to write.")],
    checkpoint: Annotated[Optional[Path], typer.Option(
        "--checkpoint", "-c", show_default=False,
        help="A checkpoint, run or project (default: the project's latest).")] = None,
    format_: Annotated[ExportFormat, typer.Option("--format", help="hf: a Hugging Face model directory.")]
    = ExportFormat.hf,
    force: Annotated[bool, typer.Option(
        "--force", help="Overwrite OUT when it is an earlier export (never an lmkit checkpoint or project).")]
    = False,
    project: ProjectDir = None,
) -> None:
    """Export a GPT, llama, BERT or BERT-classifier checkpoint as a directory that transformers'
    Auto classes load (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification)."""
    from lmkit import checkpoint as ckpt_lib
    from lmkit import interop
    from lmkit import project as proj

    opts = common(ctx, project)
    with user_errors():
        source = ckpt_lib.resolve(checkpoint, proj.Project.open(opts.project, create=False))
        written = interop.export_hf(source, out, force=force)
    typer.echo(str(written))
