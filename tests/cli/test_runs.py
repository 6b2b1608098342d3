"""Seeing training: metrics rows carry the gradient norm and peak memory, `lmkit runs` tells
finished from interrupted runs, and `lmkit plot` draws real curves (checked pixel by pixel)."""

from __future__ import annotations

import json
import shutil
import signal

import numpy as np
import pytest

from lmkit import train
from lmkit.project import Project
from tests.cli.conftest import assert_user_error, lmkit
from tests.conftest import tiny_run_config
from tests.test_train import signal_at

matplotlib = pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_project, small_corpus) -> Project:
    """The tiny project's finished run1, and run2 (validated every 3 steps) stopped by Ctrl-C at step 7 of 40."""
    project = Project.open(tmp_path_factory.mktemp("runs") / "proj")
    shutil.copytree(tiny_project.root, project.root, dirs_exist_ok=True)
    result = train.pretrain(project, [small_corpus], tiny_run_config(eval_interval=3),
                            progress=signal_at(7, signal.SIGINT))
    assert result.outcome.stopped_by == signal.SIGINT
    return project


def test_metrics_rows_carry_gradient_norm_and_memory(tiny_project) -> None:
    rows = [json.loads(line) for line in tiny_project.metrics_file("run1").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 and r["peak_memory_mb"] > 10 and 0 < r["mfu"] <= 1 for r in rows)
    assert all(k in rows[-1] for k in ("tokens", "elapsed", "tokens_per_sec", "val_loss"))
    from lmkit.prepare import TokenFile

    val = TokenFile.open(tiny_project.tokens_file("val"))
    per_token = val.meta["bytes"] / val.tokens
    for row in (r for r in rows if "val_loss" in r):  # a decoder's validation also in bits per byte
        assert row["val_bits_per_byte"] == pytest.approx(row["val_loss"] / np.log(2) / per_token)


def test_runs_lists_finished_and_interrupted(two_runs) -> None:
    result = lmkit("runs", "-p", two_runs.root, "--json")
    assert result.exit_code == 0, result.output
    found = {r["run"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert found["run1"]["status"] == "finished" and found["run2"]["status"] == "interrupted"
    assert found["run2"]["steps"] == 7 and found["run2"]["max_steps"] == 40
    assert found["run1"]["best_val"] is not None and found["run1"]["bits_per_byte"] > 0
    assert found["run1"]["arch"] == "gpt" and found["run1"]["parameters"] > 0
    table = lmkit("runs", "-p", two_runs.root).stdout
    assert "interrupted" in table and "finished" in table and table.index("run1") < table.index("run2")


def test_plot_draws_two_runs_with_their_legend(two_runs, tmp_path) -> None:
    png = tmp_path / "curves.png"
    result = lmkit("plot", "-p", two_runs.root, "-o", png, "--size", "640x400", "--x", "tokens")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(png)
    image = matplotlib.image.imread(png)  # decodes
    assert image.shape[:2] == (400, 640)
    rgb = (image[..., :3] * 255).astype(int)
    assert rgb.std() > 10  # not blank
    blue = np.abs(rgb - np.array([31, 119, 180])).sum(axis=-1) < 30  # the first run's colour (matplotlib C0)
    orange = np.abs(rgb - np.array([255, 127, 14])).sum(axis=-1) < 30  # the second's (C1)
    assert blue.sum() > 200 and orange.sum() > 20  # run2 is short: its few val points and legend sample
    svg = tmp_path / "curves.svg"
    assert lmkit("plot", f"{two_runs.root}/runs/run1", f"{two_runs.root}/runs/run2", "-o", svg, "--metric", "bpb",
                 "--log").exit_code == 0
    text = svg.read_text()
    assert text.count("proj/run1 (gpt") == 2 and text.count("proj/run2 (gpt") == 2  # train and val of each


def test_plot_and_runs_errors(two_runs, tmp_path) -> None:
    assert_user_error(lmkit("plot", "-p", two_runs.root, "-o", tmp_path / "c.jpg"), "PNG or SVG")
    assert_user_error(lmkit("plot", "-p", two_runs.root, "run9"), "no run 'run9'")
    assert_user_error(lmkit("plot", "-p", two_runs.root, "--size", "big"), "WIDTHxHEIGHT")
    assert_user_error(lmkit("runs", "-p", tmp_path / "nowhere"), "does not exist")


@pytest.mark.parametrize("damage", ["{", "[1, 2]", '{"train": 5}', b"\xff\xfe"])
def test_a_damaged_run_config_is_listed_as_damaged(tiny_project, tmp_path, damage) -> None:
    project = tmp_path / "proj"
    shutil.copytree(tiny_project.root, project)
    config = project / "runs" / "run1" / "config.json"
    config.write_bytes(damage if isinstance(damage, bytes) else damage.encode())
    result = lmkit("runs", "-p", project, "--json")
    assert result.exit_code == 0, result.output
    (run,) = map(json.loads, result.stdout.splitlines())
    assert run["run"] == "run1" and run["status"] == "damaged" and run["steps"] > 0  # the metrics still tell
    table = lmkit("runs", "-p", project)
    assert table.exit_code == 0 and "damaged" in table.stdout
    plotted = lmkit("plot", "-p", project, "-o", tmp_path / "c.svg")
    assert plotted.exit_code == 0, plotted.output
    assert lmkit("plot", f"{project}/runs/run1", "-o", tmp_path / "d.svg").exit_code == 0


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path, small_corpus) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    project = tmp_path / "tb"
    result = lmkit("pretrain", small_corpus, "-p", project, "--preset", "tiny", "--set", "tokenizer.vocab_size=500",
                   "--max-steps", "12", "--set", "train.log_interval=3", "--set", "train.eval_interval=6",
                   "--log", "tensorboard", "-q")
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(project / "runs" / "run1"))
    events.Reload()
    rows = [json.loads(line) for line in (project / "runs" / "run1" / "metrics.jsonl").read_text().splitlines()]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("loss")] == \
        [(r["step"], r["loss"]) for r in rows]
    assert [e.step for e in events.Scalars("val_loss")] == [6, 12] and "grad_norm" in events.Tags()["scalars"]


def test_a_missing_sink_names_its_install_command(tmp_path, small_corpus, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    assert_user_error(lmkit("pretrain", small_corpus, "-p", tmp_path / "w", "--preset", "tiny", "--max-steps", "2",
                            "--set", "tokenizer.vocab_size=500", "--log", "wandb", "-q"), "pip install wandb")
    assert_user_error(lmkit("pretrain", small_corpus, "-p", tmp_path / "w2", "--set", "train.log=mlflow"),
                      "train.log")


def test_training_ends_with_a_summary_block(tmp_path, small_corpus) -> None:
    project = tmp_path / "s"
    result = lmkit("pretrain", small_corpus, "-p", project, "--preset", "tiny", "--set", "tokenizer.vocab_size=500",
                   "--max-steps", "6", "--set", "train.eval_interval=3")
    assert result.exit_code == 0, result.output
    assert "MFU" in result.output  # in the progress lines
    block = result.output[result.output.index("run1 summary"):]
    assert "tokens/s, MFU " in block and "best        val_loss" in block and "checkpoint  " in block
    command = block.split("curves      ")[1].split("\n")[0].split()
    assert command[:2] == ["lmkit", "plot"]
    assert lmkit(*command[1:]).exit_code == 0 and (project / "run1.png").is_file()  # the command works as printed


def test_wandb_offline_needs_no_account(tmp_path, small_corpus, monkeypatch) -> None:
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    project = tmp_path / "wb"
    result = lmkit("pretrain", small_corpus, "-p", project, "--preset", "tiny", "--set", "tokenizer.vocab_size=500",
                   "--max-steps", "4", "--set", "train.log_interval=2", "--log", "wandb", "-q")
    assert result.exit_code == 0, result.output
    offline = list((project / "runs" / "run1" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))  # the run's records, ready for `wandb sync`
