"""Options shared by every command, the global-or-per-command lookup, and the user-error boundary."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import sys
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmkit.errors import DataError, LmkitError
from lmkit.fileio import write_failure


class Device(str, Enum):  # noqa: UP042 - Typer renders str-Enums as choices
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


ProjectDir = Annotated[Optional[Path], typer.Option(
    "--project", "-p", show_default=False,
    help="Project directory (default: $LMKIT_PROJECT, else the current directory).")]
DeviceOpt = Annotated[Optional[Device], typer.Option(
    "--device", show_default=False, help="Where to run: auto (cuda > mps > cpu), cpu, cuda or mps.")]
Seed = Annotated[Optional[int], typer.Option("--seed", show_default=False, help="Random seed.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or info on stderr.")]
CheckpointOpt = Annotated[Optional[Path], typer.Option(
    "--checkpoint", "-c", show_default=False,
    help="A checkpoint folder, run folder or project (default: the project's latest checkpoint).")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
ConfigFile = Annotated[Optional[Path], typer.Option(
    "--config", show_default=False, help="A TOML config file, or a run's saved config.json.")]
Sets = Annotated[Optional[list[str]], typer.Option(
    "--set", show_default=False, help="Override one setting, e.g. --set train.lr=1e-4 (repeatable).")]
# No min=/max= on options: ranges are checked where the values are used (lmkit.config's
# check_range and the config classes), so a bad value is one `error:` line, not Click's usage block.
MaxSteps = Annotated[Optional[int], typer.Option(show_default=False, help="Optimizer steps.")]
Compile = Annotated[Optional[bool], typer.Option(
    "--compile/--no-compile", show_default=False, help="torch.compile the model for training (default: off).")]


class PrecisionChoice(str, Enum):  # noqa: UP042 - Typer renders str-Enums as choices
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


Precision = Annotated[Optional[PrecisionChoice], typer.Option(
    "--precision", show_default=False,
    help="auto (bf16 autocast on CUDA, fp32 elsewhere), fp32, bf16, or fp16 with a gradient scaler (older GPUs).")]


class StrategyChoice(str, Enum):  # noqa: UP042
    ddp = "ddp"
    fsdp = "fsdp"


Strategy = Annotated[Optional[StrategyChoice], typer.Option(
    "--strategy", show_default=False,
    help="With several ranks: ddp replicates the model on each (default); fsdp shards parameters, gradients "
    "and optimizer state across them, for models that do not fit one GPU.")]
Keep = Annotated[Optional[int], typer.Option(
    "--keep", show_default=False,
    help="Periodic checkpoints kept per run (default 2); the latest and the best are never deleted.")]
NewRun = Annotated[bool, typer.Option(
    "--new-run", help="Start a new run even when an interrupted run with the same config and data could continue.")]
Nproc = Annotated[Optional[int], typer.Option(
    "--nproc", show_default=False,
    help="Train on this many processes (data parallel): hands the command to torchrun.")]

# Decoding, shared by generate, chat and eval (seq2seq).
MaxNewTokens = Annotated[int, typer.Option(help="Most tokens to add per output.")]
Temperature = Annotated[Optional[float], typer.Option(
    show_default=False,
    help="Sampling temperature; 0 means greedy (default: 0.8; seq2seq models decode greedily).")]
TopP = Annotated[float, typer.Option(
    help="Sample from the smallest set of tokens holding this much probability (0 < p <= 1).")]
Greedy = Annotated[bool, typer.Option("--greedy", help="Always take the likeliest token.")]
class LogChoice(str, Enum):  # noqa: UP042 - Typer renders str-Enums as choices
    tensorboard = "tensorboard"
    wandb = "wandb"


LogTo = Annotated[Optional[list[LogChoice]], typer.Option(
    "--log", show_default=False,
    help="Also log metrics to tensorboard (event files in runs/<run>/) or wandb (offline without a login); "
    "repeatable; optional extras.")]


class QuantizeChoice(str, Enum):  # noqa: UP042 - Typer renders str-Enums as choices
    int8 = "int8"


Quantize = Annotated[Optional[QuantizeChoice], typer.Option(
    "--quantize", show_default=False,
    help="int8: decode with int8 weights, a quarter of the bytes (CPU; an int8 checkpoint needs no flag).")]
System = Annotated[Optional[str], typer.Option(
    "--system", show_default=False, help="Chat: the system message that starts the conversation.")]
ChatTemplate = Annotated[Optional[Path], typer.Option(
    show_default=False, help="Chat: a Jinja chat template (or a tokenizer_config.json holding one) instead of "
    "the checkpoint's own.")]
Beam = Annotated[int, typer.Option("--beam", help="Beam search of this width (1: no beam search).")]
LengthPenalty = Annotated[float, typer.Option(
    help="Beam search ranks by log-prob / length ** this (0: raw log-prob; > 0 favours longer outputs).")]
NoRepeatNgram = Annotated[int, typer.Option(
    "--no-repeat-ngram-size", help="Never produce an n-gram of this size twice (0: off).")]
RepetitionPenalty = Annotated[float, typer.Option(
    help="Above 1 discourages tokens already in the text (CTRL's penalty; 1: off; > 0).")]
Stop = Annotated[Optional[list[str]], typer.Option(
    "--stop", show_default=False, help="End an output where this string appears, leaving it out (repeatable).")]


@dataclass(frozen=True)
class Common:
    """The options every command accepts, merged: the command's own flag wins over the global one."""

    project: Optional[Path]
    device: str
    seed: Optional[int]
    quiet: bool

    def train_flags(self, *, max_steps: Optional[int], keep: Optional[int], compile_model: Optional[bool] = None,
                    precision: Optional[Enum] = None, strategy: Optional[Enum] = None,
                    log: Optional[list[Enum]] = None) -> dict[str, object]:
        """The train.* config values the training commands' own flags set (None: not given)."""
        return {"train.max_steps": max_steps, "train.keep_checkpoints": keep, "train.compile": compile_model,
                "train.log": ",".join(sorted({k.value for k in log})) if log else None,
                "train.precision": precision.value if precision else None,
                "train.strategy": strategy.value if strategy else None,
                "train.seed": self.seed, "train.device": None if self.device == "auto" else self.device}

    def say(self, message: str) -> None:
        """Information for humans: stderr, unless --quiet."""
        if not self.quiet:
            typer.echo(message, err=True)


def is_main_process() -> bool:
    """False on the ranks other than 0 of a torchrun launch: they train but print nothing."""
    return os.environ.get("RANK", "0") == "0"


def common(ctx: typer.Context, project: Optional[Path] = None, device: Optional[Device] = None,
           seed: Optional[int] = None, quiet: bool = False) -> Common:
    top: Common | None = ctx.find_root().obj
    return Common(
        project=project or (top.project if top else None),
        device=(device or (Device(top.device) if top else Device.auto)).value,
        seed=seed if seed is not None else (top.seed if top else None),
        quiet=quiet or bool(top and top.quiet) or not is_main_process(),
    )


def stdin_bytes() -> typing.BinaryIO:
    """stdin as bytes; a closed one (`<&-`, or a service without one) is a user error, not a crash."""
    if sys.stdin is None:
        raise DataError("stdin is closed: give the input as arguments or a file, or pipe it in")
    return sys.stdin.buffer


class StdoutClosed(LmkitError):
    """stdout cannot take the results: closed by the shell (`lmkit ... >&-`) or opened read-only."""

    def __init__(self) -> None:
        super().__init__("stdout is closed, so the results have nowhere to go; redirect it to a file "
                         "(> out.txt), or to /dev/null to discard them")


class _NoStdout(io.TextIOBase):
    """sys.stdout when there is none to write to: the first text written raises StdoutClosed, so every
    command that prints results (typer.echo, sys.stdout.write, print) stops with the one-line error,
    and commands that print nothing (serve, a quiet pretrain) run as usual."""

    encoding = "utf-8"
    errors = "strict"

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):  # how click tells a text stream from a binary one
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if text:
            raise StdoutClosed()
        return 0

    def fileno(self) -> int:
        return 1


def _stdout_writable() -> bool:
    """False for a closed stdout (Python makes sys.stdout None when fd 1 is closed at start, as
    `>&-` leaves it), a closed sys.stdout, or a file descriptor 1 that is not open for writing."""
    stream = sys.stdout
    if stream is None or isinstance(stream, _NoStdout) or stream.closed:
        return False
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # not a file (CliRunner's buffer, a StringIO): it takes text
        return True
    try:
        import fcntl
    except ImportError:  # Windows: no cheap check; a write there fails as before
        return True
    try:
        return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
    except OSError:  # EBADF: the descriptor is closed
        return False


def _lost_stdout(err: BaseException) -> bool:
    """ERR is a write to a stdout that went away while the command ran: a closed sys.stdout
    (ValueError) or a closed file descriptor 1 (EBADF)."""
    if isinstance(err, OSError) and not isinstance(err, io.UnsupportedOperation):
        return err.errno == errno.EBADF and not _stdout_writable()
    return isinstance(err, ValueError) and not _stdout_writable()


def guard_stdout() -> None:
    """Before a command runs: a stdout that cannot take results becomes _NoStdout (the one place
    every command's results go through), and /dev/null takes file descriptor 1, so that no file lmkit
    opens lands on it (a library's or a child's write to fd 1 would go into that file)."""
    if _stdout_writable():
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    if devnull != 1:
        os.dup2(devnull, 1)
        os.close(devnull)
    sys.stdout = _NoStdout()


def input_texts(arguments: Optional[list[str]], what: str) -> tuple[Iterator[str], bool]:
    """ARGUMENTS, else the lines of stdin (without their line ends), each checked to be UTF-8
    (errors name the argument or line; WHAT says what they are, e.g. "prompt"); and whether they
    are typed at a terminal (answer each line at once instead of batching)."""
    if arguments:
        return _checked_arguments(arguments, what), False
    stream = stdin_bytes()
    return _stdin_lines(stream, what), stream.isatty()


def _checked_arguments(arguments: list[str], what: str) -> Iterator[str]:
    for number, text in enumerate(arguments, 1):
        try:
            text.encode("utf-8")  # bytes that are not UTF-8 arrive as lone surrogates (PEP 383)
        except UnicodeEncodeError:
            raise DataError(f"{what} argument {number} is not valid UTF-8") from None
        yield text


def _stdin_lines(stream: typing.BinaryIO, what: str) -> Iterator[str]:
    for number, raw in enumerate(stream, 1):  # line by line, so typed lines are answered as they come
        try:
            # utf-8-sig: a byte-order mark opening the stream (a file saved on Windows) is not text
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise DataError(f"line {number} of stdin ({what}s, one a line) is not valid UTF-8; convert it first, "
                            "e.g. `iconv -f latin1 -t utf-8`") from None


MAX_NPROC = 1024  # ranks on this one machine (--standalone)


def hand_off_to_torchrun(nproc: Optional[int]) -> None:
    """With --nproc N > 1 outside torchrun: run this same command under torch's launcher, one
    process per rank (what `torchrun --standalone --nproc_per_node N -m lmkit ...` does, run from
    here), and exit with the ranks' status. Does nothing inside a torchrun launch or for one process.

    A user error on the ranks is printed once, as one line, with exit code 2; the launcher's own
    logging and failure report are kept quiet (a crashing rank prints its traceback itself).
    """
    from lmkit.config import check_range

    with user_errors():  # called before the command's own user_errors() block
        check_range("nproc", nproc, 1, MAX_NPROC)
    if not nproc or nproc == 1 or "WORLD_SIZE" in os.environ:
        return
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        args.append(arg)
    # torchrun would give every rank 1 thread; share the cores out instead (CPU ranks compute too).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    with tempfile.TemporaryDirectory(prefix="lmkit-ranks-") as errors:
        os.environ[_ERRORS_DIR] = errors
        launch = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "lmkit", *args])
        try:
            run(launch)
        except ChildFailedError as err:
            messages = dict.fromkeys(p.read_text(encoding="utf-8") for p in sorted(Path(errors).glob("rank-*")))
            for message in messages:
                typer.echo(f"error: {message}", err=True)
            rank, failure = err.get_first_failure()
            if not messages and failure.exitcode not in (130, 143):
                typer.echo(f"error: rank {rank} failed with exit code {failure.exitcode}", err=True)
            raise typer.Exit(code=failure.exitcode if failure.exitcode > 0 else 1) from None
        except SignalException as err:
            raise typer.Exit(code=128 + int(err.sigval)) from None
        finally:
            del os.environ[_ERRORS_DIR]
    raise typer.Exit(code=0)


_ERRORS_DIR = "LMKIT_RANK_ERRORS"  # where ranks started by --nproc leave their user errors


def _report_error(message: str) -> None:
    """Print a user error; a rank started by --nproc leaves it for the launcher to print once."""
    errors = os.environ.get(_ERRORS_DIR)
    if errors and "RANK" in os.environ and Path(errors).is_dir():
        (Path(errors) / f"rank-{int(os.environ['RANK']):05d}").write_text(message, encoding="utf-8")
    else:
        typer.echo(f"error: {message}", err=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Run a command body: LmkitError -> `error: ...` and exit 2 (traceback only with LMKIT_DEBUG=1);
    a write that the disk or its permissions refuse -> the same, naming the file;
    Ctrl-C outside training -> exit 130; a closed pipe (`... | head`) -> quiet exit."""
    try:
        yield
    except LmkitError as err:
        if os.environ.get("LMKIT_DEBUG"):
            raise
        _report_error(str(err))
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(code=130) from None
    except BrokenPipeError:
        # Python would complain again when flushing stdout at exit; point it at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(code=141) from None
    except (OSError, ValueError, MemoryError, RuntimeError) as err:  # a full disk, no memory, no stdout: one line
        if _lost_stdout(err):  # stdout closed while the command ran
            message: str | None = str(StdoutClosed())
        elif isinstance(err, ValueError):
            message = None
        else:
            message = write_failure(err) if isinstance(err, OSError) else out_of_memory(err)
        if message is None or os.environ.get("LMKIT_DEBUG"):
            raise
        _report_error(message)
        raise typer.Exit(code=2) from None


_ALLOCATION_RE = re.compile(r"(?:tried to allocate|Unable to allocate) (\d+ bytes|[\d.]+ ?[KMGTP]?i?B)", re.IGNORECASE)


def out_of_memory(err: BaseException) -> str | None:
    """The one-line message for a failed allocation (numpy's MemoryError, torch's CPU allocator or
    CUDA out of memory), with the size asked for; None for other errors."""
    text = str(err)
    if not (isinstance(err, MemoryError) or "out of memory" in text or "can't allocate memory" in text):
        return None
    asked = _ALLOCATION_RE.search(text)
    size = asked.group(1) if asked else "more"
    if size.endswith(" bytes"):
        size = _human_bytes(int(size.split()[0]))
    return (f"out of memory: one allocation needed {size}; use a smaller model (model.d_model, model.n_layer), "
            "batch (train.batch_size) or context (model.max_seq_len)")


def _human_bytes(n: int) -> str:
    size, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{n} B" if unit == "B" else f"{size:,.1f} {unit}"


def exit_if_interrupted(stopped_by: int | None, command: str, project_root: Path) -> None:
    """After a training command: a run stopped by a signal says how to resume (even with --quiet,
    since it did not finish) and exits 128 + the signal number, as shells do."""
    if stopped_by is not None:
        typer.echo(f"stopped by signal {stopped_by}; continue with: lmkit {command} --resume -p {project_root}",
                   err=True)
        raise typer.Exit(code=128 + stopped_by)

