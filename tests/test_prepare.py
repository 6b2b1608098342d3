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


def test_files_jsonl_gz_directories_and_globs_give_the_tokens_of_their_documents(tmp_path, tokenizer,
                                                                                sample_text) -> None:
    import gzip
    import json

    folder = tmp_path / "corpus"
    (folder / "more").mkdir(parents=True)
    docs = [sample_text[:8_000], sample_text[8_000:12_000], sample_text[12_000:15_000], sample_text[15_000:30_000]]
    (folder / "a.txt").write_text(docs[0])
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[1:3]))
    with gzip.open(folder / "more" / "c.txt.gz", "wt") as f:
        f.write(docs[3])
    (folder / "notes.bin").write_bytes(b"\x00\x01")  # not a corpus suffix: left out of a directory
    expected = [t for d in docs for t in [*tokenizer.encode(d), tokenizer.eos_id]]

    def tokens(inputs, workers=1) -> list[int]:
        project = Project.open(tmp_path / f"p{len(list(tmp_path.iterdir()))}")
        prepared = prepare(project, inputs, tokenizer, DataConfig(val_fraction=0.1), workers=workers)
        return sorted(prepared.train.array().tolist() + prepared.val.array().tolist())

    assert tokens([folder]) == sorted(expected)
    assert tokens([folder / "a.txt", str(folder / "*.jsonl"), folder / "more"]) == sorted(expected)


def test_worker_processes_write_the_same_files_as_one(tmp_path, tokenizer, sample_text) -> None:
    path = tmp_path / "c.txt"
    path.write_text(sample_text[:200_000])
    one = prepare(Project.open(tmp_path / "one"), [path], tokenizer, DataConfig())
    two = prepare(Project.open(tmp_path / "two"), [path], tokenizer, DataConfig(), workers=2)
    assert np.array_equal(one.train.array(), two.train.array()) and np.array_equal(one.val.array(), two.val.array())


def test_a_glob_or_directory_without_corpora_is_a_clear_error(tmp_path, tokenizer) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is a directory with no .txt"):
        prepare(Project.open(tmp_path / "p"), [tmp_path / "empty"], tokenizer, DataConfig())
    with pytest.raises(DataError, match="no file matches"):
        prepare(Project.open(tmp_path / "p"), [tmp_path / "*.nothing"], tokenizer, DataConfig())
