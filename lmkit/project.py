"""The project directory: every path inside it, and nothing else.

    lmkit.toml                      user-editable project config
    tokenizer/tokenizer.model       sentencepiece model (+ tokenizer.json: fingerprint, settings)
    data/{train,val}.bin            token ids, raw little-endian uint16/uint32 (+ .json metadata)
    checkpoints/<run>/step-000200/  one folder per saved step; checkpoints/latest.json points at one
    runs/<run>/                     config.json (resolved, saved before step 0) and metrics.jsonl
    curves.png, <run>.png           `lmkit plot`'s images, unless told another file
    .lock                           held (flock) by the process that trains in the project; its PID
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from lmkit.errors import CheckpointError, LmkitError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; projects are not locked
    fcntl = None  # type: ignore[assignment]
from lmkit.fileio import clean_leftovers, content_fingerprint, open_owned, recover_dir

ENV_VAR = "LMKIT_PROJECT"
F = TypeVar("F", bound=Callable[..., Any])
_HELD: set[Path] = set()  # projects this process holds the lock of (the lock is re-entrant)
_RUN_RE = re.compile(r"^run(\d+)$")
_STEP_RE = re.compile(r"^step-(\d+)$")


class Project:
    """Paths inside one project directory. Creating the object touches nothing on disk."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def open(cls, root: Path | str | None = None, *, create: bool = True) -> Project:
        """Open ROOT, else $LMKIT_PROJECT, else the current directory; create it if asked."""
        chosen = Path(root or os.environ.get(ENV_VAR) or ".")
        if chosen.exists() and not chosen.is_dir():
            raise LmkitError(f"project path {chosen} is a file, not a directory")
        if create:
            chosen.mkdir(parents=True, exist_ok=True)
        elif not chosen.is_dir():
            raise LmkitError(f"project directory {chosen} does not exist")
        return cls(chosen)

    @classmethod
    @contextlib.contextmanager
    def writing(cls, root: Path | str | None = None) -> Iterator[Project]:
        """The project at ROOT (as open, created when new) for a command that writes into it, holding
        its lock throughout. A project is only made by a command that gets going: when the command
        fails (a missing corpus, a bad setting) before it has started a run, the folders it made go
        again, with what it wrote there -- lmkit's own entries only; anything else keeps the folder.
        """
        chosen = Path(root or os.environ.get(ENV_VAR) or ".")
        made = [p for p in (chosen, *chosen.parents) if not p.exists()]  # innermost first
        project = cls.open(chosen)
        with project.lock():
            try:
                yield project
            except BaseException:
                if made and (fcntl is None or project.root.resolve() in _HELD):  # torchrun: rank 0 tidies
                    project._unmake(made)
                raise

    def _unmake(self, made: list[Path]) -> None:
        """Remove what a failed first command wrote into this new project, then the folders MADE."""
        if self.checkpoints_dir.exists() or self.runs_dir.exists():
            return  # a run started: the inputs were good, and what it wrote is the user's
        for entry in (self.config_file, self.tokenizer_dir, self.data_dir, self.root / ".lock"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink(missing_ok=True)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # holds something lmkit did not write
                return

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the project's write lock: one process trains in a project at a time (two would take
        each other's live run for an interrupted one and write the same files). The operating
        system drops the lock when its process dies, so a crash leaves none behind. Under torchrun
        only rank 0 takes it: the other ranks are the same job.

        Raises:
            LmkitError: another process holds it (its PID is named), or .lock is a link (symbolic or
                hard: writing the PID would empty the file it shares its contents with).
        """
        key = self.root.resolve()
        if key in _HELD or int(os.environ.get("RANK", "0")) != 0 or fcntl is None:
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = open_owned(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_nlink != 1 or not stat.S_ISREG(os.fstat(fd).st_mode):
                raise LmkitError(f"{self.root / '.lock'} is not lmkit's own lock file (it is linked to another file, "
                                 "or not a file); remove it and run the command again")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise LmkitError(f"{self.root} is in use by another lmkit process (PID {holder}); wait for it "
                                 "to finish or stop it, or use another project") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _HELD.add(key)
            try:
                self.clean_leftovers()
                yield
            finally:
                _HELD.discard(key)
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing releases the flock

    def clean_leftovers(self) -> None:
        """Remove what killed lmkit processes left in the project's folders: files and folders under
        the atomic writers' temporary names, with all they hold (a checkpoint folder a save was
        writing), after putting back a checkpoint folder a kill left moved aside. Run on taking the
        lock, whoever's command it is (a new run, a resume, a tokenizer): no lmkit process writes in
        the project then, this one included, so even what carries this process's PID is stale."""
        folders = [self.root]
        for top in (self.tokenizer_dir, self.data_dir, self.checkpoints_dir, self.runs_dir):
            folders += [top, *(p for p in (top.glob("*/") if top.is_dir() else []) if not p.is_symlink())]
        for folder in folders:
            clean_leftovers(folder, mine_too=True)

    def writer(self) -> str | None:
        """The PID of the process that holds the project's lock (trains in it now), or None."""
        path = self.root / ".lock"
        if fcntl is None or path.is_symlink() or not path.is_file():
            return None  # a link is no lock of lmkit's: lock() refuses to take one
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:  # replaced by a link since, or gone
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    # --- config -------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.root / "lmkit.toml"

    # --- tokenizer ----------------------------------------------------------------------------
    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def tokenizer_model(self) -> Path:
        return self.tokenizer_dir / "tokenizer.model"

    def has_tokenizer(self) -> bool:
        return self.tokenizer_model.is_file()

    def require_tokenizer(self, fingerprint: str, what: str) -> None:
        """A project has one tokenizer: refuse WHAT (e.g. "the teacher ...") when it uses another
        than the project's own, as the project's checkpoints and `lmkit tokenize -p` would disagree.

        Raises:
            CheckpointError: with both fingerprints and the way out.
        """
        if not self.has_tokenizer():
            return
        own = content_fingerprint(self.tokenizer_model.read_bytes())  # as Tokenizer.fingerprint
        if own != fingerprint:
            raise CheckpointError(f"{self.root} has its own tokenizer ({own}), but {what} uses tokenizer "
                                  f"{fingerprint}; a project has one tokenizer, so use another project (-p NEW)")

    # --- prepared data ------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def tokens_file(self, split: str, dataset: str = "") -> Path:
        """data/{split}.bin for pretraining data; data/{dataset}/{split}.bin for another dataset."""
        return self.data_dir / dataset / f"{split}.bin"

    # --- checkpoints --------------------------------------------------------------------------
    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint_dir(self, run: str, step: int) -> Path:
        return self.checkpoints_dir / run / f"step-{step:06d}"

    def run_checkpoints(self, run: str) -> list[Path]:
        """Saved step folders of RUN, oldest first."""
        run_dir = self.checkpoints_dir / run
        if not run_dir.is_dir():
            return []
        steps = [p for p in run_dir.iterdir() if p.is_dir() and _STEP_RE.match(p.name)]
        return sorted(steps, key=lambda p: int(_STEP_RE.match(p.name).group(1)))  # type: ignore[union-attr]

    def best_checkpoint_dir(self, run: str) -> Path:
        return self.checkpoints_dir / run / "best"

    @property
    def latest_pointer(self) -> Path:
        return self.checkpoints_dir / "latest.json"

    def latest_checkpoint(self) -> Path:
        """The checkpoint the latest pointer names.

        Raises:
            CheckpointError: when the project has none yet.
        """
        try:
            relative = json.loads(self.latest_pointer.read_text(encoding="utf-8"))["path"]
        except FileNotFoundError:
            raise CheckpointError(
                f"no checkpoint in {self.root} yet — run 'lmkit pretrain CORPUS -p {self.root}' first") from None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            relative = None
        if not isinstance(relative, str):
            raise CheckpointError(f"{self.latest_pointer} is damaged; pass a checkpoint folder with --checkpoint")
        path = self.checkpoints_dir / relative
        if not path.resolve().is_relative_to(self.checkpoints_dir.resolve()):
            raise CheckpointError(f"{self.latest_pointer} points at {relative}, outside the project's checkpoints; "
                                  "pass a checkpoint folder with --checkpoint")
        recover_dir(path)  # a save killed halfway through replacing this folder left the old one aside
        if not path.is_dir():
            raise CheckpointError(f"{self.latest_pointer} points at {path}, which no longer exists; "
                                  "pass a checkpoint folder with --checkpoint")
        return path

    def newest_step_checkpoint(self) -> Path | None:
        """The newest step folder of the newest run (runN with the largest N): what latest.json names
        while training, found without it. Copies reset file times, so they are not used."""
        runs = [(int(m.group(1)), p.name) for p in self.checkpoints_dir.glob("run*") if (m := _RUN_RE.match(p.name))]
        for _, run in sorted(runs, reverse=True):
            if steps := self.run_checkpoints(run):
                return steps[-1]
        return None

    # --- runs ---------------------------------------------------------------------------------
    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run_dir(self, run: str) -> Path:
        return self.runs_dir / run

    def metrics_file(self, run: str) -> Path:
        return self.run_dir(run) / "metrics.jsonl"

    def run_config_file(self, run: str) -> Path:
        return self.run_dir(run) / "config.json"

    def has_runs(self) -> bool:
        """Whether the project has run folders or checkpoints (runs to list)."""
        return self.runs_dir.is_dir() or self.checkpoints_dir.is_dir()

    def curves_image(self, run: str | None = None) -> Path:
        """Where `lmkit plot` draws RUN's curves (None: all the project's runs)."""
        return self.root / f"{run or 'curves'}.png"

    def new_run_name(self) -> str:
        """run1, run2, ... — one more than any run that has metrics or checkpoints."""
        numbers = [0]
        for parent in (self.runs_dir, self.checkpoints_dir):
            if parent.is_dir():
                numbers += [int(m.group(1)) for p in parent.iterdir() if (m := _RUN_RE.match(p.name))]
        return f"run{max(numbers) + 1}"


_OWN_FOLDERS = ("checkpoints", "tokenizer", "data", "runs")  # what only lmkit writes in a project


def is_project_dir(path: Path) -> bool:
    """Whether PATH is an lmkit project: it has a lock, a config, checkpoints or a tokenizer."""
    return any((path / name).exists() for name in (".lock", "lmkit.toml", "checkpoints")) or \
        (path / "tokenizer" / "tokenizer.model").is_file()


def project_holding(path: Path) -> Project | None:
    """The project that PATH is, or lies in one of the own folders of (checkpoints, tokenizer, data,
    runs: where only lmkit writes); None for anything else, such as a folder of the user's beside them."""
    resolved = path.resolve()
    if is_project_dir(resolved):
        return Project(resolved)
    for parent in resolved.parents:
        if resolved.relative_to(parent).parts[0] in _OWN_FOLDERS and is_project_dir(parent):
            return Project(parent)
    return None


def run_holding(path: Path) -> tuple[Project, str] | None:
    """The project and run that PATH is the run folder of (PROJECT/runs/RUN, with its saved config), or None."""
    project, run = Project(path.parent.parent), path.name
    if project.run_dir(run) != path or not project.run_config_file(run).is_file():
        return None
    return project, run


def exclusive(fn: F) -> F:
    """Run FN(project, ...) holding project.lock()."""
    @functools.wraps(fn)
    def locked(project: Project, *args: Any, **kwargs: Any) -> Any:
        with project.lock():
            return fn(project, *args, **kwargs)
    return locked  # type: ignore[return-value]
