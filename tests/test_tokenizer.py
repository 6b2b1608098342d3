from __future__ import annotations

import io

import pytest

from lmkit.config import TokenizerConfig
from lmkit.corpus import MAX_LINE_CHARS, iter_lines, split_lines
from lmkit.errors import DataError
from lmkit.tokenizer import Tokenizer, decode_stream, encode_stream, train_tokenizer

ODD_TEXTS = [
    "",
    "plain line",
    "trailing newline\n",
    "\n\nblank lines\n\n\nbetween\n",
    "\ttabs\tand  double  spaces   and trailing   ",
    "   leading spaces",
    "RARE CAPITALS: XYZZY QWERTY",
    "emoji 😀🎭 and CJK 漢字かな한국어, accents ünïcödé, combining e\u0301",
    "sentencepiece's own mark ▁ and ▁▁ doubled",
    "windows\r\nline\r\nendings\r\n",
    "control \x01 chars \x7f and NUL \x00 and form\x0cfeed and \u2028 separator",
    "zero\u200bwidth, nbsp\u00a0, bom\ufeff, rtl \u05e9\u05dc\u05d5\u05dd",
    "x" * 10_000,
    "🎭" * 500,
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory, sample_text: str) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer([split_lines(sample_text[:200_000])], path, TokenizerConfig(vocab_size=600))


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_round_trip_is_exact(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_id not in ids  # byte fallback: nothing is ever unknown


def test_round_trip_on_sample_lines(tokenizer: Tokenizer, sample_text: str) -> None:
    text = sample_text[-50_000:]
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_newline_is_one_token_and_lines_encode_alike(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("\n") == [tokenizer.newline_id]
    lines = ["To be, or not to be\n", "that is the question\n", "no newline"]
    batched = tokenizer.encode_lines(lines)
    assert [i for ids in batched for i in ids] == tokenizer.encode("".join(lines))
    assert batched[0][-1] == tokenizer.newline_id and batched[2][-1] != tokenizer.newline_id


def test_special_tokens_are_reserved_and_never_produced_by_text(tokenizer: Tokenizer) -> None:
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert tokenizer.pieces([4, 5, 6]) == ["<cls>", "<sep>", "<mask>"]
    ids = tokenizer.encode("<s> </s> <pad> <cls> <sep> <mask> [MASK]")
    assert not set(ids) & {0, 1, 2, 3, 4, 5, 6}


def test_vocab_size_is_a_soft_limit_on_small_corpora(tmp_path) -> None:
    tok = train_tokenizer([["hello world\n", "foo bar baz\n"]], tmp_path / "t.model", TokenizerConfig(vocab_size=4096))
    assert 256 < tok.vocab_size < 4096
    assert tok.decode(tok.encode("unseen: Ωμέγα")) == "unseen: Ωμέγα"


def test_training_writes_metadata_and_is_deterministic(tmp_path, sample_text: str) -> None:
    docs = lambda: [split_lines(sample_text[:30_000])]  # noqa: E731
    a = train_tokenizer(docs(), tmp_path / "a" / "tokenizer.model", TokenizerConfig(vocab_size=400))
    b = train_tokenizer(docs(), tmp_path / "b" / "tokenizer.model", TokenizerConfig(vocab_size=400))
    assert a.fingerprint == b.fingerprint
    assert (tmp_path / "a" / "tokenizer.json").is_file()
    assert Tokenizer.load(tmp_path / "a" / "tokenizer.model").fingerprint == a.fingerprint


@pytest.mark.parametrize("model_type", ["unigram", "char", "word"])
def test_other_model_types_round_trip(tmp_path, sample_text: str, model_type: str) -> None:
    tok = train_tokenizer([split_lines(sample_text[:30_000])], tmp_path / "t.model",
                          TokenizerConfig(vocab_size=500, model_type=model_type))
    for text in ODD_TEXTS[:10]:
        assert tok.decode(tok.encode(text)) == text


def test_empty_corpus_is_a_data_error(tmp_path) -> None:
    with pytest.raises(DataError, match="no text"):
        train_tokenizer([["\n", "   \n"]], tmp_path / "t.model", TokenizerConfig())


def test_lines_over_a_mebibyte_round_trip_through_the_streams(tokenizer: Tokenizer) -> None:
    """corpus.iter_lines hands on lines over MAX_LINE_CHARS in pieces: their ids still make one
    line of valid ids, and a long id line decodes whole."""
    text = "hello world " * 100_000 + "\nshort line\n" + "Ä ü " * 300_000
    assert len(text) > 2 * MAX_LINE_CHARS

    def stream(s: str) -> list[str]:
        return list(iter_lines(io.BytesIO(s.encode("utf-8")), "test"))

    encoded = "".join(encode_stream(tokenizer, stream(text)))
    assert encoded.count("\n") == 2 and len(encoded) > MAX_LINE_CHARS
    ids = [int(word) for word in encoded.split()]
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert "".join(decode_stream(tokenizer, stream(encoded))) == text
