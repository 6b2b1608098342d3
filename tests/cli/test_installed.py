"""The installed `lmkit` command, run as a user runs it: real processes, pipes and signals."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

LMKIT = shutil.which("lmkit", path=str(Path(sys.executable).parent)) or shutil.which("lmkit")
TINY = "--preset tiny --set tokenizer.vocab_size=400 --set model.max_seq_len=32 --set train.batch_size=8 -q"

pytestmark = pytest.mark.skipif(LMKIT is None, reason="lmkit is not installed (pip install -e .)")


ENV = {"PATH": f"{Path(LMKIT or '.').parent}:/usr/bin:/bin"}


def sh(command: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True,
                            executable="/bin/bash", env=ENV)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("args", [["--help"], ["tokenize", "--help"], ["tokenize", "encode", "-p", "PROJECT"],
                                  ["tokenize", "decode", "-p", "PROJECT"],
                                  ["tokenize", "train", "CORPUS", "-p", "NEW", "--vocab-size", "400"],
                                  ["tokenize", "prepare", "CORPUS", "-p", "COPY"]],
                         ids=["help", "tokenize-help", "encode", "decode", "train", "prepare"])
def test_help_and_tokenize_do_not_import_torch(args, tiny_project, small_corpus, tmp_path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_project.tokenizer_dir, copy / "tokenizer")
    places = {"PROJECT": tiny_project.root, "CORPUS": small_corpus, "NEW": tmp_path / "new", "COPY": copy}
    args = [str(places.get(a, a)) for a in args]
    probe = ("import atexit, sys; atexit.register(lambda: sys.stderr.write('TORCH' if 'torch' in sys.modules "
             f"else 'NO-TORCH')); sys.argv = ['lmkit', *{args!r}]; from cli.main import main; main()")
    stdin = "5 6 7\n" if "decode" in args else "To be\n"
    result = subprocess.run([sys.executable, "-c", probe], input=stdin, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.endswith("NO-TORCH")


def test_tokenize_pretrain_generate_eval_end_to_end(tmp_path, small_corpus) -> None:
    sample = Path(__file__).resolve().parents[2] / "sample_data" / "shakespeare_heldout.txt"
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(sample.read_text()[:3000])
    sh(f"lmkit tokenize train {small_corpus} -p proj --vocab-size 400", tmp_path)
    trained = sh(f"lmkit pretrain {small_corpus} -p proj {TINY} --max-steps 30", tmp_path)
    assert "step-000030" in trained.stdout
    sample_text = sh('lmkit generate -p proj "To be, or not" --max-new-tokens 20 --seed 1', tmp_path).stdout
    assert sample_text.startswith("To be, or not") and len(sample_text) > len("To be, or not\n")
    piped = sh('echo "Friends, Romans" | lmkit generate -p proj --max-new-tokens 40 --seed 1', tmp_path).stdout
    assert piped.startswith("Friends, Romans")
    report = json.loads(sh(f"lmkit eval -p proj {held_out} --json", tmp_path).stdout)
    assert report["tokens"] > 100 and report["bits_per_byte"] > 0
    round_trip = sh(f"lmkit tokenize encode -p proj < {held_out} | lmkit tokenize decode -p proj", tmp_path)
    assert round_trip.stdout == held_out.read_text()


def test_ctrl_c_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path, small_corpus) -> None:
    steps = 300
    setup = (f"lmkit tokenize train {small_corpus} -p {{p}} --vocab-size 400 && "
             f"lmkit tokenize prepare {small_corpus} -p {{p}}")
    run = (f"{TINY} --max-steps {steps} --set train.log_interval=1 --set train.save_interval=1000 "
           "--set model.dropout=0.1")
    sh(setup.format(p="straight"), tmp_path)
    sh(setup.format(p="stopped"), tmp_path)
    sh(f"lmkit pretrain -p straight {run}", tmp_path)

    process = subprocess.Popen(f"exec lmkit pretrain -p stopped {run}", shell=True, cwd=tmp_path, env=ENV,
                               executable="/bin/bash", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "stopped" / "runs" / "run1" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "lmkit pretrain --resume" in stderr
    latest = json.loads((tmp_path / "stopped" / "checkpoints" / "latest.json").read_text())["path"]
    stopped_at = int(latest.rsplit("-", 1)[1])
    assert 5 <= stopped_at < steps

    sh("lmkit pretrain --resume -p stopped -q", tmp_path)

    def losses(project: str) -> list[float]:
        lines = (tmp_path / project / "runs/run1/metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    assert len(losses("stopped")) == steps
    assert losses("stopped") == losses("straight")


def test_debug_variable_shows_the_traceback(tmp_path) -> None:
    result = sh(f"LMKIT_DEBUG=1 lmkit pretrain {tmp_path}/missing.txt -p proj", tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" in result.stderr and "DataError" in result.stderr
    plain = sh(f"lmkit pretrain {tmp_path}/missing.txt -p proj", tmp_path, check=False)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [f"error: {tmp_path}/missing.txt does not exist"]


@pytest.mark.parametrize("command", [
    "lmkit generate -p PROJECT 'To be' --max-new-tokens 3 >&-",
    "echo 'To be' | lmkit tokenize encode -p PROJECT >&-",
    "lmkit runs -p PROJECT >&-",  # prints after its user_errors() block
    "lmkit --version >&-",
    "echo 'To be' | lmkit tokenize encode -p PROJECT 1< /dev/null",  # open, but not for writing
], ids=["generate", "encode", "runs", "version", "read-only"])
def test_a_closed_stdout_is_a_one_line_error(command, tiny_project, tmp_path) -> None:
    result = sh(command.replace("PROJECT", str(tiny_project.root)), tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ["error: stdout is closed, so the results have nowhere to go; redirect it "
                                          "to a file (> out.txt), or to /dev/null to discard them"]


@pytest.mark.parametrize("how", ["closed-file", "closed-descriptor"])
def test_stdout_closed_while_a_command_runs_is_a_one_line_error(how, monkeypatch, capsys) -> None:
    import io

    import typer

    from cli.options import user_errors

    if how == "closed-file":
        stream = io.StringIO()
        stream.close()  # writes raise ValueError
    else:
        stream = open(os.devnull, "w")  # noqa: SIM115 - closed below
        read_only = os.open(os.devnull, os.O_RDONLY)
        os.dup2(read_only, stream.fileno())  # its descriptor now refuses writes: OSError EBADF
        os.close(read_only)
    monkeypatch.setattr(sys, "stdout", stream)
    try:
        with pytest.raises(typer.Exit) as exited, user_errors():
            print("result", flush=True)
    finally:
        monkeypatch.undo()
        with contextlib.suppress(OSError, ValueError):
            stream.close()
    assert exited.value.exit_code == 2
    assert capsys.readouterr().err.startswith("error: stdout is closed")


def test_fill_mask_through_the_installed_command(tmp_path, small_corpus) -> None:
    sh(f"lmkit pretrain {small_corpus} -p bert --arch bert {TINY} --max-steps 5", tmp_path)
    out = sh('echo "Good [MASK], my lord." | lmkit generate -p bert --top-k 2', tmp_path).stdout.splitlines()
    assert out[0].startswith("Good ") and out[1].startswith("  [MASK] 1: ") and out[1].count("%") == 2


def test_finetune_eval_generate_and_merge_through_the_installed_command(tmp_path, ckpt_project, task_files) -> None:
    train, val = task_files["train"], task_files["val"]
    quick = "--max-steps 8 --set train.eval_interval=4 --set train.batch_size=8"
    out = sh(f"lmkit finetune {train} --from {ckpt_project} --val {val} -p ft --lora-rank 4 --merge {quick}",
             tmp_path)
    assert "trainable parameters" in out.stderr and "merged the adapters into" in out.stderr
    assert out.stdout.splitlines()[-1].startswith("best val_accuracy")
    report = json.loads(sh(f"lmkit eval -p ft {val} --json --predictions preds.jsonl", tmp_path).stdout)
    assert report["task"] == "classify" and report["examples"] == 90 and 0 <= report["macro_f1"] <= 1
    predictions = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert len(predictions) == 90 and {p["predicted"] for p in predictions} <= {"shout", "speak", "whisper"}
    table = sh(f"lmkit eval -p ft {val}", tmp_path).stdout
    assert "precision  recall" in table and "confusion (rows: true, columns: predicted)" in table
    lines = sh('printf "MY LORD, MY LORD\\nmy lord, my lord\\n" | lmkit generate -p ft', tmp_path).stdout
    assert [line.split("\t")[0] in {"shout", "speak", "whisper"} for line in lines.splitlines()] == [True, True]
    assert all(0 < float(line.split("\t")[1]) <= 1 for line in lines.splitlines())
    adapters = tmp_path / "ft" / "checkpoints" / "run1" / "best"
    sh(f"lmkit merge {adapters} -o merged2", tmp_path)
    again = json.loads(sh(f"lmkit eval -c merged2 {val} --json", tmp_path).stdout)
    assert again["accuracy"] == report["accuracy"]


def test_shell_completion_script_is_produced_and_completes_commands(tmp_path) -> None:
    script = sh("lmkit --show-completion bash", tmp_path).stdout
    assert "complete -o default -F _lmkit_completion lmkit" in script
    completing = subprocess.run([LMKIT or "lmkit"], capture_output=True, text=True, cwd=tmp_path,
                                env={**ENV, "_LMKIT_COMPLETE": "complete_bash", "COMP_WORDS": "lmkit pre",
                                     "COMP_CWORD": "1"})
    assert completing.stdout.split() == ["pretrain"]
