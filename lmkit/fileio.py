"""Atomic writes: write under a temporary name, fsync, rename. A crash or Ctrl-C at any moment
leaves either the old file/folder or the new one, never half of one.

Temporary names are hidden siblings, `.NAME.tmp-PID` (being written) and `.NAME.old-PID` (a
replaced folder, until the new one is in place); a process killed with kill -9 leaves them
behind, and clean_leftovers removes those of processes that are gone."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmkit.errors import LmkitError


def fsync_dir(path: Path) -> None:
    """Make a rename inside PATH durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def content_fingerprint(data: bytes) -> str:
    """What identifies a file's bytes: the first 16 hex digits of their sha256."""
    return hashlib.sha256(data).hexdigest()[:16]


# Write failures the user fixes outside lmkit, and what to tell them.
_WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full; free some space and run the command again",
    errno.EDQUOT: "the disk quota is used up; free some space and run the command again",
    errno.EFBIG: "the file is larger than this file system allows; write it elsewhere",
    errno.EROFS: "the file system is read-only; use a writable project (-p) or output path",
    errno.EACCES: "permission denied; check the folder's owner and mode, or use another path",
    errno.EPERM: "the operation is not permitted here; check the folder's owner and mode, or use another path",
}


def write_failure(err: OSError) -> str | None:
    """The one-line message for an OSError a full disk, read-only or foreign folder causes (None for
    others): which file, why, what to do. Atomic writes mean nothing written before is damaged."""
    if err.errno not in _WRITE_FAILURES:
        return None
    where = shown_path(err.filename) if err.filename else "a file"
    return f"cannot write {where}: {_WRITE_FAILURES[err.errno]} (what lmkit saved before is untouched)"


def shown_path(name: str | os.PathLike[str]) -> str:
    """NAME as the user knows it: a temporary `.X.tmp-PID` component of the atomic writers shown as X."""
    return str(Path(*[m["name"] if (m := _LEFTOVER_RE.match(part)) else part for part in Path(name).parts]))


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Attach PATH to a write failure that names no file (write() and close() errors do not), so
    the message can say which file could not be written."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno in _WRITE_FAILURES:
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # absent on Windows, where creating a symlink needs admin rights


def open_owned(path: Path, flags: int, mode: int = 0o666) -> int:
    """os.open for a file lmkit owns (a lock, a log it appends to, a temporary file), never through a
    symbolic link: a link put in its place would make lmkit write, or empty, whatever it points at.

    Raises:
        LmkitError: PATH is a symbolic link.
    """
    try:
        return os.open(path, flags | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
            raise LmkitError(f"{shown_path(path)} is a symbolic link, and lmkit never writes through a link it did "
                             "not make; remove the link and run the command again") from None
        raise


def append_text(path: Path) -> Any:
    """PATH opened to append UTF-8 text (created if missing), never through a symbolic link (open_owned)."""
    return os.fdopen(open_owned(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding="utf-8")


def _create_tmp(tmp: Path, mode: str) -> Any:
    """The new temporary file TMP opened in MODE: a file of that name (one this PID left behind, or a
    link someone put there) goes first, and O_EXCL makes sure the file written is the one created."""
    _discard(tmp)
    return os.fdopen(open_owned(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), mode)


def _discard(path: Path) -> None:
    """Remove a temporary file if it is there; a failure here must not hide the one that got us here."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with naming(path), _create_tmp(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        _discard(tmp)
    fsync_dir(path.parent)


def check_target_dir(path: Path, kind: str, ours: Callable[[Path], bool], force: bool) -> None:
    """Refuse to write a KIND into the folder PATH unless it is new or empty, or -- with FORCE --
    a KIND that lmkit wrote there before (OURS(path)): lmkit never deletes or mixes into a folder
    it did not create.

    Raises:
        LmkitError: PATH is a file, holds other files, or holds a KIND and FORCE is off.
    """
    if not path.exists():
        return
    if not path.is_dir():
        raise LmkitError(f"{path} is a file; give a folder to write the {kind} into")
    if not any(path.iterdir()):
        return
    if not ours(path):
        raise LmkitError(f"{path} is a folder that holds other files, which lmkit will not replace or mix with; "
                         f"give a new or empty folder for the {kind}")
    if not force:
        raise LmkitError(f"{path} already holds a {kind}; --force replaces it")


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of PATH for writing; on clean exit fsync it and rename it to PATH."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with naming(path), _create_tmp(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        _discard(tmp)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on clean exit fsync its files and rename it to PATH.

    An existing PATH is replaced only after the new folder is complete.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if tmp.is_symlink():  # rmtree refuses a link; the link itself goes, never what it points at
        tmp.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with naming(path):
            tmp.mkdir()
            yield tmp
            for child in tmp.iterdir():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(tmp)
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


_LEFTOVER_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _left_behind(pid: int, mine_too: bool) -> bool:
    """Whether what carries PID is a dead process's: PID is gone, or (MINE_TOO) it is this process's
    own, which writes nothing there now -- an earlier process had the same PID (containers restart
    their processes with the same PIDs)."""
    return (mine_too and pid == os.getpid()) or not _alive(pid)


def recover_dir(path: Path, *, mine_too: bool = False) -> bool:
    """When atomic_dir was killed between moving the old PATH aside and moving the new one in, put
    the old folder back (it is whole; the new one may not be); True when PATH exists afterwards.
    MINE_TOO: see clean_leftovers."""
    if path.exists():
        return True
    for old in sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True):
        match = _LEFTOVER_RE.match(old.name)
        if match and old.is_dir() and _left_behind(int(match["pid"]), mine_too):
            try:
                os.replace(old, path)
            except OSError:  # a read-only project: leave it as it is
                return False
            fsync_dir(path.parent)
            return True
    return False


def clean_leftovers(folder: Path, *, mine_too: bool = False) -> None:
    """Remove the temporary files and folders that dead processes left in FOLDER, with all they
    hold (a temporary checkpoint folder holds safetensors' own `.tmpXXXXXX` of a file it was
    writing), first putting back any replaced folder whose replacement never arrived (recover_dir).

    Args:
        mine_too: this process writes nothing in FOLDER now (it has just taken the project's lock),
            so what carries its own PID is an earlier process's too.
    """
    if not folder.is_dir():
        return
    leftovers = [(entry, match) for entry in folder.iterdir()
                 if (match := _LEFTOVER_RE.match(entry.name)) and _left_behind(int(match["pid"]), mine_too)]
    for _, match in leftovers:
        if match["kind"] == "old":
            recover_dir(folder / match["name"], mine_too=mine_too)
    for entry, _ in leftovers:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            _discard(entry)  # gone already, or a read-only project: nothing to stop for
