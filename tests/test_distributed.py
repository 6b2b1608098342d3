"""Data parallel training with torchrun: 2 CPU ranks (gloo) train exactly like one process with
the same global batch, and only rank 0 writes."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmkit import distributed
from lmkit.checkpoint import Checkpoint
from lmkit.project import Project
from tests.conftest import ROOT
from tests.test_train import fresh_copy, losses

SETTINGS = ["--preset", "tiny", "--set", "model.max_seq_len=32", "--set", "train.batch_size=8",
            "--set", "train.grad_accum=2", "--max-steps", "8", "--set", "train.eval_interval=4",
            "--set", "train.log_interval=1", "--set", "train.warmup_steps=2", "--quiet", "--json"]


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _lmkit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmkit", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


LLAMA = ["--arch", "llama", "--set", "model.n_kv_head=2"]


# Muon orthogonalises in bf16 (torch's Newton-Schulz), which turns float rounding differences of the
# all-reduced gradients into ~2e-5 of loss.
@pytest.mark.parametrize(("arch", "tolerance"), [(["--arch", "gpt"], 1e-5),
                                                 ([*LLAMA, "--set", "train.optimizer=muon"], 1e-4)],
                         ids=["gpt", "llama-muon"])
def test_two_ranks_give_the_single_process_loss_curve(arch: list[str], tolerance: float, tiny_project: Project,
                                                      tmp_path) -> None:
    one, two = fresh_copy(tiny_project, tmp_path / "one"), fresh_copy(tiny_project, tmp_path / "two")
    single = _lmkit("pretrain", "-p", str(one.root), *SETTINGS, *arch)
    assert single.returncode == 0, single.stderr
    double = _lmkit("pretrain", "-p", str(two.root), "--nproc", "2", *SETTINGS, *arch)
    assert double.returncode == 0, double.stderr
    assert len(double.stdout.strip().splitlines()) == 1  # one report, from rank 0
    curve_one, curve_two = losses(one, "run1"), losses(two, "run1")
    assert [s for s, _ in curve_two] == [s for s, _ in curve_one] == list(range(1, 9))
    assert all(abs(a - b) < tolerance for (_, a), (_, b) in zip(curve_one, curve_two)), (curve_one, curve_two)
    val_one, val_two = json.loads(single.stdout)["val_loss"], json.loads(double.stdout)["val_loss"]
    assert abs(val_one - val_two) < tolerance
    assert sorted(p.name for p in (two.root / "runs").iterdir()) == ["run1"]  # rank 1 made no run of its own
    assert sorted(p.name for p in (two.checkpoints_dir / "run1").iterdir()) == ["step-000008"]


def test_the_global_batch_must_divide_among_ranks(tiny_project: Project, tmp_path) -> None:
    project = fresh_copy(tiny_project, tmp_path)
    odd = _lmkit("pretrain", "-p", str(project.root), "--nproc", "2", *SETTINGS, "--set", "train.batch_size=7")
    # A user error on the ranks: one line, once, exit code 2, no launcher report or traceback.
    assert odd.returncode == 2 and odd.stderr.strip().splitlines() == [
        "error: train.batch_size=7 is the global micro-batch and must divide among 2 ranks"]


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
    # As a cluster scheduler does: SIGTERM to the launcher and to every rank (torch's launcher
    # starts the ranks in sessions of their own, so they are not in its process group).
    ranks = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _cmdline(pid).count(str(stopped.root))]
    os.killpg(process.pid, signal.SIGTERM)
    for pid in ranks:
        if pid != process.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    interrupted_at = Checkpoint(stopped.latest_checkpoint()).step
    assert 0 < interrupted_at < 300, (process.returncode, err.decode(errors="replace")[-3000:])
    resumed = _lmkit("pretrain", "--resume", "-p", str(stopped.root), "--nproc", "2", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(stopped, "run1") == losses(straight, "run1")  # bit for bit


@pytest.mark.parametrize("arch", [["--arch", "gpt"], LLAMA], ids=["gpt", "llama"])
def test_fsdp_on_two_ranks_trains_saves_and_resumes_like_one_process(arch: list[str], tiny_project: Project,
                                                                     tmp_path) -> None:
    import torch
    from safetensors.torch import load_file

    one, two = fresh_copy(tiny_project, tmp_path / "one"), fresh_copy(tiny_project, tmp_path / "two")
    settings = [*SETTINGS, *arch, "--set", "train.save_interval=4"]  # no dropout: each rank draws its own masks
    assert _lmkit("pretrain", "-p", str(one.root), *settings).returncode == 0
    sharded = _lmkit("pretrain", "-p", str(two.root), "--nproc", "2", "--strategy", "fsdp", *settings)
    assert sharded.returncode == 0, sharded.stderr

    def close(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
        return [s for s, _ in a] == [s for s, _ in b] and all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(a, b))

    assert close(losses(one, "run1"), losses(two, "run1"))
    # The checkpoint is the usual one, gathered from the shards: same tensors (the tied head stored
    # once), same optimizer state, so it resumes anywhere. Same to 1e-4: Adam divides by sqrt(v), so
    # where a gradient is near zero the shards' differently ordered sums move a weight by a visible
    # fraction of one step (lr 3e-3; 1.5e-5 measured on some CPUs).
    single, gathered = Checkpoint(one.latest_checkpoint()), Checkpoint(two.latest_checkpoint())
    tied = {"gpt": "transformer.wte.weight", "llama": "model.embed_tokens.weight"}[arch[1]]
    assert gathered.meta["tied_weights"] == single.meta["tied_weights"] == {"lm_head.weight": tied}
    for name in ("model.safetensors", "trainer.safetensors"):
        a, b = load_file(single.path / name), load_file(gathered.path / name)
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a if not k.startswith("rng")), name
    assert gathered.trainer().optimizer["param_groups"] == single.trainer().optimizer["param_groups"]

    # Resume: the sharded run on 2 ranks (its config says fsdp), the other in one process.
    resumed = _lmkit("pretrain", "--resume", "-p", str(two.root), "--nproc", "2", "--max-steps", "12", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert _lmkit("pretrain", "--resume", "-p", str(one.root), "--max-steps", "12").returncode == 0
    assert close(losses(one, "run1"), losses(two, "run1")) and len(losses(two, "run1")) == 12
