"""Distillation: the loss terms by hand, student initialisation from teacher layers, a frozen teacher,
exact resume."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal

import pytest
import torch

from lmkit import checkpoint, distill
from lmkit.batches import LMBatch
from lmkit.config import ConfigError, DistillConfig, ModelConfig
from lmkit.errors import CheckpointError
from lmkit.models import causal
from lmkit.models.gpt import GPT
from lmkit.project import Project
from tests.test_train import losses, signal_at


def _softmax(xs: list[float], t: float) -> list[float]:
    exps = [math.exp(x / t) for x in xs]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_soft_target_losses_equal_hand_computed_values() -> None:
    student, teacher = [0.0, 1.0, -1.0], [2.0, 0.5, 0.0]
    s, t = torch.tensor([student]), torch.tensor([teacher])
    for temperature in (1.0, 2.0, 4.0):
        p_s, p_t = _softmax(student, temperature), _softmax(teacher, temperature)
        forward = _kl(p_t, p_s) * temperature ** 2
        reverse = _kl(p_s, p_t) * temperature ** 2
        m = [0.3 * a + 0.7 * b for a, b in zip(p_t, p_s)]
        jsd = (0.3 * _kl(p_t, m) + 0.7 * _kl(p_s, m)) * temperature ** 2
        assert distill.soft_target_loss(s, t, temperature, "forward").item() == pytest.approx(forward, rel=1e-5)
        assert distill.soft_target_loss(s, t, temperature, "reverse").item() == pytest.approx(reverse, rel=1e-5)
        assert distill.soft_target_loss(s, t, temperature, "jsd", beta=0.3).item() == pytest.approx(jsd, rel=1e-5)
    assert forward != pytest.approx(reverse)  # KL is not symmetric
    # rows are averaged; identical distributions cost nothing
    both = distill.soft_target_loss(torch.tensor([student, teacher]), torch.tensor([teacher, teacher]), 2.0)
    assert both.item() == pytest.approx(_kl(_softmax(teacher, 2), _softmax(student, 2)) * 4 / 2, rel=1e-5)


def test_cosine_loss() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, -1.0]])
    assert distill.cosine_loss(a, b).item() == pytest.approx((0.0 + 2.0) / 2)


def test_student_starts_from_the_chosen_teacher_layers() -> None:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=4, n_head=4, max_seq_len=16)
    teacher, student = GPT(cfg), GPT(ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, max_seq_len=16))
    distill.init_from_teacher(student, teacher, [1, 3])
    for i, j in [(0, 1), (1, 3)]:
        for (name, s), (_, t) in zip(student.transformer.h[i].state_dict().items(),
                                     teacher.transformer.h[j].state_dict().items()):
            assert torch.equal(s, t), name
    assert torch.equal(student.transformer.wte.weight, teacher.transformer.wte.weight)
    assert torch.equal(student.transformer.ln_f.weight, teacher.transformer.ln_f.weight)
    assert student.lm_head.weight is student.transformer.wte.weight  # still tied
    assert distill.evenly_spaced(2, 4) == [0, 2] and distill.evenly_spaced(3, 6) == [0, 2, 4]


def test_a_preset_gives_the_student_its_own_shape() -> None:
    wide = ModelConfig(arch="gpt", vocab_size=8192, d_model=384, n_layer=6, n_head=6, max_seq_len=256)
    # GPT's default preset is the defaults: a 4x128 student, not the teacher's 6x384 again
    student = distill.student_config(wide, "default", None)
    assert (student.d_model, student.n_layer, student.n_head) == (128, 4, 4)
    assert (student.vocab_size, student.max_seq_len) == (8192, 256)  # the teacher's tokenizer and context
    tiny = distill.student_config(wide, "tiny", [0, 1])
    assert (tiny.d_model, tiny.n_layer) == (64, 2)
    llama = ModelConfig(arch="llama", d_model=384, n_layer=6, n_head=6, n_kv_head=2, d_ff=1024, bias=False)
    small = distill.student_config(llama, "default", None)
    assert (small.d_model, small.d_ff, small.n_kv_head, small.dropout) == (128, 352, 2, 0.1)


def test_the_student_learns_while_the_teacher_stays_frozen() -> None:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, max_seq_len=16)
    teacher = GPT(cfg).requires_grad_(False).eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = GPT(ModelConfig(vocab_size=64, d_model=16, n_layer=1, n_head=2, max_seq_len=16))
    loss_fn = distill.DistillLoss(teacher, DistillConfig(), causal.scored, cosine=False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    batch = LMBatch(torch.randint(0, 64, (8, 16)), torch.randint(0, 64, (8, 16)))
    losses = []
    for _ in range(30):
        loss = (loss_fn(student, batch) / batch.loss_units()).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_an_interrupted_distillation_resumes_exactly(tiny_project, small_corpus, tmp_path) -> None:
    spec = distill.DistillSpec(str(small_corpus), str(tiny_project.latest_checkpoint()), layers=(1,))
    flags = {"train.max_steps": 16, "train.eval_interval": 4, "train.save_interval": 5, "train.batch_size": 8,
             "train.log_interval": 1, "model.dropout": 0.1}  # dropout: the RNG state matters
    straight = Project.open(tmp_path / "a")
    done, done_summary = distill.distill(straight, spec, flags=flags)

    stopped = Project.open(tmp_path / "b")
    first, _ = distill.distill(stopped, spec, flags=flags, progress=signal_at(7, signal.SIGINT))
    assert first.outcome.stopped_by == signal.SIGINT and first.state.step == 7
    second, summary = distill.resume(stopped)
    assert second.state.step == 16 and losses(stopped, "run1") == losses(straight, "run1")
    assert (second.state.best, second.state.best_step) == (done.state.best, done.state.best_step)
    assert summary.student_quality == done_summary.student_quality

    # The same call with continue_interrupted picks up where an interrupted run stopped ...
    again = Project.open(tmp_path / "c")
    distill.distill(again, spec, flags=flags, progress=signal_at(5, signal.SIGINT))
    continued, _ = distill.distill(again, spec, flags=flags, continue_interrupted=True)
    assert continued.run == "run1" and losses(again, "run1") == losses(straight, "run1")
    # ... but not a finished one, nor one with other settings.
    assert distill.distill(again, spec, flags=flags, continue_interrupted=True)[0].run == "run2"


def test_a_distillation_does_not_resume_against_a_changed_teacher(tiny_project, small_corpus, tmp_path) -> None:
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_project.latest_checkpoint(), teacher)
    spec = distill.DistillSpec(str(small_corpus), str(teacher), layers=(0,))
    project = Project.open(tmp_path / "d")
    flags = {"train.max_steps": 8, "train.eval_interval": 4, "train.batch_size": 8}
    distill.distill(project, spec, flags=flags, progress=signal_at(3, signal.SIGINT))
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b" ")
    meta = json.loads((teacher / "config.json").read_text())  # saved anew: other weights, their own checksum
    meta["sha256"]["model.safetensors"] = checkpoint.file_sha256(weights)
    (teacher / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="has changed since run1 started"):
        distill.resume(project)
    # A changed teacher is another distillation: the same call starts a new run.
    assert distill.distill(project, spec, flags=flags, continue_interrupted=True)[0].run == "run2"


def test_a_project_keeps_one_tokenizer(tiny_project, small_corpus, task_files, tmp_path) -> None:
    """Distilling, finetuning or importing into a project whose own tokenizer differs is refused,
    before anything is written."""
    from lmkit import finetune

    project = Project.open(tmp_path / "other")
    project.tokenizer_dir.mkdir(parents=True)
    project.tokenizer_model.write_bytes(b"another tokenizer")
    teacher = str(tiny_project.latest_checkpoint())
    with pytest.raises(CheckpointError, match=r"has its own tokenizer \(\w+\), but the teacher .* uses tokenizer"):
        distill.distill(project, distill.DistillSpec(str(small_corpus), teacher, layers=(1,)))
    with pytest.raises(CheckpointError, match="a project has one tokenizer, so use another project"):
        finetune.finetune(project, finetune.FinetuneSpec("classify", str(task_files["train"]), teacher))
    assert not (project.root / "runs").exists() and not project.checkpoints_dir.exists()


def test_a_request_names_its_inputs_as_a_spec_keeps_them(tiny_project, small_corpus, tmp_path) -> None:
    latest = tiny_project.latest_checkpoint()
    request = distill.DistillRequest(small_corpus, tiny_project.root, layers=(1,), preset="tiny")
    spec = request.spec(tiny_project)  # a project as the teacher: its latest checkpoint
    assert spec == distill.DistillSpec(str(small_corpus.resolve()), str(latest.resolve()), layers=(1,), preset="tiny")
    saved = distill.DistillSpec(**{**dataclasses.asdict(spec), "layers": [1]})  # as a checkpoint saves it
    assert all(given == kept for given, kept in request.changes(tiny_project, saved).values())
    changed = distill.DistillRequest(teacher=latest.parent, layers=(0,)).changes(tiny_project, saved)  # a run folder
    assert changed == {"teacher": (str(latest.resolve()), str(latest.resolve())), "layers": ([0], [1])}
    with pytest.raises(ConfigError, match="give the data and the teacher"):
        distill.DistillRequest(small_corpus).spec(tiny_project)
    with pytest.raises(CheckpointError, match="does not exist"):
        distill.DistillRequest(small_corpus, tmp_path / "nowhere").spec(tiny_project)


def test_resume_refuses_inputs_that_differ_from_the_run(tiny_project, small_corpus, tmp_path) -> None:
    request = distill.DistillRequest(small_corpus, tiny_project.latest_checkpoint(), layers=(1,))
    project = Project.open(tmp_path / "e")
    flags = {"train.max_steps": 4, "train.eval_interval": 4, "train.batch_size": 8}
    distill.distill(project, request.spec(project), flags=flags, progress=signal_at(2, signal.SIGINT))
    with pytest.raises(ConfigError, match=r"changes layers: \[1\] -> \[0\]; only --max-steps may change"):
        distill.resume(project, given=distill.DistillRequest(layers=(0,)))
    resumed, _ = distill.resume(project, given=request)  # the run's own inputs come along
    assert resumed.state.step == 4
