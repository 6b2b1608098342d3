from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.cli.conftest import TINY, assert_user_error, lmkit


def test_pretrain_builds_everything_and_reports_the_checkpoint(tmp_path, small_corpus) -> None:
    project = tmp_path / "p"
    result = lmkit("pretrain", small_corpus, "-p", project, *[a for a in TINY if a != "--quiet"])
    assert result.exit_code == 0, result.output
    assert "step-000012: step 12, train loss" in result.stdout
    # Not a terminal: no bars, one progress line per validation on stderr, after the setup lines.
    assert "training a bpe tokenizer" in result.stderr and "prepared data:" in result.stderr
    assert [line.split(" loss")[0] for line in result.stderr.splitlines() if line.startswith("step ")] == [
        "step 6/12", "step 12/12"]
    for path in ("lmkit.toml", "tokenizer/tokenizer.model", "data/train.bin", "data/val.json",
                 "checkpoints/latest.json", "checkpoints/run1/step-000012/model.safetensors",
                 "runs/run1/config.json", "runs/run1/metrics.jsonl"):
        assert (project / path).exists(), path
    metrics = [json.loads(line) for line in (project / "runs/run1/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_loss" in m] == [6, 12]

    again = lmkit("pretrain", "-p", project, *TINY, "--json")  # no corpus: reuses the prepared data
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert summary["run"] == "run2" and summary["step"] == 12 and not summary["interrupted"]
    assert set(summary) >= {"checkpoint", "train_loss", "val_loss", "tokens_per_sec", "parameters", "elapsed"}


def test_resume_extends_a_finished_run(tmp_path, small_corpus) -> None:
    project = tmp_path / "p"
    assert lmkit("pretrain", small_corpus, "-p", project, *TINY).exit_code == 0
    assert_user_error(lmkit("pretrain", "--resume", "-p", project, "--quiet"), "already at max_steps=12")
    result = lmkit("pretrain", "--resume", "-p", project, "--max-steps", "15", "--quiet")
    assert result.exit_code == 0, result.output
    assert "run1/step-000015" in result.stdout
    assert_user_error(lmkit("pretrain", "--resume", "-p", project, "--set", "model.n_layer=3"),
                      "changes model.n_layer: 2 -> 3; only --max-steps and --time-budget may change")
    # the original command line with --resume appended, and a longer run: equal settings are no change
    again = lmkit("pretrain", small_corpus, "-p", project, *TINY, "--max-steps", "18", "--resume", "--quiet")
    assert again.exit_code == 0, again.output
    assert "run1/step-000018" in again.stdout
    assert_user_error(lmkit("pretrain", small_corpus, "-p", project, *TINY, "--max-steps", "20", "--keep", "5",
                            "--precision", "bf16", "--resume"),
                      "changes train.keep_checkpoints: 2 -> 5; train.precision: 'auto' -> 'bf16'; only")
    other = tmp_path / "other.txt"
    other.write_text(small_corpus.read_text()[:50_000])
    assert_user_error(lmkit("pretrain", other, "-p", project, *TINY, "--max-steps", "20", "--resume"),
                      "changes corpora: ")


def test_pretrain_user_errors(tmp_path, small_corpus) -> None:
    empty, binary, latin = tmp_path / "empty.txt", tmp_path / "model.bin", tmp_path / "latin.txt"
    empty.write_text("")
    binary.write_bytes(b"\x7fELF\x00\x00\x01" * 100)
    latin.write_bytes("caf\xe9\n".encode("latin-1") * 100)
    p = tmp_path / "p"
    assert_user_error(lmkit("pretrain", tmp_path / "missing.txt", "-p", p), "missing.txt does not exist")
    assert_user_error(lmkit("pretrain", empty, "-p", p), "empty.txt is empty")
    assert_user_error(lmkit("pretrain", binary, "-p", p), "looks like a binary file")
    assert_user_error(lmkit("pretrain", latin, "-p", p), "is not valid UTF-8")
    assert_user_error(lmkit("pretrain", small_corpus, "-p", p, "--set", "model.n_head=5"), "not divisible")
    assert_user_error(lmkit("pretrain", small_corpus, "-p", p, "--set", "model.n_layers=5"), "did you mean 'n_layer'")
    assert_user_error(lmkit("pretrain", small_corpus, "-p", p, "--preset", "giant"), "unknown preset 'giant'")
    assert_user_error(lmkit("pretrain", small_corpus, "-p", p, "--time-budget", "soon"), "cannot read duration")
    assert_user_error(lmkit("pretrain", small_corpus, "-p", p, "--config", tmp_path / "no.toml"), "does not exist")
    assert_user_error(lmkit("pretrain", "-p", tmp_path / "fresh"), "no tokenizer in")
    assert_user_error(lmkit("pretrain", "--resume", "-p", tmp_path / "fresh"), "no checkpoint in")
    assert_user_error(lmkit("pretrain", small_corpus, "-p", p, "--device", "cuda", *TINY[:2]),
                      "device 'cuda' is not available")
    assert_user_error(lmkit("pretrain", small_corpus, "-p", empty), "is a file, not a directory")


def test_a_failed_command_leaves_no_new_project_behind(tmp_path, small_corpus, tiny_project) -> None:
    missing, teacher = tmp_path / "missing.txt", tiny_project.latest_checkpoint()
    commands = {"pretrain": ["pretrain", missing], "resume": ["pretrain", "--resume"],
                "bad-setting": ["pretrain", small_corpus, "--set", "model.n_head=5"],
                "tokenize-train": ["tokenize", "train", missing],
                "tokenize-prepare": ["tokenize", "prepare", small_corpus],
                "finetune": ["finetune", missing, "--task", "classify", "--from", teacher],
                "distill": ["distill", missing, "--teacher", teacher], "import": ["import", tmp_path / "no-model"]}
    for name, command in commands.items():
        assert lmkit(*command, "-p", tmp_path / "new" / name).exit_code == 2, name
        assert not (tmp_path / "new").exists(), name  # nor the folder above it, made for it
    kept = tmp_path / "kept"
    kept.mkdir()
    assert lmkit("pretrain", missing, "-p", kept).exit_code == 2 and kept.is_dir()  # the user's folder stays


@pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW"), reason="POSIX links")
def test_a_linked_lock_never_empties_the_file_it_points_at(tmp_path, tiny_project) -> None:
    victim = tmp_path / "victims" / "f1.txt"
    victim.parent.mkdir()
    victim.write_text("precious\n")
    project = tmp_path / "p"
    shutil.copytree(tiny_project.root, project)
    (project / ".lock").unlink(missing_ok=True)
    (project / ".lock").symlink_to("../victims/f1.txt")
    assert_user_error(lmkit("pretrain", "--resume", "-p", project, "--quiet"),
                      ".lock is a symbolic link, and lmkit never writes through a link it did not make")
    assert victim.read_text() == "precious\n"


def test_the_same_command_continues_an_interrupted_run(tmp_path, small_corpus) -> None:
    project = tmp_path / "p"
    command = ["pretrain", small_corpus, "-p", project, *TINY, "--set", "train.save_interval=6", "--json"]
    finished = lmkit(*command)
    assert finished.exit_code == 0, finished.output
    # A crash right after the periodic save at step 6: the step-12 checkpoint never got written.
    shutil.rmtree(project / "checkpoints/run1/step-000012")
    (project / "checkpoints/latest.json").write_text(json.dumps({"path": "run1/step-000006"}))
    again = lmkit(*[a for a in command if a != "--quiet"])
    assert again.exit_code == 0, again.output
    assert "continuing the interrupted run with the same config" in again.stderr
    report = json.loads(again.stdout)
    assert report["run"] == "run1" and report["step"] == 12
    assert report["train_loss"] == json.loads(finished.stdout)["train_loss"]  # as if it had never stopped
    fresh = lmkit(*command, "--new-run")
    assert json.loads(fresh.stdout)["run"] == "run2"
    other = lmkit(*command, "--set", "train.lr=1e-3")  # another config: a new run
    assert json.loads(other.stdout)["run"] == "run3"


@pytest.mark.slow  # torch.compile needs a C++ compiler and takes about a minute on 2 CPU cores
def test_pretrain_with_torch_compile(tmp_path, small_corpus) -> None:
    project = tmp_path / "p"
    done = lmkit("pretrain", small_corpus, "-p", project, *TINY, "--max-steps", "2", "--compile")
    assert done.exit_code == 0, done.output
    assert json.loads((project / "runs/run1/config.json").read_text())["train"]["compile"] is True


def test_a_full_disk_during_a_save_is_one_line_and_loses_nothing(tmp_path, small_corpus, monkeypatch) -> None:
    from safetensors import SafetensorError

    from lmkit import checkpoint

    project = tmp_path / "p"
    assert lmkit("pretrain", small_corpus, "-p", project, *TINY).exit_code == 0
    before = (project / "checkpoints" / "latest.json").read_text()

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    assert_user_error(lmkit("pretrain", "--resume", "-p", project, "--max-steps", "15", "--quiet"),
                      f"cannot write {project}/checkpoints/run1/step-000015/model.safetensors: the disk is full")
    assert (project / "checkpoints" / "latest.json").read_text() == before
    assert sorted(p.name for p in (project / "checkpoints" / "run1").iterdir()) == ["step-000012"]  # no leftovers
    monkeypatch.undo()
    again = lmkit("pretrain", "--resume", "-p", project, "--max-steps", "15", "--quiet")
    assert again.exit_code == 0 and "run1/step-000015" in again.stdout, again.output


def test_a_model_too_big_for_memory_is_one_line(tmp_path, small_corpus, monkeypatch) -> None:
    from lmkit import train

    def cannot_allocate(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 4398046511104 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(train, "build_model", cannot_allocate)
    assert_user_error(lmkit("pretrain", small_corpus, "-p", tmp_path / "p", *TINY),
                      "out of memory: one allocation needed 4.0 TiB; use a smaller model")


def test_token_ids_beyond_the_vocabulary_in_train_bin_are_named(tmp_path, small_corpus) -> None:
    import numpy as np

    project = tmp_path / "p"
    assert lmkit("pretrain", small_corpus, "-p", project, *TINY).exit_code == 0
    ids = np.fromfile(project / "data" / "train.bin", dtype=np.uint16)
    ids[100] = 60000
    ids.tofile(project / "data" / "train.bin")
    assert_user_error(lmkit("pretrain", small_corpus, "-p", project, *TINY, "--new-run"),
                      "train.bin is damaged: token 100 is id 60000, but the tokenizer has")
