"""Human-facing output on stderr: the training progress bar (plain lines when stderr is not a
terminal), and small formatting helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@contextlib.contextmanager
def training_progress(quiet: bool) -> Iterator[Callable[[Any], None]]:
    """Yield a callback for lmkit.train.Progress reports: a live bar on a terminal, otherwise one
    line per validation (so logs stay readable), nothing at all when QUIET."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if quiet:
        yield lambda report: None
        return
    if not console.is_terminal:
        def line(report: Any) -> None:
            if report.val_loss is not None:
                console.print(_summary(report), highlight=False, soft_wrap=True)
        yield line
        return
    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), console=console, transient=True)
    with bar:
        task = bar.add_task("train", total=None, info="")

        def update(report: Any) -> None:
            bar.update(task, total=report.max_steps, completed=report.step, info=_summary(report, short=True))
            if report.val_loss is not None:
                bar.console.print(_summary(report), highlight=False)

        yield update


def _summary(report: Any, short: bool = False) -> str:
    val = f" val {report.val_loss:.4f}" if report.val_loss is not None else ""
    text = f"loss {report.loss:.4f}{val} | {report.tokens_per_sec:,.0f} tok/s | eta {duration(report.eta)}"
    if short:
        return text
    return f"step {report.step}/{report.max_steps} {text} | lr {report.lr:.2e}"


@contextlib.contextmanager
def bytes_progress(quiet: bool, label: str) -> Iterator[Callable[[int, int], None]]:
    """A transient MB/s bar for streaming encodes (terminal only)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        yield lambda done, total: None
        return

    bar = Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console,
                   transient=True)
    with bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
