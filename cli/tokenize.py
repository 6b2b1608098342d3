"""`lmkit tokenize train | encode | decode | prepare`: the project's sentencepiece tokenizer.

None of these import torch, so they start fast and work in shell pipelines.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli import display
from cli.options import ProjectDir, Quiet, common, stdin_bytes, user_errors

app = typer.Typer(help="Train the project's tokenizer, encode and decode text, prepare token files.",
                  no_args_is_help=True, rich_markup_mode=None)

Corpora = Annotated[list[Path], typer.Argument(
    show_default=False, help="Text files (.txt, .jsonl, optionally .gz), directories of them, or glob patterns.")]
TextField = Annotated[Optional[str], typer.Option(
    "--text-field", show_default=False, help="Field holding the text in JSONL files (default: text).")]
InputFile = Annotated[str, typer.Argument(help="Input file, or - for stdin.")]


@app.command()
def train(
    ctx: typer.Context,
    corpora: Corpora,
    vocab_size: Annotated[Optional[int], typer.Option(show_default=False,
                                                      help="Vocabulary size (a soft limit) (default: 4096).")] = None,
    model_type: Annotated[Optional[str], typer.Option(
        show_default=False, help="bpe, unigram, char or word (default: bpe).")] = None,
    text_field: TextField = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing tokenizer.")] = False,
    project: ProjectDir = None,
    quiet: Quiet = False,
) -> None:
    """Train a sentencepiece tokenizer on CORPORA into the project."""
    from lmkit import config, corpus
    from lmkit import project as proj
    from lmkit import tokenizer as tok

    opts = common(ctx, project, quiet=quiet)
    with user_errors(), proj.Project.writing(opts.project) as p:
        flags = {"tokenizer.vocab_size": vocab_size, "tokenizer.model_type": model_type, "data.text_field": text_field}
        cfg = config.resolve(project_file=p.config_file, flags=flags)
        if p.has_tokenizer() and not force:
            existing = tok.Tokenizer.load(p.tokenizer_model)
            raise config.ConfigError(f"{p.root} already has a tokenizer ({existing.fingerprint}); pass --force to "
                                     "replace it (its prepared data and checkpoints will no longer match)")
        files = corpus.corpus_files(corpora)
        config.write_template(p.config_file)
        trained = tok.train_tokenizer(corpus.iter_documents(files, cfg.data.text_field), p.tokenizer_model,
                                      cfg.tokenizer)
        typer.echo(f"{p.tokenizer_model}: {trained.vocab_size} pieces, fingerprint {trained.fingerprint}")


@app.command()
def encode(
    ctx: typer.Context,
    file: InputFile = "-",
    pieces: Annotated[bool, typer.Option("--pieces", help="Print pieces instead of ids.")] = False,
    project: ProjectDir = None,
) -> None:
    """Text -> token ids, one line of ids per line of text (stdin to stdout by default)."""
    from lmkit import corpus
    from lmkit import tokenizer as tok

    opts = common(ctx, project)
    with user_errors():
        tokenizer = _project_tokenizer(opts.project)
        with _open_input(file) as stream:
            sys.stdout.writelines(tok.encode_stream(tokenizer, corpus.iter_lines(stream, file), pieces=pieces))
        sys.stdout.flush()


@app.command()
def decode(
    ctx: typer.Context,
    file: InputFile = "-",
    project: ProjectDir = None,
) -> None:
    """Token ids -> text, one line of text per line of ids (stdin to stdout by default)."""
    from lmkit import corpus
    from lmkit import tokenizer as tok

    opts = common(ctx, project)
    with user_errors():
        tokenizer = _project_tokenizer(opts.project)
        with _open_input(file) as stream:
            sys.stdout.writelines(tok.decode_stream(tokenizer, corpus.iter_lines(stream, file)))
        sys.stdout.flush()


@app.command()
def prepare(
    ctx: typer.Context,
    corpora: Corpora,
    text_field: TextField = None,
    val_fraction: Annotated[Optional[float], typer.Option(
        show_default=False, help="Share of the text kept for validation, in (0, 0.5] (default: 0.05).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-encode even if the files are up to date.")] = False,
    workers: Annotated[int, typer.Option(
        help="Encoding processes (1: this one, with sentencepiece's threads).")] = 1,
    project: ProjectDir = None,
    quiet: Quiet = False,
) -> None:
    """Encode CORPORA (files, directories, globs; .txt, .jsonl, .gz) into the project's train/val token
    files (streaming; skipped when up to date)."""
    from lmkit import config
    from lmkit import prepare as prep
    from lmkit import project as proj

    opts = common(ctx, project, quiet=quiet)
    with user_errors(), proj.Project.writing(opts.project) as p:
        cfg = config.resolve(project_file=p.config_file,
                             flags={"data.text_field": text_field, "data.val_fraction": val_fraction})
        start = time.perf_counter()
        with display.Display(opts.quiet) as shown:
            prepared = prep.prepare(p, corpora, _project_tokenizer(opts.project), cfg.data, force=force,
                                    progress=shown.encoding, workers=workers)
        seconds = time.perf_counter() - start
        state = "up to date" if prepared.reused else "written"
        for split in (prepared.train, prepared.val):
            typer.echo(f"{split.path}: {split.tokens:,} tokens, {split.meta['bytes']:,} bytes ({state})")
        if not prepared.reused:
            total = prepared.train.meta["bytes"] + prepared.val.meta["bytes"]
            typer.echo(f"encoded {total / 1e6:,.1f} MB in {seconds:.1f} s: {total / 1e6 / seconds:,.1f} MB/s, "
                       f"{(prepared.train.tokens + prepared.val.tokens) / seconds:,.0f} tokens/s ({workers} "
                       f"worker{'s' if workers > 1 else ''})")


def _project_tokenizer(root: Optional[Path]):  # -> lmkit.tokenizer.Tokenizer | HFTokenizer
    """The project's tokenizer; in a project without one (an imported model), its latest checkpoint's."""
    import json

    from lmkit import project as proj
    from lmkit import tokenizer as tok
    from lmkit.errors import CheckpointError, LmkitError

    p = proj.Project.open(root, create=False)
    if p.has_tokenizer():
        return tok.Tokenizer.load(p.tokenizer_model)
    try:  # config.json read directly: encoding text should not wait for torch to import
        latest = p.latest_checkpoint()
        info = json.loads((latest / "config.json").read_text(encoding="utf-8"))["tokenizer"]
        return tok.load_tokenizer(latest / info["file"], info.get("special"), info.get("options"))
    except (CheckpointError, OSError, ValueError, KeyError):
        raise LmkitError(f"no tokenizer in {p.root} — run 'lmkit tokenize train CORPUS -p {p.root}' "
                         "or 'lmkit pretrain CORPUS' first") from None


def _open_input(file: str):  # -> context manager over a binary stream
    import contextlib

    from lmkit.errors import DataError

    if file == "-":
        return contextlib.nullcontext(stdin_bytes())  # iter_lines names it "-"; errors say "stdin"
    path = Path(file)
    if not path.is_file():
        raise DataError(f"{file} does not exist" if not path.exists() else f"{file} is not a file")
    return open(path, "rb")
