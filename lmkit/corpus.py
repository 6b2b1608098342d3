"""Reading user text safely: plain text, JSONL and .gz files become checked UTF-8 documents.

A document is a stream of lines that keep their "\\n" (the last may lack one), so what is read
can be written back byte for byte (but for a byte-order mark opening a file, which is not text).
Memory stays bounded: files are read in 1 MiB blocks and a line longer than MAX_LINE_CHARS is
handed on in pieces.
"""

from __future__ import annotations

import codecs
import gzip
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from lmkit.errors import DataError

BLOCK_BYTES = 1 << 20
MAX_LINE_CHARS = 1 << 20
SNIFF_BYTES = 8192
BOM = "\ufeff"  # a UTF-8 byte-order mark, as decoded


CORPUS_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".gz")  # what a directory of corpora contributes


def corpus_files(paths: Sequence[Path | str]) -> list[Path]:
    """Corpora as given on a command line, checked: files; directories (every .txt, .text, .md,
    .jsonl and .gz file beneath, sorted); and glob patterns such as 'data/*.jsonl.gz' (sorted)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES
                           and not p.name.startswith("."))
            if not found:
                raise DataError(f"{path} is a directory with no {', '.join(CORPUS_SUFFIXES)} files")
            files += found
        elif not path.exists() and any(c in str(path) for c in "*?["):
            root = Path(path.anchor or ".")  # Path.glob takes patterns relative to a folder
            found = sorted(root.glob(str(path.relative_to(path.anchor)) if path.anchor else str(path)))
            if not found:
                raise DataError(f"no file matches {path}")
            files += [p for p in found if p.is_file()]
        else:
            files.append(path)
    return check_files(files)


def check_files(paths: Sequence[Path]) -> list[Path]:
    """Fail early, with one clear message, on anything that is not a readable non-empty text file."""
    if not paths:
        raise DataError("no corpus files given")
    checked = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path} does not exist")
        if path.is_dir():
            raise DataError(f"{path} is a directory; pass the files inside it (e.g. {path}/*.txt)")
        if path.stat().st_size == 0:
            raise DataError(f"{path} is empty")
        try:
            with _open_binary(path) as f:
                head = f.read(SNIFF_BYTES)
        except (OSError, EOFError) as err:
            raise DataError(f"cannot read {path}: {err}") from None
        if b"\x00" in head:
            raise DataError(f"{path} looks like a binary file (it contains NUL bytes); expected UTF-8 text")
        checked.append(path)
    return checked


def is_jsonl(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes]
    return ".jsonl" in suffixes[-2:]


def iter_documents(paths: Sequence[Path], text_field: str = "text") -> Iterator[Iterator[str]]:
    """Yield one line iterator per document: a whole text file, or one JSONL record.

    Consume each document before asking for the next.
    """
    for path in check_files(paths):
        if is_jsonl(path):
            yield from _jsonl_documents(path, text_field)
        else:
            yield _text_lines_of(path)


def iter_lines(stream: BinaryIO, name: str) -> Iterator[str]:
    """Lines of a binary stream, decoded strictly as UTF-8, keeping their newlines; NAME ("-" for
    stdin) is how errors refer to the stream.

    A byte-order mark opening the stream is left out: it is the encoding's signature that Windows
    editors and Excel write, not text (else a CSV's header becomes a row and a JSONL's first line
    no JSON, and a corpus teaches a stray U+FEFF). Everything after it is kept byte for byte."""
    name = "stdin" if name == "-" else name
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    pending, line_no, offset, opening = "", 1, 0, True
    while True:
        block = stream.read(BLOCK_BYTES)
        try:
            text = decoder.decode(block, final=not block)
        except UnicodeDecodeError as err:
            bad_line = line_no + block[:err.start].count(b"\n")
            raise DataError(f"{name} is not valid UTF-8 (byte {offset + err.start}, line {bad_line}); "
                            "convert it first, e.g. `iconv -f latin1 -t utf-8`") from None
        if opening and text:  # the decoder holds back a split character, so this is the stream's start
            text, opening = text.removeprefix(BOM), False
        offset += len(block)
        pending += text
        if "\n" in pending:
            *complete, pending = pending.split("\n")
            for line in complete:
                yield from _cut(line + "\n")
            line_no += len(complete)
        if len(pending) > MAX_LINE_CHARS:
            *full, pending = _cut(pending)
            yield from full
        if not block:
            break
    if pending:
        yield pending


def _cut(line: str) -> list[str]:
    """LINE in pieces of at most MAX_LINE_CHARS characters (only the last may keep the newline)."""
    return [line[i:i + MAX_LINE_CHARS] for i in range(0, len(line), MAX_LINE_CHARS)] or [line]


def split_lines(text: str) -> list[str]:
    """Lines keeping their "\\n". Unlike str.splitlines, only "\\n" ends a line (not \\r, \\f, U+2028)."""
    *complete, last = text.split("\n")
    return [line + "\n" for line in complete] + ([last] if last else [])


def read_text(path: Path) -> str:
    """A whole (checked) text file as one string, for evaluation files."""
    (path,) = check_files([path])
    return "".join(_text_lines_of(path))


def fingerprint(paths: Sequence[Path]) -> list[dict[str, object]]:
    """What identifies a corpus cheaply: resolved path, size and modification time of each file."""
    return [{"path": str(Path(p).resolve()), "size": Path(p).stat().st_size, "mtime_ns": Path(p).stat().st_mtime_ns}
            for p in paths]


def _text_lines_of(path: Path) -> Iterator[str]:
    with _open_binary(path) as f:
        yield from iter_lines(f, str(path))


def json_line(line: str, where: str) -> Any:
    """One JSONL line, parsed.

    Raises:
        DataError: starting with WHERE (a file and line), when it is not valid JSON.
    """
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg})") from None


def json_object(line: str, where: str) -> dict[str, Any]:
    """One JSONL line that must hold a JSON object (see json_line)."""
    record = json_line(line, where)
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object")
    return record


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Iterator[str]]:
    for line_no, line in enumerate(_text_lines_of(path), start=1):
        if not line.strip():
            continue
        record = json_line(line, f"{path}:{line_no}")
        if not isinstance(record, dict) or text_field not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{line_no}: no {text_field!r} field (found: {keys}); "
                            "choose the field with --text-field")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{line_no}: field {text_field!r} is not a string")
        yield iter(split_lines(text))


def _open_binary(path: Path) -> BinaryIO:
    try:
        if path.suffix.lower() == ".gz":
            return gzip.open(path, "rb")  # type: ignore[return-value]
        return open(path, "rb")
    except PermissionError:
        raise DataError(f"cannot read {path}: permission denied") from None
