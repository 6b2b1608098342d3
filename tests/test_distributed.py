"""Data parallel training with torchrun: 2 CPU ranks (gloo) train exactly like one process with
the same global batch, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmkit import distributed
from lmkit.checkpoint import Checkpoint
from lmkit.project import Project
from tests.conftest import ROOT
from tests.test_train import fresh_copy, losses

SETTINGS = ["--preset", "tiny", "--set", "model.max_seq_len=32", "--set", "train.batch_size=8",
            "--set", "train.grad_accum=2", "--max-steps", "8", "--set", "train.eval_interval=4",
            "--set", "train.log_interval=1", "--set", "train.warmup_steps=2", "--quiet", "--json"]


def _lmkit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmkit", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_two_ranks_give_the_single_process_loss_curve(tiny_project: Project, tmp_path) -> None:
    one, two = fresh_copy(tiny_project, tmp_path / "one"), fresh_copy(tiny_project, tmp_path / "two")
    single = _lmkit("pretrain", "-p", str(one.root), *SETTINGS)
    assert single.returncode == 0, single.stderr
    double = _lmkit("pretrain", "-p", str(two.root), "--nproc", "2", *SETTINGS)
    assert double.returncode == 0, double.stderr
    assert len(double.stdout.strip().splitlines()) == 1  # one report, from rank 0
    curve_one, curve_two = losses(one, "run1"), losses(two, "run1")
    assert [s for s, _ in curve_two] == [s for s, _ in curve_one] == list(range(1, 9))
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(curve_one, curve_two)), (curve_one, curve_two)
    val_one, val_two = json.loads(single.stdout)["val_loss"], json.loads(double.stdout)["val_loss"]
    assert abs(val_one - val_two) < 1e-5
    assert sorted(p.name for p in (two.root / "runs").iterdir()) == ["run1"]  # rank 1 made no run of its own
    assert sorted(p.name for p in (two.checkpoints_dir / "run1").iterdir()) == ["step-000008"]


def test_the_global_batch_must_divide_among_ranks(tiny_project: Project, tmp_path) -> None:
    project = fresh_copy(tiny_project, tmp_path)
    odd = _lmkit("pretrain", "-p", str(project.root), "--nproc", "2", *SETTINGS, "--set", "train.batch_size=7")
    assert odd.returncode != 0 and "must divide among 2 ranks" in odd.stderr


def test_a_batch_is_cut_into_equal_contiguous_slices() -> None:
    import torch

    batch = (torch.arange(8).view(4, 2), torch.arange(4))
    first = distributed.shard(batch, distributed.World(rank=0, size=2))
    second = distributed.shard(batch, distributed.World(rank=1, size=2))
    assert first[1].tolist() == [0, 1] and second[1].tolist() == [2, 3]
    assert torch.equal(torch.cat([first[0], second[0]]), batch[0])
    assert distributed.shard(batch, distributed.World()) is batch


@pytest.fixture(autouse=True)
def _no_inherited_torchrun_env(monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_sigterm_on_two_ranks_then_resume_equals_the_uninterrupted_run(tiny_project: Project, tmp_path) -> None:
    import signal
    import time

    settings = [*SETTINGS, "--max-steps", "300", "--set", "train.eval_interval=100", "--set", "train.save_interval=20",
                "--set", "model.dropout=0.1"]  # the later --max-steps wins
    straight, stopped = fresh_copy(tiny_project, tmp_path / "a"), fresh_copy(tiny_project, tmp_path / "b")
    assert _lmkit("pretrain", "-p", str(straight.root), "--nproc", "2", *settings).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lmkit", "pretrain", "-p", str(stopped.root), "--nproc", "2",
                                *settings], env=env, cwd=ROOT, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = stopped.metrics_file("run1")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 30):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)  # Ctrl-C-like: the launcher and every rank get it
    process.wait(timeout=120)
    interrupted_at = Checkpoint(stopped.latest_checkpoint()).step
    assert 0 < interrupted_at < 300
    resumed = _lmkit("pretrain", "--resume", "-p", str(stopped.root), "--nproc", "2", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(stopped, "run1") == losses(straight, "run1")  # bit for bit
