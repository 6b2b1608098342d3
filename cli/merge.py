"""`lmkit merge`: fold LoRA adapters into their base weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.options import ProjectDir, common, user_errors


def merge(
    ctx: typer.Context,
    checkpoint: Annotated[Optional[Path], typer.Argument(
        show_default=False, help="An adapter checkpoint (default: the project's latest).")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", show_default=False,
        help="Where to write the merged checkpoint (default: beside it, named '-merged'): a new or empty "
        "folder, or with --force an lmkit checkpoint that nothing refers to.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace OUT when it is an lmkit checkpoint that no other checkpoint or latest.json "
        "refers to.")] = False,
    project: ProjectDir = None,
) -> None:
    """Merge a LoRA checkpoint's adapters into a full checkpoint that needs no base."""
    from lmkit import checkpoint as ckpt_lib
    from lmkit import finetune as ft
    from lmkit import project as proj

    opts = common(ctx, project)
    with user_errors():
        source = ckpt_lib.resolve(checkpoint, proj.Project.open(opts.project, create=False))
        merged = ft.merge_checkpoint(source, out or source.with_name(source.name + "-merged"), force=force)
    typer.echo(str(merged))
