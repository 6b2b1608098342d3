"""`lmkit distill` end to end: a GPT on a corpus, a classifier on labelled examples, and the errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.cli.conftest import assert_user_error, lmkit

QUICK = ["--max-steps", "6", "--set", "train.eval_interval=3", "--set", "train.batch_size=8", "--quiet", "--json"]


def test_distill_a_gpt_into_fewer_layers(tiny_project, small_corpus, tmp_path) -> None:
    out = lmkit("distill", small_corpus, "--teacher", tiny_project.root, "--student-layers", "1", "-p",
                tmp_path / "d", *QUICK)
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    summary = report["summary"]
    assert summary["student_parameters"] < summary["teacher_parameters"]
    assert summary["metric"] == "val_loss" and summary["speed_unit"] == "tokens/s"
    assert summary["student_speed"] > 0 and 0 < summary["retention"] and summary["student_mb"] < summary["teacher_mb"]
    info = json.loads(lmkit("info", "-p", tmp_path / "d", "--json").output)["latest"]
    assert info["layers"] == 1 and info["arch"] == "gpt"
    generated = lmkit("generate", "-p", tmp_path / "d", "--max-new-tokens", "5", "--seed", "1", "Ham.")
    assert generated.exit_code == 0, generated.output


def test_distill_a_classifier(tiny_bert_project, task_files, tmp_path) -> None:
    teacher = tmp_path / "teacher"
    trained = lmkit("finetune", task_files["train"], "--val", task_files["val"], "--from", tiny_bert_project.root,
                    "-p", teacher, *QUICK)
    assert trained.exit_code == 0, trained.output
    out = lmkit("distill", task_files["train"], "--val", task_files["val"], "--teacher", teacher, "-p",
                tmp_path / "s", "--student-layers", "0", "--kl", "reverse", *QUICK)
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output)["summary"]
    assert summary["metric"] == "val_accuracy" and summary["speed_unit"] == "examples/s"
    scored = json.loads(lmkit("eval", task_files["val"], "-p", tmp_path / "s", "--json").output)
    assert scored["task"] == "classify" and scored["examples"] > 0


def test_distill_user_errors(tiny_project, small_corpus, tmp_path) -> None:
    project = tmp_path / "p"
    ckpt = Path(tiny_project.latest_checkpoint())
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    meta = json.loads((other / "config.json").read_text())
    meta["tokenizer"]["fingerprint"] = "0123456789abcdef"
    (other / "config.json").write_text(json.dumps(meta))
    fingerprint = json.loads((ckpt / "config.json").read_text())["tokenizer"]["fingerprint"]
    assert_user_error(lmkit("distill", small_corpus, "--teacher", ckpt, "--student", other, "-p", project),
                      f"uses tokenizer 0123456789abcdef but the teacher {ckpt} uses {fingerprint}")
    assert_user_error(lmkit("distill", small_corpus, "--teacher", ckpt, "--student-layers", "0,9", "-p", project),
                      "--student-layers must name teacher layers 0..1")
    assert_user_error(lmkit("distill", small_corpus, "--teacher", ckpt, "--student-layers", "a", "-p", project),
                      "--student-layers expects teacher layer numbers")
    assert_user_error(lmkit("distill", small_corpus, "--teacher", ckpt, "--set", "distill.kl=sideways",
                            "-p", project), "distill.kl='sideways'")


def test_distill_resume_and_its_user_errors(tiny_project, small_corpus, tmp_path) -> None:
    project = tmp_path / "d"
    command = ["distill", small_corpus, "--teacher", tiny_project.root, "--student-layers", "1", "-p", project,
               "--max-steps", "8", "--set", "train.eval_interval=4", "--set", "train.save_interval=4",
               "--set", "train.batch_size=8", "--json"]
    finished = lmkit(*command)
    assert finished.exit_code == 0, finished.output
    for later in ("step-000008", "best"):
        shutil.rmtree(project / "checkpoints/run1" / later)
    (project / "checkpoints/latest.json").write_text(json.dumps({"path": "run1/step-000004"}))
    resumed = lmkit("distill", "--resume", "-p", project, "--json")
    assert resumed.exit_code == 0, resumed.output
    report, before = json.loads(resumed.stdout), json.loads(finished.stdout)
    assert report["run"] == "run1" and report["step"] == 8 and report["val_loss"] == before["val_loss"]
    assert report["summary"]["student_quality"] == before["summary"]["student_quality"]
    assert_user_error(lmkit("distill", "--resume", "-p", project, "--kl", "reverse"),
                      "changes distill.kl: 'forward' -> 'reverse'; only --max-steps may change")
    assert_user_error(lmkit("distill", "--resume", "-p", project), "step-000008 is at step 8, already at max_steps=8")
    again = lmkit(*command[:-1], "--resume", "--max-steps", "9", "--json")  # the original command line
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["step"] == 9
    longer = json.loads(lmkit("distill", "--resume", "-p", project, "--max-steps", "10", "--json").stdout)
    assert longer["run"] == "run1" and longer["step"] == 10  # from the run's end, not from its best checkpoint
    assert_user_error(lmkit("distill", "-p", project), "give the data and the teacher")
