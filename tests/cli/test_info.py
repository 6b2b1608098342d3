from __future__ import annotations

import json

from tests.cli.conftest import assert_user_error, lmkit


def test_info_on_project_and_checkpoint(ckpt_project) -> None:
    project = json.loads(lmkit("info", "-p", ckpt_project, "--json").stdout)
    assert project["tokenizer"]["vocab_size"] > 256
    assert project["data"]["train"]["tokens"] > 0
    assert project["latest"]["arch"] == "gpt"
    latest = project["latest"]["checkpoint"]
    ckpt = json.loads(lmkit("info", latest, "--json").stdout)
    assert ckpt["parameters"] > 0 and ckpt["step"] == ckpt["training_state"]["step"]
    assert ckpt["model"]["n_layer"] == 2 and "val_loss" in ckpt["metrics"]
    text = lmkit("info", latest)
    assert text.exit_code == 0 and "parameters:" in text.stdout and "fingerprint:" in text.stdout


def test_info_errors(tmp_path) -> None:
    assert_user_error(lmkit("info", tmp_path / "nope"), "does not exist")
    assert_user_error(lmkit("info", "-p", tmp_path / "nope"), "does not exist")
