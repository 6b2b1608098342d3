"""`--arch llama` wherever the GPT layout works: pretrain, info, generate, eval, finetune (LoRA on
the gated MLP too, --merge), distill (as teacher, the student from its layers)."""

from __future__ import annotations

import json

from tests.cli.conftest import TINY, assert_user_error, lmkit

QUICK = ["--max-steps", "6", "--set", "train.eval_interval=3", "--set", "train.batch_size=8", "--quiet", "--json"]


def test_pretrain_llama_then_info_eval_and_generate_past_the_context(tmp_path, small_corpus) -> None:
    project = tmp_path / "p"
    trained = lmkit("pretrain", small_corpus, "-p", project, "--arch", "llama", *TINY, "--set", "model.n_kv_head=1",
                    "--json")
    assert trained.exit_code == 0, trained.output
    info = json.loads(lmkit("info", "-p", project, "--json").output)["latest"]
    assert info["arch"] == "llama" and info["objectives"] == ["causal-lm"]
    assert info["model"]["n_kv_head"] == 1 and info["model"]["bias"] is False and info["model"]["activation"] == "silu"
    scored = json.loads(lmkit("eval", small_corpus, "-p", project, "--json").output)
    assert scored["arch"] == "llama" and 0 < scored["bits_per_byte"] < 8
    # 50 new tokens with a 32-token context: decoding goes on over the most recent window.
    long = lmkit("generate", "-p", project, "--max-new-tokens", "50", "--seed", "3", "--json",
                 "Ham.")
    assert long.exit_code == 0, long.output
    done = json.loads(long.stdout)["completions"][0]
    assert done["finish_reason"] in ("length", "eos")
    assert done["tokens"] == 50 or done["finish_reason"] == "eos"
    beams = lmkit("generate", "-p", project, "--beam", "3", "--num-return-sequences", "2", "--max-new-tokens", "8",
                  "--json", "Ham.")
    assert beams.exit_code == 0 and len(json.loads(beams.stdout)["completions"]) == 2
    assert_user_error(lmkit("generate", "-p", project, "--fill-mask", "a [MASK]"), "needs a masked-LM (bert) one")
    assert_user_error(lmkit("pretrain", small_corpus, "-p", tmp_path / "q", "--arch", "llama", "--set",
                            "model.n_kv_head=3"), "model.n_kv_head=3 must divide model.n_head=4")


def test_finetune_llama_classifier_with_lora_on_every_projection_and_merge(tiny_llama_project, task_files,
                                                                          tmp_path) -> None:
    out = lmkit("finetune", task_files["train"], "--val", task_files["val"], "--from", tiny_llama_project.root,
                "--lora-rank", "4", "--lora-targets", "all", "--merge", "-p", tmp_path / "c", *QUICK)
    assert out.exit_code == 0, out.output
    info = json.loads(lmkit("info", "-p", tmp_path / "c", "--json").output)["latest"]
    assert info["task"] == "classify" and info["weights"] == "full" and "merged_from" in info
    adapters = json.loads(lmkit("info", info["merged_from"], "--json").output)
    assert adapters["weights"] == "adapters" and adapters["trainable_parameters"] < adapters["parameters"] / 4
    labelled = lmkit("generate", "-p", tmp_path / "c", "TO BE OR NOT TO BE")
    assert labelled.exit_code == 0 and labelled.stdout.split("\t")[0] in ("shout", "speak", "whisper")
    scored = json.loads(lmkit("eval", task_files["val"], "-p", tmp_path / "c", "--json").output)
    assert scored["task"] == "classify" and scored["examples"] > 0


def test_instruct_and_distill_a_llama(tiny_llama_project, task_files, small_corpus, tmp_path) -> None:
    tuned = lmkit("finetune", task_files["instruct"], "--task", "instruct", "--from", tiny_llama_project.root, "-p",
                  tmp_path / "i", *QUICK)
    assert tuned.exit_code == 0, tuned.output
    assert lmkit("generate", "-p", tmp_path / "i", "--max-new-tokens", "4", "Ham.").exit_code == 0
    out = lmkit("distill", small_corpus, "--teacher", tiny_llama_project.root, "--student-layers", "1", "-p",
                tmp_path / "d", *QUICK)
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output)["summary"]
    assert summary["student_parameters"] < summary["teacher_parameters"] and summary["metric"] == "val_loss"
    info = json.loads(lmkit("info", "-p", tmp_path / "d", "--json").output)["latest"]
    assert info["arch"] == "llama" and info["layers"] == 1 and info["model"]["qk_norm"] is True
