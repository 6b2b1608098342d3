"""Human-facing progress on stderr: live bars on a terminal (one rich display for encoding and
training), plain lines otherwise, nothing with --quiet."""

from __future__ import annotations

from typing import Any


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def run_summary(result: Any, project: Any) -> str:
    """The block that ends a training command (on stderr): time, tokens, throughput and MFU, the best
    validation and its step, where the checkpoint is, and how to see the curves."""
    from lmkit.runs import read_metrics

    state, out, root = result.state, result.outcome, project.root
    mfus = sorted(r["mfu"] for r in read_metrics(project.metrics_file(result.run))
                  if isinstance(r.get("mfu"), (int, float)))
    mfu = f", MFU {mfus[len(mfus) // 2]:.0%}" if mfus else ""  # the median of the run's rows
    lines = [f"  time        {duration(state.elapsed)} ({state.tokens_seen:,} tokens, "
             f"{out.tokens_per_sec:,.0f} tokens/s{mfu})"]
    if state.best_step:
        lines.append(f"  best        {result.best_metric or 'val_loss'} {state.best:.4f} at step {state.best_step}")
    lines.append(f"  checkpoint  {out.best_checkpoint or out.checkpoint}")
    lines.append(f"  curves      lmkit plot -p {root} {result.run} -o {project.curves_image(result.run)}")
    return "\n".join([f"{result.run} summary", *lines])


class Display:
    """Callbacks for the library's progress reports; use as `with Display(quiet) as display:`."""

    def __init__(self, quiet: bool) -> None:
        from rich.console import Console

        display = self

        class QuietOnClosedPipe(Console):
            def on_broken_pipe(self) -> None:
                """stderr was a pipe whose reader left (`lmkit pretrain 2>&1 | head`): rich would exit,
                killing a run between checkpoints; stop showing progress instead, and go on."""
                display.quiet = display.live = False
                self.quiet = True

        self.quiet = quiet
        self.console = QuietOnClosedPipe(stderr=True)
        self.live = not quiet and self.console.is_terminal
        self._bar: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> Display:
        if self.live:
            from rich.progress import Progress

            self._bar = Progress(console=self.console, transient=True)
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def encoding(self, done: int, total: int) -> None:
        """lmkit.prepare progress: bytes encoded so far."""
        if self.live:
            self._update("encode", f"encoding {done / 1e6:.1f}/{total / 1e6:.1f} MB", total=total, completed=done)

    def training(self, report: Any) -> None:
        """lmkit.train.Progress: a bar on a terminal, otherwise one line per validation."""
        if self.quiet:
            return
        if self.live:
            self._update("train", f"step {report.step}/{report.max_steps} {_summary(report)}",
                         total=report.max_steps, completed=report.step)
        if report.val_loss is not None:
            self.console.print(f"step {report.step}/{report.max_steps} {_summary(report)} | lr {report.lr:.2e}",
                               highlight=False, soft_wrap=True)

    def _update(self, name: str, description: str, **fields: Any) -> None:
        if name not in self._tasks:
            self._tasks[name] = self._bar.add_task(description, **fields)
        self._bar.update(self._tasks[name], description=description, **fields)


def _summary(report: Any) -> str:
    val = ""
    for name, value in (report.validation or {}).items():
        short = name.removeprefix("val_").replace("_loss", "").replace("accuracy", "acc")
        val += f" val {value:.4f}" if name == "val_loss" else f" {short} {value:.4f}"
    mfu = f" | MFU {report.mfu:.0%}" if report.mfu is not None else ""
    return f"loss {report.loss:.4f}{val} | {report.tokens_per_sec:,.0f} tok/s{mfu} | eta {duration(report.eta)}"
