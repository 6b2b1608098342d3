"""Checks on the generated sample corpora (built by sample_data/build.py)."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data"
TRAIN = "shakespeare_train.txt"
HELDOUT = "shakespeare_heldout.txt"
ALL = "shakespeare_all.txt"
OUTPUTS = (TRAIN, HELDOUT, ALL)
SPLITS = ("train", "val", "test")
GENRE_FILES = {split: f"genre_{split}.csv" for split in SPLITS}
SPEECH_FILES = {split: f"speech_{split}.jsonl" for split in SPLITS}
CHAT_FILES = {split: f"chat_{split}.jsonl" for split in SPLITS}
SPELLING_FILES = {split: f"spelling_{split}.tsv" for split in SPLITS}
TASK_OUTPUTS = (*GENRE_FILES.values(), *SPEECH_FILES.values(), *SPELLING_FILES.values())
GENRE_LABELS = {"comedy", "history", "tragedy"}

if not all((SAMPLE_DIR / name).is_file() for name in OUTPUTS):
    pytest.skip(
        "sample data not built (run `python sample_data/build.py`)",
        allow_module_level=True,
    )


def _read_sums() -> dict[str, str]:
    sums = {}
    for line in (SAMPLE_DIR / "SHA256SUMS").read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*")] = digest
    return sums


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    return {name: (SAMPLE_DIR / name).read_bytes().decode("utf-8") for name in OUTPUTS}


@pytest.mark.parametrize("name", OUTPUTS + TASK_OUTPUTS)
def test_output_exists_and_nonempty(name):
    path = SAMPLE_DIR / name
    assert path.is_file(), f"{name} missing (run `python sample_data/build.py`)"
    assert path.stat().st_size > 0


@pytest.mark.parametrize("name", OUTPUTS + TASK_OUTPUTS)
def test_matches_sha256sums(name):
    sums = _read_sums()
    assert name in sums, f"{name} not listed in SHA256SUMS"
    digest = hashlib.sha256((SAMPLE_DIR / name).read_bytes()).hexdigest()
    assert digest == sums[name], f"{name} does not match SHA256SUMS (rebuild it)"


def test_train_size_in_range():
    size = (SAMPLE_DIR / TRAIN).stat().st_size
    assert 950_000 <= size <= 1_200_000


def test_heldout_not_in_train(texts):
    train, heldout = texts[TRAIN], texts[HELDOUT]
    title = heldout.split("\n", 1)[0]
    assert title.strip(), "held-out file should start with the play's title line"
    assert title not in train
    # No substantial line of the held-out play occurs verbatim in train.
    train_lines = set(train.split("\n"))
    long_lines = {ln for ln in heldout.split("\n") if len(ln) >= 40}
    assert len(long_lines) > 500
    shared = long_lines & train_lines
    assert len(shared) <= len(long_lines) // 100, sorted(shared)[:5]


def test_all_contains_train_and_heldout(texts):
    all_text = texts[ALL]
    assert texts[HELDOUT] in all_text
    assert len(all_text) > 4 * len(texts[TRAIN])


@pytest.mark.parametrize("name", OUTPUTS)
def test_no_gutenberg_boilerplate(texts, name):
    text = texts[name]
    assert "gutenberg" not in text.lower()
    assert "ELECTRONIC VERSION" not in text
    assert "SMALL PRINT" not in text


@pytest.mark.parametrize("name", OUTPUTS)
def test_clean_utf8_with_single_final_newline(texts, name):
    text = texts[name]  # decoded strictly as UTF-8 by the fixture
    assert text.endswith("\n") and not text.endswith("\n\n")
    assert "\r" not in text
    assert "\n\n\n\n" not in text  # at most two consecutive blank lines
    assert not any(ln != ln.rstrip() for ln in text.split("\n"))


# --------------------------------------------------------------------------
# Task datasets (genre_*.csv, speech_*.jsonl, spelling_*.tsv)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def build() -> ModuleType:
    """sample_data/build.py, imported as a module (for its split constants)."""
    spec = importlib.util.spec_from_file_location("sample_data_build", SAMPLE_DIR / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read_task_text(name: str) -> str:
    path = SAMPLE_DIR / name
    if not path.is_file():
        pytest.fail(f"{name} missing (run `python sample_data/build.py`)")
    return path.read_bytes().decode("utf-8")


@pytest.fixture(scope="module")
def genre_rows() -> dict[str, list[list[str]]]:
    rows = {}
    for split, name in GENRE_FILES.items():
        reader = csv.reader(_read_task_text(name).splitlines(keepends=True))
        rows[split] = list(reader)
    return rows


@pytest.fixture(scope="module")
def speech_rows() -> dict[str, list[dict]]:
    return {
        split: [json.loads(line) for line in _read_task_text(name).splitlines()] for split, name in SPEECH_FILES.items()
    }


@pytest.fixture(scope="module")
def spelling_rows() -> dict[str, list[list[str]]]:
    return {
        split: [line.split("\t") for line in _read_task_text(name).split("\n")[:-1]]
        for split, name in SPELLING_FILES.items()
    }


def test_task_splits_are_disjoint_and_cover_every_play(build):
    splits = build.task_splits()
    assert set(splits) == set(SPLITS)
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not set(splits[a]) & set(splits[b]), (a, b)
    plays = [p for split in SPLITS for p in splits[split]]
    assert len(plays) == len(set(plays)) == len(build.GENRES) == 37
    assert set(plays) == set(build.GENRES)
    assert splits["val"] == build.TASK_VAL_PLAYS and splits["test"] == build.TASK_TEST_PLAYS


def test_task_val_test_plays_unseen_in_pretraining(build):
    splits = build.task_splits()
    seen = set(build.TRAIN_PLAYS) | set(build.HELDOUT_PLAYS)
    assert not (set(splits["val"]) | set(splits["test"])) & seen
    assert seen <= set(splits["train"])


@pytest.mark.parametrize("split", SPLITS)
def test_task_split_has_every_genre(build, split):
    assert {build.GENRES[p] for p in build.task_splits()[split]} == GENRE_LABELS


@pytest.mark.parametrize("split", SPLITS)
def test_genre_csv_format_and_labels(genre_rows, split):
    header, *rows = genre_rows[split]
    assert header == ["text", "label"]
    assert len(rows) >= 300
    assert all(len(row) == 2 for row in rows)
    labels = [label for _, label in rows]
    assert set(labels) == GENRE_LABELS  # labels valid, and all three present
    for text, _ in rows:
        assert 200 <= len(text) <= 400
        assert text == text.strip("\n") and text.strip()
    assert any("\n" in text for text, _ in rows)  # multi-line passages survive the CSV quoting


def test_genre_csv_sizes(build, genre_rows):
    splits = build.task_splits()
    for split in SPLITS:
        assert len(genre_rows[split]) - 1 <= build.GENRE_MAX_PER_PLAY * len(splits[split])
    assert (SAMPLE_DIR / GENRE_FILES["train"]).stat().st_size < 2_000_000


def test_genre_passages_disjoint_across_splits(genre_rows):
    texts = {split: {text for text, _ in genre_rows[split][1:]} for split in SPLITS}
    assert not texts["train"] & texts["val"]
    assert not texts["train"] & texts["test"]
    assert not texts["val"] & texts["test"]


def test_genre_passages_verbatim_and_unseen(genre_rows):
    all_text = (SAMPLE_DIR / ALL).read_text(encoding="utf-8")
    pretrain = (SAMPLE_DIR / TRAIN).read_text(encoding="utf-8") + (SAMPLE_DIR / HELDOUT).read_text(encoding="utf-8")
    for split in SPLITS:
        for text, _ in genre_rows[split][1::25]:  # a sample: each check scans megabytes
            assert text in all_text
            if split != "train":
                assert text not in pretrain


@pytest.mark.parametrize("split", SPLITS)
def test_speech_jsonl_rows(build, speech_rows, split):
    rows = speech_rows[split]
    assert len(rows) >= 300
    for row in rows:
        assert isinstance(row, dict) and list(row) == ["prompt", "completion"]
        assert all(isinstance(v, str) and v.strip() for v in row.values())
        assert row["prompt"].endswith("\n") and "\n\n" in row["prompt"]
        lo, hi = build.SPEECH_CHARS
        assert lo <= len(row["completion"]) <= hi
    assert len(rows) <= build.SPEECH_MAX_PER_PLAY * len(build.task_splits()[split])


def test_speech_jsonl_one_object_per_line():
    for name in SPEECH_FILES.values():
        text = _read_task_text(name)
        assert text.endswith("\n") and "\r" not in text
        for line in text.splitlines():
            assert line.startswith('{"prompt": ') and line.endswith("}")


@pytest.mark.parametrize("split", SPLITS)
def test_chat_conversations_alternate_and_end_with_the_assistant(build, split):
    from lmkit import chat

    rows = chat.read_conversations(SAMPLE_DIR / CHAT_FILES[split])  # lmkit's own reader accepts every line
    assert 400 <= len(rows) <= build.CHAT_MAX_PER_PLAY * len(build.task_splits()[split])
    lo, hi = build.SPEECH_CHARS
    for messages in rows:
        roles = [m["role"] for m in messages]
        assert roles[0] == "system" and roles[-1] == "assistant" and len(roles) - 1 <= build.CHAT_MAX_TURNS
        assert roles[1:] == ["user", "assistant"] * ((len(roles) - 1) // 2)
        assert all(lo <= len(m["content"]) <= hi for m in messages[1:])
        assert messages[0]["content"].startswith("You are ") and " speaking with " in messages[0]["content"]
    keys = {json.dumps(m) for m in rows}
    assert len(keys) == len(rows)


def test_chat_conversations_disjoint_across_splits():
    keys = {split: set(_read_task_text(name).splitlines()) for split, name in CHAT_FILES.items()}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]


def test_speech_pairs_disjoint_across_splits(speech_rows):
    keys = {split: {json.dumps(r) for r in speech_rows[split]} for split in SPLITS}
    assert not keys["train"] & keys["val"]
    assert not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]


@pytest.mark.parametrize("split", SPLITS)
def test_spelling_tsv_rows(build, spelling_rows, split):
    rows = spelling_rows[split]
    assert len(rows) >= 1000
    lo, hi = build.SPELLING_CHARS
    for row in rows:
        assert len(row) == 2, row
        source, target = row
        assert source and target and source == source.strip() and target == target.strip()
        assert lo <= len(source) <= hi and lo <= len(target) <= hi
    # Both kinds of pairs: spelling changes, and lines already spelt the modern way.
    same = sum(s == t for s, t in rows)
    assert 0 < same < len(rows) // 5


def test_spelling_tsv_no_header_no_stray_whitespace():
    for name in SPELLING_FILES.values():
        text = _read_task_text(name)
        assert text.endswith("\n") and "\r" not in text
        assert not text.startswith("source\t")
