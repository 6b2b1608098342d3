"""Atomic folder replacement survives a kill at its one unsafe moment, and leftovers of killed
processes are cleaned (but never those of a process that is still running)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from lmkit.errors import LmkitError
from lmkit.fileio import atomic_dir, atomic_write_json, clean_leftovers, recover_dir, write_failure
from lmkit.project import Project


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_kill_between_the_two_renames_leaves_the_old_folder_to_put_back(tmp_path) -> None:
    project = Project.open(tmp_path)
    best = project.checkpoints_dir / "run1" / "best"
    with atomic_dir(best) as tmp:
        (tmp / "config.json").write_text("old")
    pid = _dead_pid()
    # what a kill -9 right after `os.replace(path, old)` leaves: the old folder aside, the new one whole
    os.replace(best, best.with_name(f".best.old-{pid}"))
    new = best.with_name(f".best.tmp-{pid}")
    new.mkdir()
    (new / "config.json").write_text("new")
    project.latest_pointer.write_text(json.dumps({"path": "run1/best"}))
    assert project.latest_checkpoint() == best  # put back when it is looked up
    assert (best / "config.json").read_text() == "old"
    clean_leftovers(best.parent)
    assert sorted(p.name for p in best.parent.iterdir()) == ["best"]


def test_leftovers_of_dead_processes_go_and_those_of_live_ones_stay(tmp_path) -> None:
    dead, alive = _dead_pid(), os.getpid()
    (tmp_path / f".train.bin.tmp-{dead}").write_bytes(b"")
    (tmp_path / f".step-000010.tmp-{dead}").mkdir()
    (tmp_path / f".train.bin.tmp-{alive}").write_bytes(b"")
    (tmp_path / f".step-000020.old-{dead}").mkdir()  # its folder is in place: nothing to put back
    (tmp_path / "step-000020").mkdir()
    (tmp_path / ".hidden-but-mine").write_text("keep")
    clean_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden-but-mine", f".train.bin.tmp-{alive}", "step-000020"]
    assert recover_dir(tmp_path / "step-000020") and not recover_dir(tmp_path / "step-000030")


def test_taking_a_projects_lock_cleans_every_leftover_in_it_nested_ones_too(tmp_path) -> None:
    """Whoever holds the lock is the only lmkit process writing in the project, so every temporary
    name there is a dead process's -- even one with this PID (a container restarts its processes
    with the same PIDs): the folders go with the .tmpXXXXXX files safetensors writes inside them."""
    project = Project.open(tmp_path)
    run = project.checkpoints_dir / "run1"
    project.data_dir.mkdir()
    for step, pid in ((8, _dead_pid()), (12, os.getpid())):
        (run / f".step-{step:06d}.tmp-{pid}").mkdir(parents=True)
        (run / f".step-{step:06d}.tmp-{pid}" / ".tmpAb3dE9").write_bytes(b"\0" * 100)
        (project.data_dir / f".train.bin.tmp-{pid}").write_bytes(b"")
    (run / "step-000004").mkdir()
    with project.lock():
        assert sorted(p.name for p in run.iterdir()) == ["step-000004"]
        assert list(project.data_dir.iterdir()) == []


def test_one_process_at_a_time_holds_a_projects_lock(tmp_path) -> None:
    script = (f"import time; from lmkit.project import Project\nwith Project({str(tmp_path)!r}).lock():\n"
              "    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LmkitError, match=f"in use by another lmkit process \\(PID {holder.pid}\\)"):
            with Project(tmp_path).lock():
                pass
    finally:
        holder.kill()
        holder.wait()
    with Project(tmp_path).lock(), Project(tmp_path).lock():  # the dead holder's lock went with it; re-entrant
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch) -> None:
    target = tmp_path / "data" / "train.json"
    atomic_write_json(target, {"old": True})

    def disk_full(fd: int) -> None:  # write() and fsync() errors carry no file name
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError) as caught:
        atomic_write_json(target, {"new": True})
    assert caught.value.filename == str(target) and caught.value.errno == errno.ENOSPC
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in target.parent.iterdir()] == ["train.json"]
    assert write_failure(caught.value) == (f"cannot write {target}: the disk is full; free some space and run the "
                                           "command again (what lmkit saved before is untouched)")


def test_write_failures_show_the_final_name_not_the_temporary_one() -> None:
    read_only = OSError(errno.EROFS, "Read-only file system", "/p/checkpoints/run1/.step-000004.tmp-77/config.json")
    assert write_failure(read_only).startswith("cannot write /p/checkpoints/run1/step-000004/config.json: the file "
                                               "system is read-only; use a writable project")
    assert write_failure(OSError(errno.EIO, "I/O error", "/p/x")) is None  # not a full disk or a read-only one


@pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW") or sys.platform == "win32", reason="POSIX links and flock")
def test_a_linked_lock_is_refused_and_the_file_it_points_at_is_untouched(tmp_path) -> None:
    victim = tmp_path / "victims" / "f1.txt"
    victim.parent.mkdir()
    victim.write_text("precious\n")
    project = tmp_path / "p"
    project.mkdir()
    (project / ".lock").symlink_to("../victims/f1.txt")
    with pytest.raises(LmkitError, match=r"\.lock is a symbolic link, and lmkit never writes through a link"):
        with Project(project).lock():
            pass
    assert Project(project).writer() is None
    (project / ".lock").unlink()
    os.link(victim, project / ".lock")  # a hard link would be emptied just the same
    with pytest.raises(LmkitError, match="is not lmkit's own lock file"):
        with Project(project).lock():
            pass
    assert victim.read_text() == "precious\n"


@pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW"), reason="POSIX links")
def test_atomic_writes_and_appends_never_write_through_a_link(tmp_path) -> None:
    from lmkit.fileio import append_text, atomic_file

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    target = tmp_path / "data" / "train.json"
    target.parent.mkdir()
    for name in (target.name, "train.bin"):  # the temporary names the atomic writers use
        (target.parent / f".{name}.tmp-{os.getpid()}").symlink_to(victim)
    atomic_write_json(target, {"new": True})
    with atomic_file(target.with_name("train.bin")) as f:
        f.write(b"ids")
    assert json.loads(target.read_text()) == {"new": True} and target.with_name("train.bin").read_bytes() == b"ids"
    metrics = tmp_path / "metrics.jsonl"
    metrics.symlink_to(victim)
    with pytest.raises(LmkitError, match="metrics.jsonl is a symbolic link"):
        append_text(metrics)
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["train.bin", "train.json"]
