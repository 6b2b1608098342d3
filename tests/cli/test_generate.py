from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.cli.conftest import assert_user_error, lmkit
from tests.conftest import overwrite_middle


def test_prompt_argument_streams_prompt_and_continuation(ckpt_project) -> None:
    result = lmkit("generate", "-p", ckpt_project, "Ham.\nTo be", "--max-new-tokens", "20", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Ham.\nTo be")
    assert result.stdout == lmkit("--seed", "1", "generate", "-p", ckpt_project, "Ham.\nTo be",
                                  "--max-new-tokens", "20").stdout  # global --seed works the same


def test_stdin_prompts_give_one_json_object_each(ckpt_project) -> None:
    result = lmkit("generate", "-p", ckpt_project, "--json", "--num-samples", "2", "--max-new-tokens", "8",
                   "--seed", "3", input="Friends, Romans\nHor.\n")
    assert result.exit_code == 0, result.output
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["prompt"] for o in objects] == ["Friends, Romans", "Hor."]
    assert all(o["seed"] == 3 and len(o["completions"]) == 2 for o in objects)
    assert all(c["tokens"] <= 8 and c["finish_reason"] in ("eos", "length") for o in objects for c in o["completions"])


def test_a_byte_order_mark_opening_stdin_is_not_part_of_the_prompt(ckpt_project) -> None:
    result = lmkit("generate", "-p", ckpt_project, "--json", "--max-new-tokens", "1",
                   input="\ufeffFriends, Romans\n\ufeffHor.\n".encode())
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["prompt"] for line in result.stdout.splitlines()] == ["Friends, Romans", "\ufeffHor."]


def test_greedy_is_deterministic_and_no_echo_omits_the_prompt(ckpt_project) -> None:
    runs = [lmkit("generate", "-p", ckpt_project, "Ham.", "--greedy", "--no-echo", "--max-new-tokens", "10")
            for _ in range(2)]
    assert runs[0].exit_code == 0 and runs[0].stdout == runs[1].stdout
    assert not runs[0].stdout.startswith("Ham.")


def test_generate_errors(tmp_path, ckpt_project) -> None:
    assert_user_error(lmkit("generate", "-p", tmp_path, "hi"), "no checkpoint in")
    assert_user_error(lmkit("generate", "-p", tmp_path / "nowhere", "hi"), "does not exist")
    assert_user_error(lmkit("generate", "-c", tmp_path, "hi"), "is not an lmkit checkpoint")
    assert lmkit("generate", "-p", ckpt_project, "hi", "--top-p", "1.5").exit_code == 2
    assert lmkit("generate", "-p", ckpt_project, "hi", "--device", "tpu").exit_code == 2


@pytest.mark.parametrize("command", [["generate", "hi", "--max-new-tokens", "2", "-c"], ["info"]])
def test_damaged_weights_that_still_parse_are_one_error_line_naming_the_file(command, tiny_project, tmp_path) -> None:
    damaged = shutil.copytree(tiny_project.latest_checkpoint(), tmp_path / "damaged")
    overwrite_middle(damaged / "model.safetensors", 0, 40_000)
    result = lmkit(*command, damaged)
    assert_user_error(result, f"{damaged / 'model.safetensors'} is damaged")
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_prompts_that_are_not_utf8_are_named(ckpt_project) -> None:
    assert_user_error(lmkit("generate", "-p", ckpt_project, "--max-new-tokens", "2", input=b"fine\nHam\xff\xfe\n"),
                      "line 2 of stdin (prompts, one a line) is not valid UTF-8")
    # a byte that is not UTF-8 in argv reaches Python as a lone surrogate (PEP 383)
    assert_user_error(lmkit("generate", "-p", ckpt_project, "--max-new-tokens", "2", "ok", "Ham\udcff"),
                      "prompt argument 2 is not valid UTF-8")


@pytest.mark.parametrize("command", [["generate", "--max-new-tokens", "2"], ["tokenize", "encode"],
                                     ["tokenize", "decode"]])
def test_a_closed_stdin_is_a_user_error(command, ckpt_project) -> None:
    """`lmkit generate <&-`: Python starts with sys.stdin = None."""
    done = subprocess.run([sys.executable, "-m", "lmkit", *command, "-p", str(ckpt_project)], capture_output=True,
                          text=True, preexec_fn=lambda: os.close(0), timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: stdin is closed"), done.stderr
