from __future__ import annotations

import numpy as np
import pytest

from lmkit.config import DataConfig, TokenizerConfig
from lmkit.corpus import split_lines
from lmkit.errors import DataError
from lmkit.prepare import load_prepared, prepare
from lmkit.project import Project
from lmkit.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, sample_text):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer([split_lines(sample_text[:100_000])], path, TokenizerConfig(vocab_size=500))


def test_splits_hold_every_token_once_with_eos_between_documents(tmp_path, tokenizer, sample_text) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(sample_text[:60_000])
    b.write_text(sample_text[60_000:90_000])
    project = Project.open(tmp_path / "p")
    prepared = prepare(project, [a, b], tokenizer, DataConfig(val_fraction=0.1))
    train, val = prepared.train.array(), prepared.val.array()
    expected = len(tokenizer.encode(a.read_text())) + len(tokenizer.encode(b.read_text())) + 2  # + one EOS per file
    assert len(train) + len(val) == expected
    assert 0.05 < len(val) / expected < 0.15
    assert train.dtype == np.uint16
    assert (np.concatenate([train, val]) == tokenizer.eos_id).sum() == 2
    assert prepared.train.meta["bytes"] + prepared.val.meta["bytes"] == 90_000
    # Val blocks are whole lines of the corpus: decoded, each line of val occurs in the text.
    val_text = tokenizer.decode(val.tolist())
    assert all(line in sample_text for line in val_text.split("\n"))


def test_up_to_date_files_are_reused_and_changed_inputs_re_prepared(tmp_path, tokenizer, sample_text) -> None:
    path = tmp_path / "c.txt"
    path.write_text(sample_text[:20_000])
    project = Project.open(tmp_path / "p")
    first = prepare(project, [path], tokenizer, DataConfig())
    assert not first.reused
    assert prepare(project, [path], tokenizer, DataConfig()).reused
    path.write_text(sample_text[:25_000])
    again = prepare(project, [path], tokenizer, DataConfig())
    assert not again.reused and again.train.tokens > first.train.tokens
    assert load_prepared(project, tokenizer) is not None


def test_tiny_corpus_still_gets_a_val_split(tmp_path, tokenizer, sample_text) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text(sample_text[:1_500])
    prepared = prepare(Project.open(tmp_path / "p"), [path], tokenizer, DataConfig())
    assert prepared.train.tokens > 0 and prepared.val.tokens > 0


def test_too_small_corpus_is_an_error_and_writes_nothing(tmp_path, tokenizer) -> None:
    path = tmp_path / "one.txt"
    path.write_text("a few words\n")
    project = Project.open(tmp_path / "p")
    with pytest.raises(DataError, match="too small"):
        prepare(project, [path], tokenizer, DataConfig())
    assert not project.tokens_file("train").exists()


def test_prepare_streams_with_bounded_memory(tmp_path, tokenizer, sample_text, monkeypatch) -> None:
    """With small read blocks and batches, peak Python memory stays a fraction of the corpus size:
    nothing holds the whole text or all of its token ids (as Python ints that would be ~10x the text)."""
    import tracemalloc

    from lmkit import corpus
    from lmkit import prepare as prepare_module

    monkeypatch.setattr(corpus, "BLOCK_BYTES", 1 << 16)
    monkeypatch.setattr(prepare_module, "_BATCH_LINES", 512)
    path = tmp_path / "big.txt"
    path.write_text(sample_text[:300_000] * 6)
    tracemalloc.start()
    prepared = prepare(Project.open(tmp_path / "p"), [path], tokenizer, DataConfig())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert prepared.train.tokens + prepared.val.tokens > 500_000
    assert peak < path.stat().st_size / 1.5, f"peak {peak / 1e6:.2f} MB for {path.stat().st_size / 1e6:.1f} MB"
