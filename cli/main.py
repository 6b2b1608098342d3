"""The `lmkit` application: global options, and one registered module per command."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli import (
    chat,
    distill,
    evaluate,
    finetune,
    generate,
    info,
    interop,
    merge,
    pretrain,
    quantize,
    runs,
    serve,
    tokenize,
)
from cli.options import Common, Device, DeviceOpt, ProjectDir, Quiet, Seed, StdoutClosed, guard_stdout

app = typer.Typer(
    name="lmkit",
    help="Train, sample and evaluate language models, from a raw text corpus to a working model.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion [bash|zsh|fish|powershell]
    pretty_exceptions_enable=False,
    # Plain help text: Typer's rich panels import rich.markdown and friends, which alone take
    # longer (~0.2 s) than the rest of `lmkit --help`. rich stays for progress displays.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from lmkit import __version__

        typer.echo(f"lmkit {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    project: ProjectDir = None,
    device: DeviceOpt = None,
    seed: Seed = None,
    quiet: Quiet = False,
    version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """Train, sample and evaluate language models, from a raw text corpus to a working model.

    Every command works on one project directory (--project, $LMKIT_PROJECT, or the current one).
    """
    ctx.obj = Common(project=project, device=(device or Device.auto).value, seed=seed, quiet=quiet)


app.add_typer(tokenize.app, name="tokenize")
app.command()(pretrain.pretrain)
app.command()(finetune.finetune)
app.command()(merge.merge)
app.command()(distill.distill)
app.command()(generate.generate)
app.command()(chat.chat)
app.command()(serve.serve)
app.command()(quantize.quantize)
app.command()(runs.runs)
app.command()(runs.plot)
app.command(name="eval")(evaluate.evaluate)
app.command()(info.info)
app.command(name="import")(interop.import_model)
app.command(name="export")(interop.export_model)


def main() -> None:
    guard_stdout()  # `lmkit ... >&-`: results written anywhere raise StdoutClosed
    try:
        app()
    except StdoutClosed as err:  # printed outside a command's user_errors() (--help, --version, a last line)
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
