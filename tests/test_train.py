from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmkit import train
from lmkit.batches import LMBatch
from lmkit.checkpoint import Checkpoint, file_sha256
from lmkit.config import TrainConfig
from lmkit.errors import CheckpointError, TrainingError
from lmkit.models import build_model
from lmkit.prepare import TokenFile
from lmkit.project import Project
from tests.conftest import overwrite_middle, tiny_run_config


def fresh_copy(tiny_project: Project, tmp_path) -> Project:
    """The tiny project's tokenizer and prepared data, without its runs."""
    project = Project.open(tmp_path / "copy")
    shutil.copytree(tiny_project.tokenizer_dir, project.tokenizer_dir)
    shutil.copytree(tiny_project.data_dir, project.data_dir)
    return project


def signal_at(step: int, signum: int = signal.SIGTERM):  # noqa: ANN201
    """A progress callback that sends SIGNUM to this process when training reaches STEP."""
    def progress(report: train.Progress) -> None:
        if report.step == step:
            signal.raise_signal(signum)
    return progress


def losses(project: Project, run: str) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in project.metrics_file(run).read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records]


def test_loss_falls_well_below_the_unigram_entropy(tiny_project: Project, tmp_path) -> None:
    project = fresh_copy(tiny_project, tmp_path)
    tokens = TokenFile.open(project.tokens_file("train")).array()
    counts = Counter(tokens.tolist())
    unigram = -sum(c / len(tokens) * math.log(c / len(tokens)) for c in counts.values())
    cfg = tiny_run_config(max_steps=250, eval_interval=250, log_interval=50, batch_size=32, lr=5e-3)
    result = train.pretrain(project, [], cfg)
    assert result.outcome.val_loss is not None and result.outcome.val_loss < unigram - 0.5


def test_interrupt_then_resume_gives_exactly_the_uninterrupted_losses(tiny_project: Project, tmp_path) -> None:
    cfg = tiny_run_config(max_steps=24, grad_accum=2, eval_interval=8, save_interval=10)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.1))  # so RNG state matters
    straight = fresh_copy(tiny_project, tmp_path / "a")
    train.pretrain(straight, [], cfg)

    interrupted = fresh_copy(tiny_project, tmp_path / "b")
    first = train.pretrain(interrupted, [], cfg, progress=signal_at(13, signal.SIGINT))
    assert first.outcome.stopped_by == signal.SIGINT and first.state.step == 13
    assert interrupted.latest_checkpoint().name == "step-000013"
    second = train.resume(interrupted)
    assert second.outcome.stopped_by is None and second.state.step == 24
    assert losses(interrupted, "run1") == losses(straight, "run1")
    assert second.outcome.val_loss == Checkpoint(straight.latest_checkpoint()).meta["metrics"]["val_loss"]


def test_resume_truncates_metrics_logged_after_the_checkpoint(tiny_project: Project, tmp_path) -> None:
    project = fresh_copy(tiny_project, tmp_path)
    train.pretrain(project, [], tiny_run_config(max_steps=10, save_interval=5))
    before = losses(project, "run1")
    # Pretend the process died after logging step 10 but before its checkpoint: resume from step 5.
    shutil.rmtree(project.checkpoint_dir("run1", 10))
    train.checkpoint.set_latest(project, project.checkpoint_dir("run1", 5))
    train.resume(project)
    assert losses(project, "run1") == before


@pytest.mark.parametrize("damage", ["torn last line", "no runs folder"])
def test_resume_survives_a_torn_metrics_line_or_a_missing_runs_folder(damage: str, tiny_project: Project,
                                                                      tmp_path) -> None:
    project = fresh_copy(tiny_project, tmp_path)
    train.pretrain(project, [], tiny_run_config(max_steps=10, save_interval=5))
    before = losses(project, "run1")
    shutil.rmtree(project.checkpoint_dir("run1", 10))
    train.checkpoint.set_latest(project, project.checkpoint_dir("run1", 5))
    metrics = project.metrics_file("run1")
    if damage == "torn last line":
        metrics.write_text(metrics.read_text() + '{"step": 11, "lo')
    else:
        shutil.rmtree(project.root / "runs")
    train.resume(project)
    after = losses(project, "run1")
    assert after == (before if damage == "torn last line" else [s for s in before if s[0] > 5])


def test_time_budget_stops_the_run_and_saves(tiny_project: Project, tmp_path) -> None:
    project = fresh_copy(tiny_project, tmp_path)
    result = train.pretrain(project, [], tiny_run_config(max_steps=100_000, time_budget=1.0))
    assert 0 < result.state.step < 100_000
    assert result.state.elapsed >= 1.0
    assert project.latest_checkpoint() == result.outcome.checkpoint


def test_old_checkpoints_are_pruned_but_the_latest_kept(tiny_project: Project, tmp_path) -> None:
    project = fresh_copy(tiny_project, tmp_path)
    train.pretrain(project, [], tiny_run_config(max_steps=20, save_interval=4, keep_checkpoints=2))
    assert [p.name for p in project.run_checkpoints("run1")] == ["step-000016", "step-000020"]


def test_checkpoints_are_saved_at_every_save_interval_whatever_the_log_interval(tiny_project: Project,
                                                                               tmp_path) -> None:
    project = fresh_copy(tiny_project, tmp_path)
    train.pretrain(project, [], tiny_run_config(max_steps=40, save_interval=15, log_interval=10, eval_interval=20,
                                                keep_checkpoints=10))
    assert [p.name for p in project.run_checkpoints("run1")] == ["step-000015", "step-000030", "step-000040"]


def test_a_diverged_run_stops_with_a_clear_error_and_keeps_its_finite_checkpoints(tiny_project: Project,
                                                                                  tmp_path) -> None:
    project = fresh_copy(tiny_project, tmp_path)
    with pytest.raises(TrainingError, match="training (loss|weights) became .* by step"):
        train.pretrain(project, [], tiny_run_config(max_steps=60, lr=1e5, min_lr=1e5, warmup_steps=0, grad_clip=0.0,
                                                    save_interval=2, log_interval=1, keep_checkpoints=100))
    for saved in project.run_checkpoints("run1"):
        Checkpoint(saved).model()  # whatever was written is finite: loading checks
    train.pretrain(project, [], tiny_run_config(max_steps=2))
    diverged = project.run_checkpoints("run2")[-1]
    weights = load_file(diverged / "model.safetensors")
    name = next(iter(weights))
    weights[name][0] = math.nan
    save_file(weights, diverged / "model.safetensors")  # as saved, with its checksum: not damage
    _edit_json(diverged / "config.json",
               lambda d: d["sha256"].update({"model.safetensors": file_sha256(diverged / "model.safetensors")}))
    with pytest.raises(CheckpointError, match="not finite"):
        Checkpoint(diverged).model()


def test_learning_rate_warms_up_then_decays_to_min_lr() -> None:
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    lrs = [train.learning_rate(step, cfg) for step in range(100)]
    assert lrs[:10] == sorted(lrs[:10]) and lrs[9] < cfg.lr
    assert lrs[10] == pytest.approx(cfg.lr)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert train.learning_rate(100, cfg) == pytest.approx(cfg.min_lr)
    budget = dataclasses.replace(cfg, time_budget=60.0)
    assert train.learning_rate(20, budget, elapsed=60.0) == pytest.approx(cfg.min_lr)


def test_weight_decay_applies_to_matrices_only(tiny_model_config) -> None:
    model = build_model(tiny_model_config)
    decayed, plain = train.make_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_runs_are_numbered_and_config_saved_before_training(tiny_project: Project, tmp_path) -> None:
    project = fresh_copy(tiny_project, tmp_path)
    cfg = tiny_run_config(max_steps=2)
    train.pretrain(project, [], cfg)
    train.pretrain(project, [], cfg)
    saved = json.loads(project.run_config_file("run2").read_text())
    assert saved["model"]["vocab_size"] > 256 and saved["train"]["max_steps"] == 2
    assert project.latest_checkpoint() == project.checkpoint_dir("run2", 2)
    assert torch.get_num_threads() >= 1


def _cut_short(path: Path) -> None:  # a copy or a write that stopped halfway
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


DAMAGES: dict[str, Callable[[Path], None]] = {
    "model.safetensors cut short": lambda c: _cut_short(c / "model.safetensors"),
    "trainer.safetensors cut short": lambda c: _cut_short(c / "trainer.safetensors"),
    "config.json cut short": lambda c: _cut_short(c / "config.json"),
    "tokenizer.model empty": lambda c: (c / "tokenizer.model").write_bytes(b""),
    "tokenizer.model garbage": lambda c: (c / "tokenizer.model").write_text("not a model\n"),
    "tokenizer.model missing": lambda c: (c / "tokenizer.model").unlink(),
    "trainer.json a list": lambda c: (c / "trainer.json").write_text("[]"),
    "trainer.json string step": lambda c: _edit_json(c / "trainer.json", lambda d: d["state"].update(step="12")),
    "config.json string step": lambda c: _edit_json(c / "config.json", lambda d: d.update(step="12")),
    "config.json config a list": lambda c: _edit_json(c / "config.json", lambda d: d.update(config=[])),
    # damage that still parses: only the checksums in config.json tell
    "model.safetensors 4000 bytes of 0xff": lambda c: overwrite_middle(c / "model.safetensors", 0xFF, 4000),
    "model.safetensors 40 KB of zeros": lambda c: overwrite_middle(c / "model.safetensors", 0, 40_000),
    "trainer.safetensors 40 KB of zeros": lambda c: overwrite_middle(c / "trainer.safetensors", 0, 40_000),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_falls_back_to_the_previous_good_checkpoint(damage, tiny_project: Project, tmp_path, capfd) -> None:
    project = fresh_copy(tiny_project, tmp_path)
    train.pretrain(project, [], tiny_run_config(max_steps=12, save_interval=4, eval_interval=4))
    newest = project.latest_checkpoint()
    assert newest.name == "step-000012"
    DAMAGES[damage](newest)
    capfd.readouterr()
    warnings: list[str] = []
    result = train.resume(project, max_steps=14, log=warnings.append)
    assert any("resuming from the previous good checkpoint" in w and w.count("step-000008") == 1
               and "step-000012" in w for w in warnings), warnings
    if damage.endswith(("0xff", "zeros")):  # the warning names the file whose checksum failed
        assert any(f"step-000012/{damage.split()[0]}" in w for w in warnings), warnings
    assert result.state.step == 14
    assert [step for step, _ in losses(project, "run1")] == list(range(1, 15))
    assert "sentencepiece" not in capfd.readouterr().err  # no C++ logging from an empty model


@pytest.mark.parametrize("pointer", ["[]", '{"path": 5}', '{"path": "run1/step-000099"}'])
def test_resume_with_a_damaged_latest_pointer_takes_the_newest_step_folder(pointer, tiny_project: Project,
                                                                           tmp_path) -> None:
    project = fresh_copy(tiny_project, tmp_path)
    train.pretrain(project, [], tiny_run_config(max_steps=8, save_interval=4, eval_interval=4))
    project.latest_pointer.write_text(pointer)
    warnings: list[str] = []
    result = train.resume(project, max_steps=10, log=warnings.append)
    assert any("resuming from the newest checkpoint folder" in w and "step-000008" in w for w in warnings), warnings
    assert result.state.step == 10 and project.latest_checkpoint().name == "step-000010"


KILLED_IN_SAVE = """
import os, signal, sys
from pathlib import Path
from lmkit.fileio import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "tokenizer.model").write_bytes(b"half")
    (tmp / ".tmpAb3dE9").write_bytes(bytes(1000))  # safetensors' save_file writes here, then renames
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _temporary_names(root: Path) -> list[str]:
    """What the atomic writers and safetensors name their files while writing, anywhere under ROOT."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if ".tmp" in p.name or ".old-" in p.name)


def test_resume_cleans_what_a_save_killed_with_sigkill_left(tiny_project: Project, tmp_path) -> None:
    project = fresh_copy(tiny_project, tmp_path)
    train.pretrain(project, [], tiny_run_config(max_steps=8, save_interval=4, eval_interval=4))
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_SAVE, str(project.checkpoint_dir("run1", 12))])
    assert killed.returncode == -signal.SIGKILL
    assert len(_temporary_names(project.checkpoints_dir)) == 2  # .step-000012.tmp-PID and the .tmpXXXXXX in it
    result = train.resume(project, max_steps=10)  # what the same `lmkit pretrain` command does next
    assert result.state.step == 10
    assert _temporary_names(project.root) == []


def test_resume_without_a_good_checkpoint_is_a_clear_error(tiny_project: Project, tmp_path) -> None:
    project = fresh_copy(tiny_project, tmp_path)
    train.pretrain(project, [], tiny_run_config(max_steps=4))
    (project.latest_checkpoint() / "trainer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot resume: .*trainer.json is damaged"):
        train.resume(project, max_steps=8)


def test_fp16_trains_with_a_gradient_scaler_and_resumes_exactly(tiny_project: Project, tmp_path) -> None:
    # fp16 autocast runs on CPU too (slowly): the same code path as on an older GPU.
    cfg = tiny_run_config(max_steps=16, eval_interval=8, save_interval=5, log_interval=1, precision="fp16", lr=5e-3)
    straight = fresh_copy(tiny_project, tmp_path / "a")
    done = train.pretrain(straight, [], cfg)
    curve = losses(straight, "run1")
    assert curve[-1][1] < curve[0][1] - 0.5 and all(math.isfinite(loss) for _, loss in curve)
    scaler = Checkpoint(straight.latest_checkpoint()).trainer().scaler
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] > 0  # the scaler ran and its state was saved

    interrupted = fresh_copy(tiny_project, tmp_path / "b")
    train.pretrain(interrupted, [], cfg, progress=signal_at(7, signal.SIGINT))
    resumed = train.resume(interrupted)
    assert losses(interrupted, "run1") == curve and resumed.outcome.val_loss == done.outcome.val_loss


def test_fp16_gradient_scaler_skips_overflowing_steps() -> None:
    model = torch.nn.Linear(4, 1)
    before = model.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    batches = iter([LMBatch(torch.full((2, 4), 1e35), torch.zeros(2, 4, dtype=torch.long))])  # overflow once scaled
    cfg = TrainConfig(grad_accum=1, grad_clip=1.0)
    train._optimizer_step(model, list(model.parameters()), batches, lambda m, b: m(b.inputs).sum(), optimizer, 0.1,
                          cfg, torch.device("cpu"), scaler)
    assert torch.equal(model.weight, before)  # the step was skipped ...
    assert scaler.get_scale() == 2.0 ** 15  # ... and the scale backed off
