"""Atomic writes: write under a temporary name, fsync, rename. A crash or Ctrl-C at any moment
leaves either the old file/folder or the new one, never half of one.

Temporary names are hidden siblings, `.NAME.tmp-PID` (being written) and `.NAME.old-PID` (a
replaced folder, until the new one is in place); a process killed with kill -9 leaves them
behind, and clean_leftovers removes those of processes that are gone."""

from __future__ import annotations

import contextlib
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on clean exit fsync its files and rename it to PATH.

    An existing PATH is replaced only after the new folder is complete.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
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


def recover_dir(path: Path) -> bool:
    """When atomic_dir was killed between moving the old PATH aside and moving the new one in, put
    the old folder back (it is whole; the new one may not be); True when PATH exists afterwards."""
    if path.exists():
        return True
    for old in sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True):
        match = _LEFTOVER_RE.match(old.name)
        if match and old.is_dir() and not _alive(int(match["pid"])):
            try:
                os.replace(old, path)
            except OSError:  # a read-only project: leave it as it is
                return False
            fsync_dir(path.parent)
            return True
    return False


def clean_leftovers(folder: Path) -> None:
    """Remove the temporary files and folders that dead processes left in FOLDER, first putting
    back any replaced folder whose replacement never arrived (recover_dir)."""
    if not folder.is_dir():
        return
    leftovers = [(entry, match) for entry in folder.iterdir()
                 if (match := _LEFTOVER_RE.match(entry.name)) and not _alive(int(match["pid"]))]
    for _, match in leftovers:
        if match["kind"] == "old":
            recover_dir(folder / match["name"])
    for entry, _ in leftovers:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
