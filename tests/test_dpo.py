"""Preference tuning (lmkit.tasks.dpo): the losses against TRL's, reading and encoding pairs, a
finetune that learns the preference, the reference, resume, and `lmkit eval` on pairs."""

from __future__ import annotations

import json
import signal
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmkit import finetune as ft
from lmkit.batches import IGNORE
from lmkit.checkpoint import Checkpoint
from lmkit.config import DPOConfig, ModelConfig
from lmkit.errors import DataError
from lmkit.evaluate import EvalOptions
from lmkit.models import build_model
from lmkit.project import Project
from lmkit.tasks import TASKS, dpo, evaluate_checkpoint
from tests.cli.conftest import assert_user_error, lmkit
from tests.test_train import losses, signal_at

CONFIG = ModelConfig(arch="gpt", vocab_size=64, d_model=32, n_layer=2, n_head=4, max_seq_len=24)


def _rows(n: int, seed: int = 0) -> list[dpo.Row]:
    """N pairs of random replies of different lengths after random prompts, with reference log-probs."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = torch.randint(1, 64, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        chosen, rejected = (torch.randint(1, 64, (int(torch.randint(2, 9, (1,), generator=g)),),
                                          generator=g).tolist() for _ in range(2))
        ref = (-20 * torch.rand(2, generator=g)).tolist()
        rows.append((prompt + chosen, [False] * len(prompt) + [True] * len(chosen),
                     prompt + rejected, [False] * len(prompt) + [True] * len(rejected), *ref))
    return rows


def _trl_loss(loss_type: str, beta: float, model: torch.nn.Module, batch: dpo.PreferenceBatch):
    """TRL's DPOTrainer._compute_loss on BATCH, with precomputed reference log-probs and a model
    whose per-token log-probabilities are lmkit's model's: only TRL's loss arithmetic runs."""
    trl = pytest.importorskip("trl")
    logits, _ = model(batch.inputs)
    per_token = -F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE,
                                 reduction="none").view(batch.targets.shape)
    order = torch.cat([torch.arange(0, len(per_token), 2), torch.arange(1, len(per_token), 2)])  # TRL: chosen, rejected
    mask = (batch.targets != IGNORE)[order].long()
    completion_mask = torch.cat([torch.zeros(len(mask), 1, dtype=torch.long), mask], dim=1)  # shifted by one, as TRL's
    outputs = types.SimpleNamespace(log_probs=per_token[order] * mask, entropy=torch.zeros_like(per_token),
                                    mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(mask).bool())
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, use_weighting=False, label_smoothing=0.0, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": batch.reference[0::2],
              "ref_rejected_logps": batch.reference[1::2]}
    loss = trl.DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_the_dpo_and_ipo_losses_equal_trls_on_the_same_batch_and_reference(loss_type) -> None:
    torch.manual_seed(0)
    model = build_model(CONFIG)
    batch = dpo.collate(0)(_rows(6))
    cfg = DPOConfig(loss=loss_type, beta=0.3)
    mine = dpo.PreferenceLoss(cfg)
    ours = mine(model, batch) / batch.loss_units()
    theirs, logged = _trl_loss(loss_type, 0.3, model, batch)
    torch.testing.assert_close(ours[0], theirs, rtol=1e-5, atol=1e-6)
    taken = mine.take()
    for key, trl_key in (("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                         ("reward_accuracy", "rewards/accuracies"), ("reward_margin", "rewards/margins")):
        assert taken[key] == pytest.approx(logged[trl_key][0], rel=1e-5, abs=1e-6), key
    assert abs(theirs.item() - (0.6931 if loss_type == "sigmoid" else 0)) > 1e-3  # the references matter here


def test_simpo_is_reference_free_and_length_normalised() -> None:
    scores = dpo.PairScores(chosen=torch.tensor([-6.0, -2.0]), rejected=torch.tensor([-4.0, -9.0]),
                            ref_chosen=torch.tensor([5.0, 7.0]), ref_rejected=torch.tensor([-1.0, 3.0]),
                            chosen_tokens=torch.tensor([3, 1]), rejected_tokens=torch.tensor([1, 3]))
    losses_, chosen, rejected = dpo.pair_losses(scores, DPOConfig(loss="simpo", gamma=0.5))
    # beta 2 (SimPO's default): rewards 2 * mean log-prob per token; the references play no part
    torch.testing.assert_close(chosen, torch.tensor([-4.0, -4.0]))
    torch.testing.assert_close(rejected, torch.tensor([-8.0, -6.0]))
    torch.testing.assert_close(losses_, -F.logsigmoid(torch.tensor([4.0 - 0.5, 2.0 - 0.5])))


def _pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_bad_pairs_are_one_line_errors_and_identical_ones_a_counted_skip(tiny_project, tmp_path) -> None:
    good = {"prompt": "HAMLET.\n", "chosen": "To be.", "rejected": "Not to be."}
    for row, message in (({"prompt": "x", "chosen": "a"}, ":1: missing field 'rejected'"),
                         ({**good, "chosen": "  "}, ":1: field 'chosen' is empty"),
                         ({**good, "rejected": 5}, ":1: field 'rejected' must be a string"),
                         ({"chosen": "a", "rejected": "b"}, ":1: needs a \"prompt\" string or a \"messages\""),
                         ({**good, "prompt": None, "messages": [{"role": "assistant", "content": "hi"}]},
                          "must end with the user turn")):
        with pytest.raises(DataError, match=message.replace("(", r"\(")):
            dpo.read_preferences(_pairs(tmp_path / "bad.jsonl", [row]))
    tokenizer = Checkpoint(tiny_project.latest_checkpoint()).tokenizer()
    pairs = dpo.read_preferences(_pairs(tmp_path / "p.jsonl", [good, {**good, "rejected": good["chosen"]},
                                                               {**good, "prompt": "word " * 500}]))
    rows, counts = dpo.encode_preferences(pairs, tokenizer, 32)
    assert counts == {"pairs": 2, "identical": 1, "dropped": 0}
    # the long prompt lost its start
    assert all(len(r[0]) <= 32 and len(r[2]) <= 32 and any(r[1]) and any(r[3]) for r in rows)
    assert rows[1][0][-1] == tokenizer.eos_id and rows[1][1][-1]  # the reply still ends with its end token


def test_chat_form_pairs_learn_the_last_reply_only(tmp_path, tiny_llama_project) -> None:
    tokenizer = Checkpoint(tiny_llama_project.latest_checkpoint()).tokenizer()
    messages = [{"role": "user", "content": "Who goes there?"}, {"role": "assistant", "content": "Nay, answer me."},
                {"role": "user", "content": "Long live the king!"}]
    row = {"messages": messages, "chosen": {"role": "assistant", "content": "Bernardo?"},
           "rejected": [{"role": "assistant", "content": "Hello."}]}
    path = _pairs(tmp_path / "chat.jsonl", [row])
    [pair] = dpo.read_preferences(path)
    [row], _ = dpo.encode_preferences([pair], tokenizer, 128)
    learned = tokenizer.decode([t for t, keep in zip(row[0], row[1]) if keep])
    assert "Bernardo?" in learned and "Nay" not in learned


def _preference_files(tmp_path: Path) -> tuple[Path, Path]:
    """Pairs a tiny model can learn: the chosen reply repeats the prompt's words, the rejected one
    is the same words reversed letter by letter."""
    words = "the king is dead long live the king my lord what news good night sweet prince".split()
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(120):
        picked = [words[i] for i in torch.randint(0, len(words), (4,), generator=g).tolist()]
        text = " ".join(picked)
        rows.append({"prompt": text + "\n", "chosen": text, "rejected": " ".join(w[::-1] for w in picked)})
    return _pairs(tmp_path / "train.jsonl", rows[:100]), _pairs(tmp_path / "val.jsonl", rows[100:])


def _dpo(project: Project, base: Project, data: Path, val: Path, progress=None, **overrides):
    spec = ft.FinetuneSpec("dpo", str(data), str(base.latest_checkpoint()), str(val))
    sets = tuple(f"{k.replace('__', '.')}={v}" for k, v in overrides.items())
    return ft.finetune(project, spec, sets=sets, progress=progress)


def test_a_preference_finetune_learns_to_prefer_the_chosen_replies(tiny_project, tmp_path) -> None:
    data, val = _preference_files(tmp_path)
    start = tiny_project.latest_checkpoint()
    device = torch.device("cpu")
    before, _ = evaluate_checkpoint(Checkpoint(start), val, EvalOptions(), device)
    project = Project.open(tmp_path / "ft")
    result = _dpo(project, tiny_project, data, val, train__max_steps=30, train__eval_interval=10, train__lr=1e-3,
                  train__batch_size=8, train__log_interval=1, dpo__beta=0.5)
    ckpt = Checkpoint(result.outcome.best_checkpoint)
    assert ckpt.task == "dpo" and TASKS[ckpt.task].language_model
    after, records = evaluate_checkpoint(ckpt, val, EvalOptions(reference=str(start)), device)
    assert after.accuracy >= before.accuracy + 0.3 and after.reward_accuracy >= 0.8 and after.reward_margin > 0
    assert len(records) == after.pairs == 20
    rows = [json.loads(line) for line in project.metrics_file(result.run).read_text().splitlines()]
    assert {"reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"} <= rows[0].keys()
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=0.01)  # step 1: the model is still its own reference
    assert "val_reward_accuracy" in rows[-1]


def test_with_lora_the_reference_is_the_base_and_a_resumed_run_equals_an_uninterrupted_one(tiny_project,
                                                                                          tmp_path) -> None:
    data, val = _preference_files(tmp_path)
    flags = {"lora__rank": 4, "train__max_steps": 12, "train__eval_interval": 6, "train__save_interval": 5,
             "train__batch_size": 8, "train__log_interval": 1}
    straight = Project.open(tmp_path / "a")
    done = _dpo(straight, tiny_project, data, val, **flags)
    stopped = Project.open(tmp_path / "b")
    first = _dpo(stopped, tiny_project, data, val, progress=signal_at(7, signal.SIGINT), **flags)
    assert first.outcome.stopped_by == signal.SIGINT
    ft.resume(stopped)  # recomputes the references from the base, not from the adapted model
    assert losses(stopped, "run1") == losses(straight, "run1")
    assert Checkpoint(done.outcome.checkpoint).meta["weights"] == "adapters"

    start = Checkpoint(tiny_project.latest_checkpoint())
    base = start.model()
    spec = ft.FinetuneSpec("dpo", str(data), str(start.path), str(val))
    plan = ft.task_plan(straight, spec, Checkpoint(done.outcome.checkpoint).config, start.tokenizer(), base,
                        torch.device("cpu"))
    batch = plan.val_batches[0]
    with torch.no_grad():
        logps, _ = dpo.reply_logps(base.eval(), batch.inputs, batch.targets)
    torch.testing.assert_close(batch.reference, logps)


def test_eval_finds_pairs_by_their_fields_and_checks_the_reference(tiny_project, tiny_bert_project, tmp_path) -> None:
    data, _ = _preference_files(tmp_path)
    project = tiny_project.root
    result = lmkit("eval", data, "-p", project, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["pairs"] == 100 and 0 <= report["accuracy"] <= 1 and "reward_accuracy" not in report
    assert_user_error(lmkit("eval", data, "-p", tiny_bert_project.root),
                      "preference pairs are scored by a decoder language model")
    assert_user_error(lmkit("eval", data, "-p", project, "--reference", tiny_bert_project.latest_checkpoint()),
                      "preference pairs are scored by a decoder language model")
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be.\n", encoding="utf-8")
    assert_user_error(lmkit("eval", text, "-p", project, "--reference", tiny_project.latest_checkpoint()),
                      "--reference compares implicit rewards on preference pairs")
    assert_user_error(lmkit("eval", text, "-p", project, "--task", "nonsense"), "--task nonsense is not one of")
    assert_user_error(lmkit("finetune", data, "--task", "dpo", "-p", tmp_path / "x", "--from", project, "--scratch"),
                      "leave out --scratch")
