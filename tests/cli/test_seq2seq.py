"""The encoder-decoder through the CLI: finetune on pairs, eval (BLEU/chrF), generate, and the
errors for checkpoints that do not fit the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.conftest import assert_user_error, lmkit
from tests.test_seq2seq import PAIRS

QUICK = ["--max-steps", "6", "--set", "train.eval_interval=3", "--set", "train.batch_size=4", "--quiet"]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.tsv"
    path.write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS), encoding="utf-8")
    return path


def test_finetune_eval_and_generate_a_seq2seq_model(tiny_seq2seq_project, pairs_file, tmp_path) -> None:
    project = tmp_path / "ft"
    trained = lmkit("finetune", pairs_file, "--task", "seq2seq", "--val", pairs_file, "--from",
                    tiny_seq2seq_project.root, "-p", project, *QUICK, "--json")
    assert trained.exit_code == 0, trained.output
    report = json.loads(trained.output)
    assert report["best_metric"] == "val_loss" and "val_token_accuracy" in report

    predictions = tmp_path / "pred.jsonl"
    scored = lmkit("eval", pairs_file, "-p", project, "--beam", "2", "--max-new-tokens", "8", "--json",
                   "--predictions", predictions)
    assert scored.exit_code == 0, scored.output
    result = json.loads(scored.output)
    assert result["task"] == "seq2seq" and result["decoding"] == "beam 2" and result["pairs"] == len(PAIRS)
    assert 0 <= result["bleu"] <= 100 and 0 <= result["chrf"] <= 100 and result["copy_exact_match"] == 0.0
    assert result["bleu_signature"].startswith("nrefs:1|")
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [(r["source"], r["target"]) for r in lines] == PAIRS and all("output" in r for r in lines)

    sources = "".join(f"{s}\n" for s, _ in PAIRS[:3])
    plain = lmkit("generate", "-p", project, "--max-new-tokens", "5", input=sources)
    assert plain.exit_code == 0, plain.output
    assert len(plain.output.split("\n")) == 4  # one output line per source (greedy by default)
    echoed = lmkit("generate", "-p", project, "--max-new-tokens", "5", "--echo", "--beam", "3",
                   "--num-return-sequences", "2", input=sources)
    assert echoed.exit_code == 0, echoed.output
    out_lines = echoed.output.splitlines()
    assert len(out_lines) == 6 and all(line.startswith(s + "\t") for line, (s, _) in zip(out_lines[::2], PAIRS))
    as_json = lmkit("generate", "-p", project, "--max-new-tokens", "5", "--json", PAIRS[0][0])
    record = json.loads(as_json.output)
    assert record["prompt"] == PAIRS[0][0] and record["completions"][0]["finish_reason"] in ("eos", "length")
    assert_user_error(lmkit("generate", "-p", project, "--beam", "2", "--num-return-sequences", "3", "x"),
                      "beam search returns at most beam=2 sequences")


def test_lora_on_the_encoder_decoder_merges(tiny_seq2seq_project, pairs_file, tmp_path) -> None:
    project = tmp_path / "lora"
    trained = lmkit("finetune", pairs_file, "--task", "seq2seq", "--from", tiny_seq2seq_project.root, "-p", project,
                    "--lora-rank", "2", "--lora-targets", "all", "--merge", *QUICK, "--json")
    assert trained.exit_code == 0, trained.output
    info = json.loads(lmkit("info", "-p", project, "--json").output)["latest"]
    assert info["weights"] == "full" and info["merged_from"].endswith("best")  # latest is the merged one
    adapters = json.loads(lmkit("info", json.loads(trained.output)["best_checkpoint"], "--json").output)
    assert adapters["weights"] == "adapters" and adapters["trainable_parameters"] < adapters["parameters"] / 5
    merged = json.loads(lmkit("eval", pairs_file, "-p", project, "--json", "--max-new-tokens", "6").output)
    unmerged = json.loads(lmkit("eval", pairs_file, "-c", adapters["checkpoint"], "--json",
                                "--max-new-tokens", "6").output)
    assert merged["loss"] == pytest.approx(unmerged["loss"], abs=1e-4) and merged["bleu"] == unmerged["bleu"]


def test_pretrained_denoiser_fills_a_masked_line(tiny_seq2seq_project) -> None:
    out = lmkit("generate", "-p", tiny_seq2seq_project.root, "--max-new-tokens", "6", "--json",
                "To be, or [MASK] to be")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["completions"][0]["tokens"] <= 6


def test_seq2seq_user_errors(tiny_seq2seq_project, tiny_project, pairs_file, task_files, tmp_path) -> None:
    s2s, gpt = tiny_seq2seq_project.root, tiny_project.root
    project = tmp_path / "p"
    assert_user_error(lmkit("finetune", task_files["train"], "--task", "classify", "--from", s2s, "-p", project),
                      "'lmkit finetune --task classify' needs a llama, gpt or bert one")
    assert_user_error(lmkit("finetune", pairs_file, "--task", "seq2seq", "--from", gpt, "-p", project),
                      "'lmkit finetune --task seq2seq' needs a seq2seq one")
    no_tab = tmp_path / "bad.tsv"
    no_tab.write_text("a line without a tab\n")
    assert_user_error(lmkit("finetune", no_tab, "--task", "seq2seq", "--from", s2s, "-p", project),
                      "bad.tsv:1: expected source<TAB>target")
    assert_user_error(lmkit("eval", pairs_file, "-p", s2s, "--task", "classify"), "is a seq2seq checkpoint")
    assert_user_error(lmkit("eval", pairs_file, "-p", gpt, "--task", "seq2seq"),
                      "'lmkit eval --task seq2seq' needs one for task 'seq2seq'")
