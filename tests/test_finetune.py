"""Finetuning pretrained checkpoints: classification, instruction tuning, more LM text, LoRA."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmkit import finetune as ft
from lmkit import finetune_data, tasks
from lmkit.checkpoint import Checkpoint
from lmkit.config import ConfigError
from lmkit.errors import CheckpointError, LmkitError
from lmkit.evaluate import evaluate_classifier
from lmkit.models import causal
from lmkit.project import Project
from tests.conftest import SAMPLE_HELDOUT
from tests.conftest import STYLE_LABELS as LABELS
from tests.test_train import losses, signal_at

QUICK = {"train.max_steps": 40, "train.eval_interval": 10, "train.batch_size": 16, "train.warmup_steps": 5,
         "train.log_interval": 1, "train.lr": 2e-3}


def run(project: Project, base: Project, task: str, data: Path, val: Path | None = None, progress=None,
        **flags: object) -> ft.TrainResult:
    spec = ft.FinetuneSpec(task, str(data), str(base.latest_checkpoint()), str(val) if val else None)
    return ft.finetune(project, spec, flags={**QUICK, **{k.replace("__", "."): v for k, v in flags.items()}},
                       progress=progress)


@pytest.mark.parametrize("base_name", ["tiny_project", "tiny_bert_project"])
def test_a_classifier_learns_and_its_best_checkpoint_is_the_result(base_name, request, task_files, tmp_path) -> None:
    base = request.getfixturevalue(base_name)
    project = Project.open(tmp_path / "ft")
    result = run(project, base, "classify", task_files["train"], task_files["val"])
    assert result.best_metric == "val_accuracy" and result.state.best >= 0.6  # chance: 1/3
    best = Checkpoint(project.latest_checkpoint())
    assert best.path == project.best_checkpoint_dir(result.run) == result.outcome.best_checkpoint
    assert best.task == "classify" and best.labels == LABELS
    assert best.step == result.state.best_step
    val = finetune_data.read_labelled(task_files["val"])
    scores, predictions = evaluate_classifier(best.model(), best.tokenizer(), val, best.labels, torch.device("cpu"))
    assert scores.accuracy == pytest.approx(best.meta["metrics"]["val_accuracy"])
    assert scores.examples == len(val) == sum(sum(row) for row in scores.confusion)
    hits = sum(p.label == example.label for p, example in zip(predictions, val))
    assert hits / len(val) == pytest.approx(scores.accuracy)


def test_early_stopping_ends_a_run_that_stopped_improving(tiny_project, task_files, tmp_path) -> None:
    result = run(Project.open(tmp_path / "ft"), tiny_project, "classify", task_files["train"], task_files["val"],
                 train__max_steps=400, train__eval_interval=5, train__patience=2, train__lr=1e-6,
                 train__min_lr=0.0)
    assert result.state.step < 400 and result.state.evals_since_best == 2


def test_without_val_a_stratified_tenth_is_held_back(tiny_project, task_files, tmp_path) -> None:
    seen = []
    run(Project.open(tmp_path / "ft"), tiny_project, "classify", task_files["train"],
        progress=lambda p: seen.append(p) if p.validation else None, train__max_steps=10, train__eval_interval=10)
    (report,) = seen
    assert set(report.validation) == {"val_loss", "val_accuracy", "val_macro_f1"}


def test_instruction_tuning_lowers_the_completion_loss(tiny_project, task_files, tmp_path) -> None:
    validations = []
    result = run(Project.open(tmp_path / "ft"), tiny_project, "instruct", task_files["instruct"],
                 progress=lambda p: validations.append(p.validation["val_loss"]) if p.validation else None,
                 train__eval_interval=5, train__lr=3e-3)
    assert validations[-1] < validations[0] / 2
    assert Checkpoint(result.outcome.best_checkpoint).task == "instruct"  # one meaning of task: what it was tuned for
    assert tasks.TASKS["instruct"].language_model  # and it still generates text


def test_more_pretraining_on_new_text_goes_to_its_own_data_folder(tiny_project, tmp_path) -> None:
    text = tmp_path / "new.txt"
    text.write_text(SAMPLE_HELDOUT.read_text()[:40_000])
    project = Project.open(tmp_path / "ft")
    result = run(project, tiny_project, "lm", text, train__max_steps=10, train__eval_interval=5)
    assert (project.data_dir / "finetune" / "train.bin").is_file()
    assert result.outcome.val_loss is not None and result.state.step == 10


def test_lora_checkpoints_hold_adapters_that_merge_into_the_same_model(tiny_project, task_files, tmp_path) -> None:
    project = Project.open(tmp_path / "ft")
    result = run(project, tiny_project, "classify", task_files["train"], task_files["val"], lora__rank=4,
                 train__lr=1e-2)
    adapters = Checkpoint(result.outcome.best_checkpoint)
    assert adapters.meta["weights"] == "adapters"
    saved = load_file(adapters.path / "model.safetensors")
    assert set(saved) and all(".lora_" in name or name.startswith("head.") for name in saved)
    assert adapters.meta["trainable_parameters"] < adapters.meta["parameters"] / 10

    base_weights = load_file(tiny_project.latest_checkpoint() / "model.safetensors")
    model = adapters.model()
    for name, weight in model.backbone.state_dict().items():
        plain = name.replace(".base.", ".")
        if plain in base_weights:
            assert torch.equal(weight, base_weights[plain]), name  # frozen: bit-identical to the base

    merged = Checkpoint(ft.merge_checkpoint(adapters.path, tmp_path / "merged"))
    assert merged.meta["weights"] == "full" and merged.labels == LABELS
    val = finetune_data.read_labelled(task_files["val"])
    layout = causal.pair_layout(adapters.tokenizer())
    encoded = finetune_data.encode_labelled(val, adapters.tokenizer(), LABELS, layout, 32)
    batch = finetune_data.collate_labelled(adapters.tokenizer().pad_id)(encoded)[:3]
    with torch.no_grad():
        torch.testing.assert_close(merged.model()(*batch)[0], model(*batch)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="nothing to merge"):
        ft.merge_checkpoint(merged.path, tmp_path / "again")

    # never into a folder lmkit did not write, nor over a checkpoint without --force
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "precious.txt").write_text("mine")
    with pytest.raises(LmkitError, match="holds other files"):
        ft.merge_checkpoint(adapters.path, notes, force=True)
    assert (notes / "precious.txt").read_text() == "mine"
    with pytest.raises(LmkitError, match="holds other files"):
        ft.merge_checkpoint(adapters.path, project.root, force=True)  # the project itself
    assert project.checkpoints_dir.is_dir() and (project.root / "runs").is_dir()
    with pytest.raises(LmkitError, match="already holds a checkpoint; --force"):
        ft.merge_checkpoint(adapters.path, merged.path)
    with pytest.raises(CheckpointError, match="the adapter checkpoint itself"):
        ft.merge_checkpoint(adapters.path, adapters.path, force=True)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(LmkitError, match="is a file"):
        ft.merge_checkpoint(adapters.path, tmp_path / "a-file")
    assert Checkpoint(ft.merge_checkpoint(adapters.path, merged.path, force=True)).meta["weights"] == "full"


def test_merge_and_quantize_force_never_replace_a_checkpoint_something_refers_to(tiny_project, task_files,
                                                                                  tmp_path) -> None:
    from tests.cli.conftest import assert_user_error, lmkit

    base = Project(tmp_path / "base")
    shutil.copytree(tiny_project.root, base.root)
    project = Project.open(tmp_path / "ft")
    result = run(project, base, "classify", task_files["train"], task_files["val"], lora__rank=2,
                 train__max_steps=2, train__eval_interval=2)
    adapters, base_ckpt = result.outcome.best_checkpoint, base.latest_checkpoint()
    before = (base_ckpt / "model.safetensors").read_bytes()
    merged = lmkit("merge", adapters, "-o", base_ckpt, "--force")
    assert_user_error(merged, f"{base_ckpt} is in use, so lmkit will not replace it")
    assert f"{adapters.resolve()} (as the base of its adapters)" in merged.output
    assert str(base.latest_pointer) in merged.output  # the base project's latest names it too
    assert (base_ckpt / "model.safetensors").read_bytes() == before
    assert_user_error(lmkit("quantize", base_ckpt, "-o", adapters, "--force"),  # the finetune project's latest
                      f"{project.latest_pointer} refers to it")
    assert Checkpoint(adapters).meta["weights"] == "adapters"
    out = tmp_path / "merged"
    for extra in ([], ["--force"]):  # a checkpoint nothing refers to may be replaced
        assert lmkit("merge", adapters, "-o", out, *extra).exit_code == 0


def test_adapters_refuse_a_base_that_changed_or_went(tiny_project, task_files, tmp_path) -> None:
    base = Project.open(tmp_path / "base")
    shutil.copytree(tiny_project.root, base.root, dirs_exist_ok=True)
    project = Project.open(tmp_path / "ft")
    result = run(project, base, "classify", task_files["train"], task_files["val"], lora__rank=2,
                 train__max_steps=5, train__eval_interval=5)
    weights = base.latest_checkpoint() / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b" ")
    with pytest.raises(CheckpointError, match="has changed since the adapters"):
        Checkpoint(result.outcome.best_checkpoint).model()
    shutil.rmtree(base.latest_checkpoint())
    with pytest.raises(CheckpointError, match="which is gone"):
        Checkpoint(result.outcome.best_checkpoint).model()


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_an_interrupted_finetune_resumes_exactly(lora_rank, tiny_project, task_files, tmp_path) -> None:
    flags = {"lora__rank": lora_rank, "lora__dropout": 0.1, "model__dropout": 0.1, "train__max_steps": 24,
             "train__eval_interval": 8, "train__save_interval": 10}  # dropout: the RNG state matters
    straight = Project.open(tmp_path / "a")
    done = run(straight, tiny_project, "classify", task_files["train"], task_files["val"], **flags)

    stopped = Project.open(tmp_path / "b")
    signum = signal.SIGTERM if lora_rank else signal.SIGINT  # a scheduler's kill, or Ctrl-C
    first = run(stopped, tiny_project, "classify", task_files["train"], task_files["val"],
                progress=signal_at(13, signum), **flags)
    assert first.outcome.stopped_by == signum and first.state.step == 13
    second = ft.resume(stopped)
    assert second.state.step == 24 and losses(stopped, "run1") == losses(straight, "run1")
    assert second.state.best == done.state.best and second.state.best_step == done.state.best_step
    assert stopped.latest_checkpoint() == stopped.best_checkpoint_dir("run1")


def test_checkpoints_that_do_not_suit_the_task_are_refused(tiny_project, tiny_bert_project, task_files,
                                                           tmp_path) -> None:
    project = Project.open(tmp_path / "ft")
    with pytest.raises(CheckpointError, match="needs one with arch 'gpt'|is a bert"):
        run(project, tiny_bert_project, "instruct", task_files["instruct"])
    classifier = run(project, tiny_project, "classify", task_files["train"], task_files["val"],
                     train__max_steps=2, train__eval_interval=2)
    spec = ft.FinetuneSpec("classify", str(task_files["train"]), str(classifier.outcome.best_checkpoint))
    with pytest.raises(CheckpointError, match="is a checkpoint for task 'classify'"):
        ft.finetune(project, spec)
    with pytest.raises(ConfigError, match="keeps the pretrained model's shape"):
        run(project, tiny_project, "classify", task_files["train"], model__n_layer=3)
    with pytest.raises(ConfigError, match="--scratch"):
        spec = ft.FinetuneSpec("classify", str(task_files["train"]), str(tiny_project.latest_checkpoint()),
                               scratch=True)
        ft.finetune(project, spec, flags={"lora.rank": 4})


def test_the_projects_lmkit_toml_applies_to_a_finetune_but_not_its_model_settings(tiny_project, task_files,
                                                                                   tmp_path) -> None:
    project = Project.open(tmp_path / "ft")
    project.config_file.write_text('preset = "small"\n[train]\nweight_decay = 0.0123\n[model]\nd_model = 999\n')
    result = run(project, tiny_project, "classify", task_files["train"], task_files["val"], train__max_steps=2,
                 train__eval_interval=2)
    saved = Checkpoint(result.outcome.checkpoint).config
    assert saved.train.weight_decay == 0.0123
    assert saved.model.d_model == Checkpoint(tiny_project.latest_checkpoint()).config.model.d_model
