from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil

import pytest
import torch

from lmkit import checkpoint, quantize
from lmkit.checkpoint import Checkpoint
from lmkit.errors import CheckpointError
from lmkit.fileio import atomic_dir
from lmkit.models import build_model
from lmkit.project import Project
from lmkit.tokenizer import Tokenizer
from lmkit.train import make_optimizer
from tests.conftest import overwrite_middle, tiny_run_config


def test_save_then_load_gives_identical_logits_without_unpickling(tiny_project: Project, tmp_path, monkeypatch) -> None:
    tokenizer = Tokenizer.load(tiny_project.tokenizer_model)
    cfg = tiny_run_config().with_vocab_size(tokenizer.vocab_size)
    model = build_model(cfg.model).eval()
    path = tmp_path / "step-000007"
    checkpoint.save(path, model=model, config=cfg, tokenizer=tokenizer, run="run1", step=7, metrics={"val_loss": 1.5})

    def no_pickle(*args, **kwargs):
        raise AssertionError("checkpoints must load without torch.load / pickle")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = Checkpoint(path)
    assert loaded.step == 7 and loaded.run == "run1" and loaded.config == cfg
    assert loaded.tokenizer().fingerprint == tokenizer.fingerprint
    idx = torch.randint(0, tokenizer.vocab_size, (2, 20))
    torch.testing.assert_close(loaded.model()(idx)[0], model(idx)[0], rtol=0, atol=0)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    meta = json.loads((path / "config.json").read_text())
    assert meta["tied_weights"] == {"lm_head.weight": "transformer.wte.weight"}
    assert meta["tokenizer"]["fingerprint"] == tokenizer.fingerprint


def test_training_checkpoint_round_trips_optimizer_and_rng_state(tiny_project: Project) -> None:
    ckpt = Checkpoint(tiny_project.latest_checkpoint())
    snapshot = ckpt.trainer()
    assert snapshot is not None
    assert snapshot.state["step"] == ckpt.step
    assert set(snapshot.rng) >= {"torch"} and "generator" in snapshot.sampler
    optimizer = make_optimizer(ckpt.model(), ckpt.config.train)
    optimizer.load_state_dict(snapshot.optimizer)
    restored = optimizer.state_dict()
    assert restored["param_groups"][0]["lr"] == snapshot.optimizer["param_groups"][0]["lr"]
    for index, state in snapshot.optimizer["state"].items():
        torch.testing.assert_close(restored["state"][index]["exp_avg_sq"], state["exp_avg_sq"], rtol=0, atol=0)


def test_interrupted_write_leaves_the_previous_checkpoint_intact(tmp_path) -> None:
    path = tmp_path / "step-000001"
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(path) as tmp:
            (tmp / "config.json").write_text("new, half written")
            raise KeyboardInterrupt
    assert (path / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]  # no temporary leftovers


def test_every_file_a_checkpoint_writes_has_its_sha256_in_config_json(tiny_project: Project) -> None:
    path = tiny_project.latest_checkpoint()
    checksums = json.loads((path / "config.json").read_text())["sha256"]
    assert sorted(checksums) == ["model.safetensors", "tokenizer.model", "trainer.json", "trainer.safetensors"]
    assert sorted(checksums) == sorted(p.name for p in path.iterdir() if p.name != "config.json")
    assert all(checksums[name] == hashlib.sha256((path / name).read_bytes()).hexdigest() for name in checksums)


@pytest.mark.parametrize(("name", "byte", "count"), [("model.safetensors", 0xFF, 4000), ("model.safetensors", 0, 40_000),
                                                     ("trainer.safetensors", 0, 40_000)])
def test_damage_that_still_parses_is_refused_naming_the_file(name, byte, count, tiny_project: Project,
                                                              tmp_path) -> None:
    path = shutil.copytree(tiny_project.latest_checkpoint(), tmp_path / "step-000040")
    overwrite_middle(path / name, byte, count)
    ckpt = Checkpoint(path)
    with pytest.raises(CheckpointError, match=re.escape(f"{path / name} is damaged")):
        ckpt.model() if name == "model.safetensors" else ckpt.trainer()


def test_an_int8_checkpoint_is_checked_too(tiny_project: Project, tmp_path) -> None:
    out = quantize.quantize_checkpoint(tiny_project.latest_checkpoint(), tmp_path / "int8")
    overwrite_middle(out / "model.safetensors", 0, 20_000)
    with pytest.raises(CheckpointError, match=re.escape(f"{out / 'model.safetensors'} is damaged")):
        quantize.model_for_decoding(Checkpoint(out), torch.device("cpu"))


def test_checkpoints_saved_without_checksums_still_load(tiny_project: Project, tmp_path) -> None:
    path = shutil.copytree(tiny_project.latest_checkpoint(), tmp_path / "step-000040")
    meta = json.loads((path / "config.json").read_text())
    del meta["sha256"]
    (path / "config.json").write_text(json.dumps(meta))
    ckpt = Checkpoint(path)
    assert ckpt.trainer() is not None and ckpt.tokenizer() is not None
    idx = torch.randint(0, 100, (1, 8))
    torch.testing.assert_close(ckpt.model()(idx)[0], Checkpoint(tiny_project.latest_checkpoint()).model()(idx)[0])


def test_checkpoints_saved_with_every_model_field_still_load(tiny_project: Project, tmp_path) -> None:
    """Before each architecture declared its settings, config.json held every model field: others'
    at their defaults, or at a value the model never read (`--arch gpt --set model.n_kv_head=2`)."""
    path = shutil.copytree(tiny_project.latest_checkpoint(), tmp_path / "step-000040")
    meta = json.loads((path / "config.json").read_text())
    saved = Checkpoint(tiny_project.latest_checkpoint()).config
    assert saved.model.arch == "gpt" and "n_kv_head" not in meta["config"]["model"]
    meta["config"]["model"] = {**dataclasses.asdict(saved.model), "n_kv_head": 2, "qk_norm": True}
    (path / "config.json").write_text(json.dumps(meta))
    ckpt = Checkpoint(path)
    assert ckpt.config == saved
    idx = torch.randint(0, 100, (1, 8))
    torch.testing.assert_close(ckpt.model()(idx)[0], Checkpoint(tiny_project.latest_checkpoint()).model()(idx)[0])


def test_resolve_accepts_checkpoint_run_and_project_folders(tiny_project: Project) -> None:
    latest = tiny_project.latest_checkpoint()
    assert checkpoint.resolve(None, tiny_project) == latest
    assert checkpoint.resolve(latest, tiny_project) == latest
    assert checkpoint.resolve(latest.parent, tiny_project) == latest
    assert checkpoint.resolve(tiny_project.root, Project(latest)) == latest


@pytest.mark.parametrize(("content", "message"), [
    (None, "not an lmkit checkpoint, run folder or project"),
    ("{broken", "damaged"),
    ('{"format": "something-else"}', "not an lmkit checkpoint"),
    ('{"format": "lmkit-checkpoint", "format_version": 99, "lmkit_version": "9.0"}', "newer lmkit"),
])
def test_bad_checkpoint_folders_are_clear_errors(tmp_path, content, message) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    if content is not None:
        (folder / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(checkpoint.resolve(folder, Project(tmp_path)))


def test_empty_project_says_how_to_get_a_checkpoint(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="lmkit pretrain"):
        Project.open(tmp_path).latest_checkpoint()


@pytest.mark.parametrize(("pointer", "message"), [
    ("[]", "damaged"), ('{"path": 5}', "damaged"), ('"run1"', "damaged"), ("{broken", "damaged"),
    ('{"path": "../../elsewhere/checkpoints/run1/step-000001"}', "outside the project's checkpoints"),
    ('{"path": "/etc"}', "outside the project's checkpoints"),
])
def test_a_wrong_or_escaping_latest_pointer_is_a_clear_error(tmp_path, pointer, message) -> None:
    project = Project.open(tmp_path / "p")
    (tmp_path / "elsewhere" / "checkpoints" / "run1" / "step-000001").mkdir(parents=True)
    project.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    project.latest_pointer.write_text(pointer)
    with pytest.raises(CheckpointError, match=message):
        project.latest_checkpoint()
