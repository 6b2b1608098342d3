"""Task data: reading labelled and prompt/completion files, encoding, batching and masking."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from lmkit import finetune_data
from lmkit.errors import DataError
from lmkit.models import ARCHS, causal
from lmkit.objectives import IGNORE
from lmkit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_project) -> Tokenizer:
    return Tokenizer.load(tiny_project.tokenizer_model)


def test_csv_tsv_and_jsonl_give_the_same_examples(tmp_path) -> None:
    rows = [("Fair is foul, and foul is fair", "tragedy"), ('He said "peace",\nthen left', "history"),
            ("Journeys end in lovers meeting", "comedy")]
    csv_file = tmp_path / "a.csv"
    csv_file.write_text("text,label\n" + "".join(f'"{t.replace(chr(34), 2 * chr(34))}",{lab}\n' for t, lab in rows))
    tsv_file = tmp_path / "a.tsv"  # no header: the first row is data
    tsv_file.write_text("".join(f"{t.replace(chr(10), ' ')}\t{lab}\n" for t, lab in rows))
    jsonl_file = tmp_path / "a.jsonl"
    jsonl_file.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    expected = [finetune_data.LabelledText(t, lab) for t, lab in rows]
    assert finetune_data.read_labelled(csv_file) == expected
    assert finetune_data.read_labelled(jsonl_file) == expected
    assert [e.label for e in finetune_data.read_labelled(tsv_file)] == [lab for _, lab in rows]


def test_a_byte_order_mark_hides_no_header_and_breaks_no_json(tmp_path) -> None:
    bom = "\ufeff"  # what Excel's "CSV UTF-8" and Windows editors put first
    csv_file = tmp_path / "excel.csv"
    csv_file.write_text(f"{bom}text,label\nFair is foul,tragedy\nJourneys end,comedy\n", encoding="utf-8")
    assert finetune_data.read_labelled(csv_file) == [finetune_data.LabelledText("Fair is foul", "tragedy"),
                                             finetune_data.LabelledText("Journeys end", "comedy")]
    jsonl_file = tmp_path / "a.jsonl"
    jsonl_file.write_text(bom + json.dumps({"prompt": "Hi", "completion": " there"}) + "\n", encoding="utf-8")
    assert finetune_data.read_prompt_completions(jsonl_file) == [finetune_data.PromptCompletion("Hi", " there")]
    tsv_file = tmp_path / "pairs.tsv"
    tsv_file.write_text(f"{bom}hello\tbonjour\n", encoding="utf-8")
    assert finetune_data.read_source_targets(tsv_file) == [finetune_data.SourceTarget("hello", "bonjour")]


def test_a_second_text_column_makes_pairs(tmp_path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("text,text_b,label\nA man,A person,entails\nA cat,A dog,contradicts\n")
    assert finetune_data.read_labelled(path)[1] == finetune_data.LabelledText("A cat", "contradicts", "A dog")


@pytest.mark.parametrize(("name", "content", "message"), [
    ("empty.csv", "text,label\n", "has no examples"),
    ("ragged.csv", "text,label\nonly text\n", "row 2 has 1 column(s)"),
    ("bad.jsonl", '{"text": "x", "label": "a"}\n{"text": "y"\n', "bad.jsonl:2"),
    ("nolabel.jsonl", '{"text": "x"}\n', "missing field 'label'"),
    ("pair.jsonl", '{"text": "x", "text_b": 5, "label": "a"}\n', "pair.jsonl:1: field 'text_b' must be a string"),
])
def test_bad_labelled_files_name_the_problem(tmp_path, name, content, message) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(message)):
        finetune_data.read_labelled(path)


def test_labels_map_to_ids_and_back(tokenizer) -> None:
    examples = [finetune_data.LabelledText(f"line {i}", label) for i, label in enumerate(["b", "a", "c", "a", "b"])]
    labels = finetune_data.label_set(examples)
    assert labels == ["a", "b", "c"]  # sorted: the same ids whatever order the file has
    encoded = finetune_data.encode_labelled(examples, tokenizer, labels, causal.pair_layout(tokenizer), 32)
    assert [labels[label_id] for _, _, label_id in encoded] == [e.label for e in examples]
    unknown = [finetune_data.LabelledText("x", "d")]
    with pytest.raises(DataError, match="label 'd' does not occur"):
        finetune_data.encode_labelled(unknown, tokenizer, labels, causal.pair_layout(tokenizer), 32)


def test_bert_pairs_get_cls_sep_and_token_types_and_fit_the_context(tokenizer) -> None:
    pair = finetune_data.LabelledText("word " * 40, "x", "other " * 10)
    (ids, types, _), = finetune_data.encode_labelled([pair], tokenizer, ["x"], ARCHS["bert"].pair_layout(tokenizer), 32)
    assert len(ids) == 32 and ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id
    assert ids.count(tokenizer.sep_id) == 2
    first_sep = ids.index(tokenizer.sep_id)
    assert types == [0] * (first_sep + 1) + [1] * (31 - first_sep)


def test_stratified_split_keeps_label_shares_and_is_deterministic() -> None:
    examples = [finetune_data.LabelledText(str(i), "a" if i % 4 else "b") for i in range(200)]  # 150 a, 50 b
    train, val = finetune_data.stratified_split(examples, 0.1, seed=3)
    assert Counter(e.label for e in val) == {"a": 15, "b": 5}
    assert sorted(train + val, key=lambda e: int(e.text)) == examples
    assert finetune_data.stratified_split(examples, 0.1, seed=3) == (train, val)


def test_prompt_tokens_are_masked_out_of_the_loss(tokenizer) -> None:
    pairs = [finetune_data.PromptCompletion("HAMLET.\nTo be, or not to be?\n\nHORATIO.\n", "My lord."),
             finetune_data.PromptCompletion("Q", "A longer answer, with more tokens in it")]
    rows = finetune_data.encode_prompt_completions(pairs, tokenizer, 64)
    inputs, targets = finetune_data.collate_prompt_completions(tokenizer.pad_id)(rows)
    assert inputs.shape == targets.shape
    for (ids, n_prompt), row_inputs, row_targets, pair in zip(rows, inputs, targets, pairs):
        learned = row_targets[row_targets != IGNORE].tolist()
        assert learned == tokenizer.encode(pair.completion) + [tokenizer.eos_id]  # completion + EOS only
        assert row_inputs[: len(ids) - 1].tolist() == ids[:-1]
        assert (row_targets[: n_prompt - 1] == IGNORE).all()


def test_long_prompts_lose_their_beginning_and_keep_room_for_the_completion(tokenizer) -> None:
    pair = finetune_data.PromptCompletion("word " * 100, "the end " * 100)
    (ids, n_prompt), = finetune_data.encode_prompt_completions([pair], tokenizer, 32)
    assert len(ids) <= 32 and n_prompt >= 1 and len(ids) - n_prompt >= 16
    assert ids[:n_prompt] == ([tokenizer.eos_id] + tokenizer.encode(pair.prompt))[-n_prompt:]


def test_epoch_batches_resume_mid_epoch() -> None:
    rows = list(range(10))
    straight = finetune_data.EpochBatches(rows, 4, seed=1, collate=list)
    expected = [next(straight) for _ in range(6)]  # crosses two epoch boundaries
    first = finetune_data.EpochBatches(rows, 4, seed=1, collate=list)
    seen = [next(first) for _ in range(3)]
    second = finetune_data.EpochBatches(rows, 4, seed=1, collate=list)
    second.load_state_dict(first.state_dict())
    assert seen + [next(second) for _ in range(3)] == expected
    assert sorted(expected[0] + expected[1] + expected[2][:2]) == rows  # each epoch sees every row once


def test_a_csv_field_longer_than_the_csv_modules_default_limit_reads(tmp_path) -> None:
    path = tmp_path / "long.csv"
    path.write_text('text,label\n"' + "a" * 200_000 + '",x\nshort,y\n')
    examples = finetune_data.read_labelled(path)
    assert [len(e.text) for e in examples] == [200_000, 5] and [e.label for e in examples] == ["x", "y"]
