from __future__ import annotations

import json
import shutil
import subprocess
import sys

from tests.cli.conftest import assert_user_error, lmkit

ODD = "Ham.\nTo be,\tor  not 😀 漢字\n\n  ▁ literal mark\r\nno final newline"


def test_train_encode_decode_round_trip(tmp_path, small_corpus) -> None:
    project = tmp_path / "p"
    result = lmkit("tokenize", "train", small_corpus, "-p", project, "--vocab-size", "400")
    assert result.exit_code == 0, result.output
    assert "fingerprint" in result.stdout
    assert (project / "tokenizer" / "tokenizer.model").is_file() and (project / "lmkit.toml").is_file()

    encoded = lmkit("tokenize", "encode", "-p", project, input=ODD.encode())
    assert encoded.exit_code == 0, encoded.output
    assert len(encoded.stdout.split("\n")) == len(ODD.split("\n"))
    assert all(word.isdigit() for word in encoded.stdout.split())
    decoded = lmkit("tokenize", "decode", "-", "-p", project, input=encoded.stdout.encode())
    assert decoded.exit_code == 0, decoded.output
    assert decoded.stdout_bytes == ODD.encode()

    pieces = lmkit("tokenize", "encode", "--pieces", "-p", project, input=b"To be\n")
    assert "".join(pieces.stdout.split()).replace("\u2581", " ") == "To be"


def test_train_refuses_to_replace_a_tokenizer_without_force(tmp_path, small_corpus) -> None:
    project = tmp_path / "p"
    assert lmkit("tokenize", "train", small_corpus, "-p", project, "--vocab-size", "400").exit_code == 0
    assert_user_error(lmkit("tokenize", "train", small_corpus, "-p", project), "--force")
    assert_user_error(lmkit("tokenize", "train", small_corpus, "-p", project, "--vocab-size", "300", "--force"),
                      "vocab_size=300 is too small for this corpus: it needs at least")
    assert lmkit("tokenize", "train", small_corpus, "-p", project, "--vocab-size", "500", "--force").exit_code == 0


def test_prepare_writes_token_files_and_is_a_no_op_when_up_to_date(tmp_path, small_corpus) -> None:
    project = tmp_path / "p"
    lmkit("tokenize", "train", small_corpus, "-p", project, "--vocab-size", "400")
    first = lmkit("tokenize", "prepare", small_corpus, "-p", project)
    assert first.exit_code == 0, first.output
    assert "train.bin" in first.stdout and "(written)" in first.stdout
    meta = json.loads((project / "data" / "train.json").read_text())
    assert meta["tokens"] > 10_000 and meta["dtype"] == "uint16"
    assert "(up to date)" in lmkit("tokenize", "prepare", small_corpus, "-p", project).stdout


def test_project_from_environment_variable(tmp_path, small_corpus) -> None:
    project = tmp_path / "from_env"
    result = lmkit("tokenize", "train", small_corpus, "--vocab-size", "400", env={"LMKIT_PROJECT": str(project)})
    assert result.exit_code == 0, result.output
    assert (project / "tokenizer" / "tokenizer.model").is_file()


def test_tokenize_errors(tmp_path, small_corpus) -> None:
    assert_user_error(lmkit("tokenize", "encode", "-p", tmp_path, input=b"x"), "no tokenizer in")
    project = tmp_path / "p"
    lmkit("tokenize", "train", small_corpus, "-p", project, "--vocab-size", "400")
    assert_user_error(lmkit("tokenize", "decode", "-p", project, input=b"1 2 x\n"), "line 1: expected token ids")
    assert_user_error(lmkit("tokenize", "decode", "-p", project, input=b"1\n999999\n"), "line 2: id 999999 is outside")
    assert_user_error(lmkit("tokenize", "encode", "-p", project, input=b"ok\n\xff\xfe\n"), "not valid UTF-8")
    assert_user_error(lmkit("tokenize", "encode", tmp_path / "missing.txt", "-p", project), "does not exist")
    assert_user_error(lmkit("tokenize", "prepare", tmp_path / "missing.txt", "-p", project), "does not exist")
    assert_user_error(lmkit("tokenize", "train", tmp_path / "nope.txt", "-p", tmp_path / "q"), "does not exist")


def test_train_and_prepare_wait_for_the_process_that_holds_the_project(tiny_project, small_corpus, tmp_path) -> None:
    """While a pretrain runs (here: a process holding the lock), --force replaces neither the
    tokenizer nor the data it trains on."""
    project = tmp_path / "p"
    shutil.copytree(tiny_project.root, project)
    files = [project / "tokenizer" / "tokenizer.model", *sorted((project / "data").iterdir())]
    before = {f: f.read_bytes() for f in files}
    script = (f"import time; from lmkit.project import Project\nwith Project({str(project)!r}).lock():\n"
              "    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for command in (["train", "--vocab-size", "300"], ["prepare"]):
            assert_user_error(lmkit("tokenize", command[0], small_corpus, *command[1:], "--force", "-p", project),
                              f"is in use by another lmkit process (PID {holder.pid})")
    finally:
        holder.kill()
        holder.wait()
    assert {f: f.read_bytes() for f in files} == before
