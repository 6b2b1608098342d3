from __future__ import annotations

import gzip
import io
import json

import pytest

from lmkit import corpus
from lmkit.errors import DataError


def lines_of(paths, field="text"):
    return [list(doc) for doc in corpus.iter_documents(paths, field)]


def test_text_file_is_one_document_with_exact_lines(tmp_path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"one\r\ntwo\n\nlast without newline")
    (doc,) = lines_of([path])
    assert doc == ["one\r\n", "two\n", "\n", "last without newline"]
    assert "".join(doc).encode() == path.read_bytes()


def test_jsonl_records_are_documents_and_gz_is_read(tmp_path) -> None:
    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "first\nrecord"}) + "\n\n" + json.dumps({"body": "second\n"}) + "\n")
    assert lines_of([path], "body") == [["first\n", "record"], ["second\n"]]


def test_only_newline_ends_a_line() -> None:
    assert corpus.split_lines("a\rb\x0cc\u2028d\ne") == ["a\rb\x0cc\u2028d\n", "e"]


def test_huge_lines_come_in_bounded_pieces() -> None:
    text = "x" * (corpus.MAX_LINE_CHARS * 2 + 5) + "\nend"
    pieces = list(corpus.iter_lines(io.BytesIO(text.encode()), "big"))
    assert max(map(len, pieces)) <= corpus.MAX_LINE_CHARS
    assert "".join(pieces) == text


@pytest.mark.parametrize("block_bytes", [1, 2, corpus.BLOCK_BYTES])  # the mark split across reads too
def test_a_byte_order_mark_opening_a_file_is_not_text(tmp_path, monkeypatch, block_bytes) -> None:
    monkeypatch.setattr(corpus, "BLOCK_BYTES", block_bytes)
    text = tmp_path / "notepad.txt"
    text.write_bytes(b"\xef\xbb\xbfFirst line\nsecond \xef\xbb\xbf stays\n")  # only the opening one is a mark
    assert lines_of([text]) == [["First line\n", "second \ufeff stays\n"]]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "one"}).encode() + b"\n")
    assert lines_of([jsonl]) == [["one"]]
    assert corpus.read_text(text) == "First line\nsecond \ufeff stays\n"


def test_multibyte_characters_split_across_blocks_decode(monkeypatch) -> None:
    monkeypatch.setattr(corpus, "BLOCK_BYTES", 3)
    text = "é漢😀\nab"
    assert "".join(corpus.iter_lines(io.BytesIO(text.encode()), "s")) == text


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is empty"),
    (b"\x00\x01\x02binary", "binary"),
    (b"caf\xe9 latin-1\n", "not valid UTF-8 .*line 1"),
    (b"ok\nok\n\xff\n", "line 3"),
])
def test_bad_text_files_are_data_errors(tmp_path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        lines_of([path])


def test_missing_and_directory_paths(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        corpus.check_files([tmp_path / "nope.txt"])
    with pytest.raises(DataError, match="is a directory"):
        corpus.check_files([tmp_path])


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "not valid JSON"),
    ('{"other": "x"}', "no 'text' field .*other"),
    ('{"text": 3}', "field 'text' is not a string"),
])
def test_bad_jsonl_records(tmp_path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl:2: {message}"):
        lines_of([path])
