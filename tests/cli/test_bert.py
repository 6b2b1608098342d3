from __future__ import annotations

import json

from tests.cli.conftest import assert_user_error, lmkit


def test_pretrain_bert_then_eval_info_and_fill_mask(tmp_path, small_corpus) -> None:
    project = tmp_path / "p"
    result = lmkit("pretrain", small_corpus, "-p", project, "--arch", "bert", "--preset", "tiny",
                   "--set", "tokenizer.vocab_size=400", "--max-steps", "10", "--set", "train.eval_interval=5", "-q")
    assert result.exit_code == 0, result.output
    assert "step-000010" in result.stdout

    report = json.loads(lmkit("eval", "-p", project, small_corpus, "--json").stdout)
    assert report["arch"] == "bert"
    assert set(report) >= {"mlm_loss", "mlm_accuracy", "nsp_accuracy", "mlm_majority_baseline",
                           "nsp_majority_baseline"}

    info = json.loads(lmkit("info", "-p", project, "--json").stdout)["latest"]
    assert info["arch"] == "bert" and info["objectives"] == ["masked-lm", "next-sentence"] and info["heads"] == 4

    filled = lmkit("generate", "-p", project, "--json", "--top-k", "3",
                   input="To be, or not to [MASK], that is the [MASK].\nGood [MASK], my lord.\n")
    assert filled.exit_code == 0, filled.output
    results = [json.loads(line) for line in filled.stdout.splitlines()]
    assert [len(r["masks"]) for r in results] == [2, 1]
    candidates = results[0]["masks"][0]["candidates"]
    assert len(candidates) == 3 and candidates[0]["prob"] >= candidates[1]["prob"] >= candidates[2]["prob"]
    assert results[1]["filled"].startswith("Good ") and "[MASK]" not in results[1]["filled"]

    text = lmkit("generate", "-p", project, "--fill-mask", "Good [MASK], my lord.")
    assert text.exit_code == 0 and "[MASK] 1:" in text.stdout

    assert_user_error(lmkit("generate", "-p", project, "no mask here"), "no [MASK] in 'no mask here'")


def test_fill_mask_needs_a_bert_checkpoint(ckpt_project) -> None:
    assert_user_error(lmkit("generate", "-p", ckpt_project, "--fill-mask", "Good [MASK]."),
                      "is a gpt checkpoint; 'lmkit generate --fill-mask' needs a masked-LM (bert) one")
