"""Corpora -> train/val token files: raw little-endian ids, memory-mapped for training, each with a
JSON sidecar (tokenizer fingerprint, token count, dtype, source fingerprints).

Encoding streams: memory holds a few batches of lines, never the corpus; with several workers,
batches are encoded in worker processes and written in their original order. The split is made of
blocks of whole lines: evenly spaced blocks (a val_fraction share) go to val, the rest to train,
so validation text comes from all over the corpus, not only its end.
"""

from __future__ import annotations

import collections
import json
import math
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmkit import corpus
from lmkit.config import DataConfig, check_range
from lmkit.errors import DataError
from lmkit.fileio import atomic_file, atomic_write_json
from lmkit.project import Project, exclusive
from lmkit.tokenizer import AnyTokenizer, HFTokenizer, Tokenizer

SPLITS = ("train", "val")
MAX_WORKERS = 256  # encoding processes; each holds a tokenizer and a few batches
_BATCH_LINES = 4096
_SCAN_TOKENS = 1 << 24  # ids checked at a time against the vocabulary (32-64 MiB of a memory map)


@dataclass(frozen=True)
class TokenFile:
    """One prepared split: PATH holds TOKENS ids of DTYPE; META is its sidecar JSON."""

    path: Path
    meta: dict[str, Any]

    @property
    def tokens(self) -> int:
        return int(self.meta["tokens"])

    @property
    def tokenizer_fingerprint(self) -> str:
        return str(self.meta["tokenizer"])

    @property
    def bytes_per_token(self) -> float | None:
        """UTF-8 bytes of the text per token, if recorded: what turns nats per token into bits per byte."""
        return self.meta["bytes"] / self.tokens if self.meta.get("bytes") and self.tokens else None

    def array(self, vocab_size: int | None = None) -> np.ndarray:
        """The ids as a read-only memory map (an empty array for an empty split).

        Raises:
            DataError: with VOCAB_SIZE, the file holds an id the tokenizer does not have (the file
                was damaged after it was written: a disk error, a copy from another project).
        """
        if self.tokens == 0:
            return np.zeros(0, dtype=self.meta["dtype"])
        ids = np.memmap(self.path, dtype=self.meta["dtype"], mode="r", shape=(self.tokens,))
        if vocab_size is not None:
            for start in range(0, len(ids), _SCAN_TOKENS):  # in pieces: max() of a memory map holds no copy
                piece = ids[start:start + _SCAN_TOKENS]
                if int(piece.max()) >= vocab_size:
                    at = start + int(np.argmax(piece >= vocab_size))
                    raise DataError(f"{self.path} is damaged: token {at:,} is id {int(ids[at])}, but the tokenizer "
                                    f"has {vocab_size:,} ids; rebuild it with 'lmkit tokenize prepare --force'")
        return ids

    @classmethod
    def open(cls, path: Path) -> TokenFile | None:
        """The split at PATH if its sidecar exists and agrees with the file size, else None."""
        try:
            meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
            size = path.stat().st_size
            if size != int(meta["tokens"]) * np.dtype(meta["dtype"]).itemsize:
                return None  # interrupted between writing the ids and the sidecar
        except (OSError, ValueError, KeyError, TypeError):  # missing, or a sidecar of the wrong shape
            return None
        return cls(path, meta)


class _BlockRouter:
    """Gathers ids into blocks of whole lines and writes each full block to train or val.

    Block k goes to val when floor((k+1)f + 1/2) > floor(kf + 1/2): an exact share f, evenly
    spaced, the first one early. The last block is held back until the end, so that a corpus
    too small for the schedule still gives val one block.
    """

    def __init__(self, outs: dict[str, Any], dtype: np.dtype, block_bytes: int, val_fraction: float) -> None:
        self.outs, self.dtype, self.block_bytes, self.val_fraction = outs, dtype, block_bytes, val_fraction
        self.tokens = {split: 0 for split in SPLITS}
        self.text_bytes = {split: 0 for split in SPLITS}
        self.read_bytes = 0
        self.block: list[int] = []
        self.block_size = 0
        self.blocks_done = 0
        self.held: tuple[list[int], int, str] | None = None

    def add(self, ids: list[int], size: int) -> None:
        self.block.extend(ids)
        self.block_size += size
        self.read_bytes += size
        if self.block_size >= self.block_bytes:
            self._finish_block()

    def close(self) -> None:
        if self.block:
            self._finish_block()
        if self.held is not None:
            ids, size, split = self.held
            self._write(ids, size, "val" if self.tokens["val"] == 0 else split)

    def _finish_block(self) -> None:
        k, f = self.blocks_done, self.val_fraction
        split = "val" if math.floor((k + 1) * f + 0.5) > math.floor(k * f + 0.5) else "train"
        if self.held is not None:
            self._write(*self.held)
        self.held = (self.block, self.block_size, split)
        self.block, self.block_size = [], 0
        self.blocks_done += 1

    def _write(self, ids: list[int], size: int, split: str) -> None:
        self.outs[split].write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.tokens[split] += len(ids)
        self.text_bytes[split] += size


@dataclass(frozen=True)
class PreparedData:
    train: TokenFile
    val: TokenFile
    reused: bool  # True when the files were already up to date


LineBatch = tuple[list[str], list[bool]]  # lines, and whether each is the last of its document


def _line_batches(corpora: Sequence[Path], text_field: str) -> Iterator[LineBatch]:
    """The corpora's lines in batches of _BATCH_LINES, streamed."""
    batch: list[str] = []
    ends: list[bool] = []  # ends[k]: line k is the last of its document (an EOS follows it)
    for document in corpus.iter_documents(corpora, text_field):
        has_lines = False
        for line in document:
            if len(batch) >= _BATCH_LINES:
                yield batch, ends
                batch, ends = [], []
            batch.append(line)
            ends.append(False)
            has_lines = True
        if has_lines:
            ends[-1] = True  # the document's last line is always still in the batch
    if batch:
        yield batch, ends


_worker_tokenizer: AnyTokenizer | None = None


def _start_worker(model_bytes: bytes, special: dict[str, int] | None) -> None:
    """Load the tokenizer once per worker: sentencepiece, or a Hugging Face one with SPECIAL ids."""
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_bytes) if special is None else HFTokenizer(model_bytes, special)


def _encode_in_worker(lines: list[str]) -> list[list[int]]:
    assert _worker_tokenizer is not None
    return _worker_tokenizer.encode_lines(lines, threads=1)


class _Encoder:
    """Encodes line batches in order: here, or in WORKERS processes that each load the tokenizer
    once. At most 2 * WORKERS batches are in flight, so memory stays bounded on any corpus."""

    def __init__(self, tokenizer: AnyTokenizer, workers: int) -> None:
        self.tokenizer, self.workers = tokenizer, workers
        special = tokenizer.special if isinstance(tokenizer, HFTokenizer) else None
        self.pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start_worker, initargs=(tokenizer.model_bytes, special))
                     if workers > 1 else None)

    def __enter__(self) -> _Encoder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool:
            self.pool.shutdown(cancel_futures=True)

    def map(self, batches: Iterator[LineBatch]) -> Iterator[tuple[LineBatch, list[list[int]]]]:
        if self.pool is None:
            for batch in batches:
                yield batch, self.tokenizer.encode_lines(batch[0])
            return
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append((batch, self.pool.submit(_encode_in_worker, batch[0])))
            if len(pending) >= 2 * self.workers:
                batch, future = pending.popleft()
                yield batch, future.result()
        while pending:
            batch, future = pending.popleft()
            yield batch, future.result()


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def load_prepared(project: Project, tokenizer: Tokenizer, dataset: str = "") -> PreparedData | None:
    """The project's prepared splits (of DATASET) if both exist and were made with TOKENIZER."""
    files = [TokenFile.open(project.tokens_file(split, dataset)) for split in SPLITS]
    if any(f is None or f.tokenizer_fingerprint != tokenizer.fingerprint for f in files):
        return None
    return PreparedData(files[0], files[1], reused=True)  # type: ignore[arg-type]


@exclusive  # a run in the project reads these files: no other process replaces them under it
def prepare(
    project: Project,
    corpora: Sequence[Path],
    tokenizer: Tokenizer,
    cfg: DataConfig,
    *,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    dataset: str = "",
    workers: int = 1,
) -> PreparedData:
    """Tokenize CORPORA into the project's train/val files, unless they are already up to date.

    Args:
        progress: called with (bytes read, total bytes) as encoding advances.
        workers: encoding processes; 1 encodes here (sentencepiece spreads each batch over threads).
        dataset: "" for the pretraining data; another name keeps its files apart (data/NAME/).

    Raises:
        DataError: unreadable input, or a corpus too small to give both splits any tokens.
        ConfigError: WORKERS out of range.
    """
    check_range("workers", workers, 1, MAX_WORKERS)
    corpora = corpus.corpus_files(corpora)
    recipe = {"tokenizer": tokenizer.fingerprint, "sources": corpus.fingerprint(corpora),
              "val_fraction": cfg.val_fraction, "text_field": cfg.text_field}
    existing = load_prepared(project, tokenizer, dataset)
    if existing and not force and all(existing.train.meta.get(k) == v for k, v in recipe.items()):
        return existing

    total_bytes = sum(p.stat().st_size for p in corpora)
    # Aim for ~20 val blocks whatever the corpus size, between 1 KiB and 1 MiB each.
    block_bytes = int(min(max(total_bytes * cfg.val_fraction / 20, 1024), 1 << 20))
    dtype = np.dtype(token_dtype(tokenizer.vocab_size))
    files = {split: project.tokens_file(split, dataset) for split in SPLITS}
    with atomic_file(files["train"]) as train_out, atomic_file(files["val"]) as val_out, \
            _Encoder(tokenizer, workers) as encoder:
        router = _BlockRouter({"train": train_out, "val": val_out}, dtype, block_bytes, cfg.val_fraction)
        for (lines, ends), encoded in encoder.map(_line_batches(corpora, cfg.text_field)):
            for line, ids, doc_end in zip(lines, encoded, ends):
                router.add(ids + [tokenizer.eos_id] if doc_end else ids, len(line.encode("utf-8")))
            if progress:
                progress(router.read_bytes, total_bytes)
        router.close()
        if router.tokens["train"] < 2 or router.tokens["val"] < 2:  # raising here discards both files
            raise DataError(f"the corpus is too small to split into train and val "
                            f"({sum(router.tokens.values())} tokens); add more text")
        for split in SPLITS:  # stale sidecars must not describe the new files
            files[split].with_suffix(".json").unlink(missing_ok=True)
    for split in SPLITS:
        meta = {**recipe, "split": split, "tokens": router.tokens[split], "dtype": dtype.name,
                "bytes": router.text_bytes[split]}
        atomic_write_json(files[split].with_suffix(".json"), meta)
    prepared = load_prepared(project, tokenizer, dataset)
    assert prepared is not None
    return PreparedData(prepared.train, prepared.val, reused=False)
