"""Checks on the generated sample corpora (built by sample_data/build.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data"
TRAIN = "shakespeare_train.txt"
HELDOUT = "shakespeare_heldout.txt"
ALL = "shakespeare_all.txt"
OUTPUTS = (TRAIN, HELDOUT, ALL)

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


@pytest.mark.parametrize("name", OUTPUTS)
def test_output_exists_and_nonempty(name):
    assert (SAMPLE_DIR / name).stat().st_size > 0


@pytest.mark.parametrize("name", OUTPUTS)
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
