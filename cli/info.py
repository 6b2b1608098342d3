"""`lmkit info`: what a checkpoint or project holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cli.options import Json, ProjectDir, common, user_errors


def info(
    ctx: typer.Context,
    checkpoint: Annotated[Optional[Path], typer.Argument(
        show_default=False, help="A checkpoint folder, run folder or project (default: the project).")] = None,
    json_out: Json = False,
    project: ProjectDir = None,
) -> None:
    """Config, parameter count, tokenizer and training state of a checkpoint or project."""
    from lmkit import checkpoint as ckpt_lib
    from lmkit import info as info_lib
    from lmkit import project as proj

    opts = common(ctx, project)
    with user_errors():
        project_dir = proj.Project.open(opts.project, create=False)
        if checkpoint is None:
            summary = info_lib.describe_project(project_dir)
        else:
            summary = info_lib.describe_checkpoint(ckpt_lib.resolve(checkpoint, project_dir))
    typer.echo(json.dumps(summary, indent=None if json_out else 2) if json_out else _text(summary))


def _text(summary: dict[str, Any], indent: str = "") -> str:
    lines = []
    for key, value in summary.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.append(_text(value, indent + "  ") if value else f"{indent}  -")
        else:
            lines.append(f"{indent}{key}: {'-' if value is None else value}")
    return "\n".join(lines)
