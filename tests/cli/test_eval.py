from __future__ import annotations

import json
import math

from tests.cli.conftest import assert_user_error, lmkit


def test_eval_reports_loss_perplexity_and_bits_per_byte(ckpt_project, tmp_path) -> None:
    text = tmp_path / "held_out.txt"
    text.write_text("Ham.\nWhat a piece of work is a man!\n\nHor.\nGood my lord.\n" * 5)
    result = lmkit("eval", "-p", ckpt_project, text, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["perplexity"] == math.exp(report["loss"])
    assert report["bytes"] == len(text.read_bytes())
    assert 0 < report["bits_per_byte"] < 8
    human = lmkit("eval", "-p", ckpt_project, text)
    assert f"bits_per_byte  {report['bits_per_byte']:.4f}" in human.stdout


def test_eval_errors(ckpt_project, tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_user_error(lmkit("eval", "-p", ckpt_project, tmp_path / "missing.txt"), "does not exist")
    assert_user_error(lmkit("eval", "-p", ckpt_project, empty), "is empty")
    assert_user_error(lmkit("eval", "-p", tmp_path, ckpt_project / "lmkit.toml"), "no checkpoint in")


def test_predictions_path_that_is_a_directory_is_refused_before_evaluating(ckpt_project, tmp_path) -> None:
    assert_user_error(lmkit("eval", tmp_path, "-p", ckpt_project, "--predictions", tmp_path),
                      f"--predictions {tmp_path} is a directory; give a file in it")
