"""`lmkit finetune`, `lmkit merge`, and eval/generate on classifiers, in-process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.cli.conftest import assert_user_error, lmkit

QUICK = ["--max-steps", "6", "--set", "train.eval_interval=3", "--set", "train.batch_size=8", "--quiet"]


def test_user_errors_for_finetune_and_classifier_checkpoints(ckpt_project, tiny_bert_project, task_files,
                                                              tmp_path) -> None:
    base = Path(ckpt_project)
    project = tmp_path / "ft"
    train, val = task_files["train"], task_files["val"]
    assert_user_error(lmkit("finetune", tmp_path / "missing.csv", "--from", base, "-p", project),
                      "missing.csv does not exist")
    assert_user_error(lmkit("finetune", train, "--task", "instruct", "--from", base, "-p", project),
                      "train.jsonl:1: missing field 'prompt' (found: text, label)")
    assert_user_error(lmkit("finetune", task_files["instruct"], "--task", "instruct", "--from",
                            tiny_bert_project.root, "-p", project), "needs a llama or gpt one")
    assert_user_error(lmkit("finetune", train, "--from", base, "-p", project, "--scratch", "--lora-rank", "4"),
                      "leave out --lora-rank")
    assert_user_error(lmkit("finetune", train, "--from", base, "-p", project, "--merge"), "it needs --lora-rank")
    assert_user_error(lmkit("finetune", train, "--from", base, "-p", project, "--set", "model.d_model=96"),
                      "keeps the pretrained model's shape")
    assert_user_error(lmkit("finetune", "--resume", train, "-p", project), "no checkpoint in")
    assert_user_error(lmkit("finetune", val, "--task", "lm", "--val", val, "--from", base, "-p", project),
                      "leave out --val")
    assert_user_error(lmkit("eval", "-p", base, "--task", "classify", val),
                      "is a gpt checkpoint for task 'lm'; 'lmkit eval --task classify' needs one for task 'classify'")

    trained = lmkit("finetune", train, "--from", base, "--val", val, "-p", project, *QUICK, "--json")
    assert trained.exit_code == 0, trained.output
    report = json.loads(trained.output)
    assert report["best_metric"] == "val_accuracy" and report["best_checkpoint"].endswith("run1/best")
    assert_user_error(lmkit("finetune", train, "-p", project), "'lmkit finetune' needs one for task 'lm'")
    assert_user_error(lmkit("eval", "-p", project, "--task", "lm", val), "needs one for task 'lm'")
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("text,label\nSome text,sonnet\n")
    assert_user_error(lmkit("eval", "-p", project, unknown), "label 'sonnet' is not one of the classifier's labels")
    assert_user_error(lmkit("merge", "-p", project, "-o", tmp_path / "m"), "holds full weights already")


def test_a_csv_saved_with_a_byte_order_mark_trains_its_own_labels(ckpt_project, task_files, tmp_path) -> None:
    import csv

    from lmkit.checkpoint import Checkpoint
    from lmkit.project import Project

    rows = [json.loads(line) for line in task_files["train"].read_text().splitlines()[:60]]
    data = tmp_path / "excel.csv"
    with data.open("w", encoding="utf-8-sig", newline="") as f:  # Excel's "CSV UTF-8": a byte-order mark first
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([r["text"], r["label"]] for r in rows)
    result = lmkit("finetune", data, "--task", "classify", "--from", ckpt_project, "-p", tmp_path / "ft",
                   "--max-steps", "1", "--set", "train.eval_interval=1", "--set", "train.batch_size=8", "--quiet")
    assert result.exit_code == 0, result.output
    assert Checkpoint(Project.open(tmp_path / "ft").latest_checkpoint()).labels == ["shout", "speak", "whisper"]


def test_scratch_starts_from_fresh_weights(ckpt_project, task_files, tmp_path) -> None:
    args = [task_files["train"], "--from", ckpt_project, "--val", task_files["val"], *QUICK, "--json"]
    pretrained = json.loads(lmkit("finetune", *args, "-p", tmp_path / "a").output)
    scratch = lmkit("finetune", *args, "--scratch", "-p", tmp_path / "b")
    assert scratch.exit_code == 0, scratch.output
    assert json.loads(scratch.output)["train_loss"] != pretrained["train_loss"]


def test_the_same_finetune_command_continues_an_interrupted_run(ckpt_project, task_files, tmp_path) -> None:
    project = tmp_path / "ft"
    command = ["finetune", task_files["train"], "--from", ckpt_project, "--val", task_files["val"], "-p", project,
               "--max-steps", "8", "--set", "train.eval_interval=2", "--set", "train.save_interval=4",
               "--set", "train.batch_size=8", "--json"]
    finished = lmkit(*command)
    assert finished.exit_code == 0, finished.output
    # A crash right after the periodic save at step 4.
    for later in ("step-000008", "best"):
        shutil.rmtree(project / "checkpoints/run1" / later)
    (project / "checkpoints/latest.json").write_text(json.dumps({"path": "run1/step-000004"}))
    again = lmkit(*command)
    assert again.exit_code == 0, again.output
    assert "continuing the interrupted run with the same data and config" in again.stderr
    report, before = json.loads(again.stdout), json.loads(finished.stdout)
    assert report["run"] == "run1" and report["step"] == 8
    assert (report["train_loss"], report["val_accuracy"]) == (before["train_loss"], before["val_accuracy"])
    assert json.loads(lmkit(*command).stdout)["run"] == "run2"  # run1 is finished: a new run
    assert json.loads(lmkit(*command, "--new-run").stdout)["run"] == "run3"


def test_resume_takes_the_runs_own_command_line_and_names_what_would_change(ckpt_project, task_files,
                                                                            tmp_path) -> None:
    project = tmp_path / "ft"
    command = ["finetune", task_files["train"], "--from", ckpt_project, "--val", task_files["val"], "-p", project,
               "--max-steps", "4", "--set", "train.eval_interval=2", "--set", "train.batch_size=8",
               "--lora-rank", "4", "--quiet"]
    assert lmkit(*command).exit_code == 0
    longer = lmkit(*command, "--max-steps", "6", "--resume", "--json")
    assert longer.exit_code == 0, longer.output
    assert json.loads(longer.stdout)["step"] == 6
    assert_user_error(lmkit(*command, "--max-steps", "8", "--lora-alpha", "4", "--resume"),
                      "changes lora.alpha: 16.0 -> 4.0; only --max-steps may change")
    assert_user_error(lmkit(*command, "--max-steps", "8", "--val", task_files["train"], "--resume"), "changes val: ")
    assert_user_error(lmkit(*command, "--max-steps", "8", "--scratch", "--resume"), "changes scratch: False -> True")
