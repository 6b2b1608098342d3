"""Finetuning datasets: labelled texts for classification, prompt/completion pairs for
instruction tuning, source/target pairs for the encoder-decoder -- read with clear errors,
tokenized, split and batched.

Task files are small enough to hold in memory (unlike pretraining corpora, which stream).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmkit import corpus, data
from lmkit.batches import IGNORE, Batch, ClassifyBatch, LMBatch
from lmkit.errors import DataError
from lmkit.tokenizer import Tokenizer


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str
    text_b: str | None = None  # the second text of a pair task (e.g. premise/hypothesis)


@dataclass(frozen=True)
class PromptCompletion:
    prompt: str
    completion: str


@dataclass(frozen=True)
class SourceTarget:
    source: str
    target: str


def read_labelled(path: Path) -> list[LabelledText]:
    """CSV/TSV (`text,label` or `text,text_b,label`, with or without that header) or JSONL
    ({"text", "label", optional "text_b"}).

    Raises:
        DataError: naming the file and line of the first bad row.
    """
    text = corpus.read_text(path)
    if corpus.is_jsonl(path):
        rows = [(n, _record(path, n, line, ("text", "label"), ("text_b",)))
                for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
        examples = [LabelledText(str(r["text"]), str(r["label"]), r.get("text_b")) for _, r in rows]
    else:
        examples = _read_table(path, text)
    if not examples:
        raise DataError(f"{path} has no examples")
    return examples


def read_prompt_completions(path: Path) -> list[PromptCompletion]:
    """JSONL of {"prompt": ..., "completion": ...}."""
    if not corpus.is_jsonl(path):
        raise DataError(f"{path}: instruction data must be JSONL with \"prompt\" and \"completion\" fields")
    text = corpus.read_text(path)
    examples = [PromptCompletion(**_record(path, n, line, ("prompt", "completion"), ()))
                for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not examples:
        raise DataError(f"{path} has no examples")
    return examples


def read_source_targets(path: Path) -> list[SourceTarget]:
    """TSV lines `source<TAB>target` (no header), or JSONL {"source": ..., "target": ...}."""
    text = corpus.read_text(path)
    if corpus.is_jsonl(path):
        pairs = [SourceTarget(**_record(path, n, line, ("source", "target"), ()))
                 for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    else:
        pairs = []
        for n, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            source, tab, target = line.rstrip("\r").partition("\t")
            if not tab or "\t" in target:
                raise DataError(f"{path}:{n}: expected source<TAB>target (one tab), or use JSONL "
                                "{\"source\": ..., \"target\": ...}")
            pairs.append(SourceTarget(source, target))
    if not pairs:
        raise DataError(f"{path} has no pairs")
    return pairs


def _record(path: Path, line_no: int, line: str, required: tuple[str, ...], optional: tuple[str, ...]) -> dict:
    record = corpus.json_object(line, f"{path}:{line_no}")
    missing = [key for key in required if key not in record]
    if missing:
        raise DataError(f"{path}:{line_no}: missing field {missing[0]!r} (found: {', '.join(record) or 'none'})")
    for key in required:
        if not isinstance(record[key], (str, int)) or (key != "label" and not isinstance(record[key], str)):
            raise DataError(f"{path}:{line_no}: field {key!r} must be a string")
    for key in optional:  # null is the same as leaving it out
        if record.get(key) is not None and not isinstance(record[key], str):
            raise DataError(f"{path}:{line_no}: field {key!r} must be a string or null, not {record[key]!r:.40}")
    return {key: record[key] for key in (*required, *optional) if record.get(key) is not None}


def _read_table(path: Path, text: str) -> list[LabelledText]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # a field as long as the file is fine
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    if "label" in header and "text" in header:
        columns = {name: header.index(name) for name in ("text", "text_b", "label") if name in header}
        rows, first_line = rows[1:], 2
    else:
        columns = {"text": 0, "label": 1} if len(header) == 2 else {"text": 0, "text_b": 1, "label": 2}
        first_line = 1
    width = max(columns.values()) + 1
    examples = []
    for n, row in enumerate(rows, start=first_line):
        if not row:
            continue
        if len(row) < width:
            raise DataError(f"{path}: row {n} has {len(row)} column(s); expected text,label or text,text_b,label")
        label = row[columns["label"]].strip()
        if not label:
            raise DataError(f"{path}: row {n} has an empty label")
        text_b = row[columns["text_b"]] if "text_b" in columns else None
        examples.append(LabelledText(row[columns["text"]], label, text_b))
    return examples


def stratified_split(examples: Sequence[LabelledText], fraction: float, seed: int
                     ) -> tuple[list[LabelledText], list[LabelledText]]:
    """(train, val): about FRACTION of each label's examples, chosen by a seeded shuffle, go to val."""
    generator = torch.Generator().manual_seed(seed)
    by_label: dict[str, list[LabelledText]] = {}
    for example in examples:
        by_label.setdefault(example.label, []).append(example)
    train, val = [], []
    for label in sorted(by_label):
        group = by_label[label]
        order = torch.randperm(len(group), generator=generator).tolist()
        n_val = math.floor(len(group) * fraction + 0.5) if len(group) > 1 else 0
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    if not val:
        raise DataError("too few examples to hold some back for validation; pass --val FILE")
    return train, val


def label_set(examples: Sequence[LabelledText]) -> list[str]:
    """The labels in a fixed order (sorted), saved in the checkpoint: index i is class i."""
    labels = sorted({e.label for e in examples})
    if len(labels) < 2:
        raise DataError(f"classification needs at least two labels; found {labels}")
    return labels


# --- tokenizing ---------------------------------------------------------------------------------

Encoded = tuple[list[int], list[int], int]  # ids, token types, label index


@dataclass(frozen=True)
class PairLayout:
    """The special tokens around a classifier's input `start a (mid b) end`, declared by each
    architecture: BERT's [CLS] a [SEP] b [SEP]; a decoder's a EOS b EOS, read at the last EOS."""

    start: list[int]
    mid: list[int]
    end: list[int]


def encode_labelled(examples: Sequence[LabelledText], tokenizer: Tokenizer, labels: list[str], layout: PairLayout,
                    max_len: int) -> list[Encoded]:
    """LAYOUT.start a (mid b) end; token types 0, then 1 from b on. Long texts are cut at the end
    (pairs: the longer text first) to fit MAX_LEN."""
    start, mid, end = layout.start, layout.mid, layout.end
    index = {label: i for i, label in enumerate(labels)}
    encoded = []
    for example in examples:
        if example.label not in index:
            raise DataError(f"label {example.label!r} does not occur in the training data ({', '.join(labels)})")
        a = tokenizer.encode(example.text)
        b = tokenizer.encode(example.text_b) if example.text_b is not None else None
        room = max_len - len(start) - len(end) - (len(mid) if b is not None else 0)
        a, b = _fit(a, b, room)
        ids = start + a + end if b is None else start + a + mid + b + end
        first = len(start) + len(a) + (len(mid) if b is not None else len(end))
        encoded.append((ids, [0] * first + [1] * (len(ids) - first), index[example.label]))
    return encoded


def _fit(a: list[int], b: list[int] | None, room: int) -> tuple[list[int], list[int] | None]:
    if b is None:
        return a[:room], None
    while len(a) + len(b) > room:
        if len(a) >= len(b):
            a = a[:-1]
        else:
            b = b[:-1]
    return a, b


def encode_prompt_completions(examples: Sequence[PromptCompletion], tokenizer: Tokenizer,
                              max_len: int) -> list[tuple[list[int], int]]:
    """prompt completion EOS, the prompt encoded as `generate` encodes it (after EOS, or as an
    imported model's tokenizer starts a text); returns (ids, prompt length).

    A prompt that does not fit loses its beginning; a completion its end. The leading EOS counts
    with the prompt: it is never a target.
    """
    encoded = []
    for example in examples:
        prompt = tokenizer.encode_document(example.prompt) or [tokenizer.eos_id]  # never empty: see collate
        completion = [*tokenizer.encode(example.completion), tokenizer.eos_id]
        completion = completion[: max_len - min(len(prompt), max_len // 2)]
        prompt = prompt[-(max_len - len(completion)):]
        encoded.append((prompt + completion, len(prompt)))
    return encoded


def encode_source_targets(pairs: Sequence[SourceTarget], tokenizer: Tokenizer,
                          max_len: int) -> list[tuple[list[int], list[int]]]:
    """(source ids, target ids) per pair, cut to fit: the encoder reads MAX_LEN tokens, the decoder
    EOS + target, so a target keeps MAX_LEN - 1."""
    return [(tokenizer.encode(p.source)[:max_len], tokenizer.encode(p.target)[:max_len - 1]) for p in pairs]


def collate_source_targets(pad_id: int, eos_id: int):  # noqa: ANN201
    """Rows -> the batches of data.seq2seq_batch."""
    def collate(rows: Sequence[tuple[list[int], list[int]]]) -> Batch:
        return data.seq2seq_batch(list(rows), pad_id, eos_id)
    return collate


# --- batching -----------------------------------------------------------------------------------

class EpochBatches:
    """Endless batches going through ROWS in a fresh seeded order each epoch. The position is
    two counters (epoch, index), saved in checkpoints, so a resumed run picks up mid-epoch."""

    def __init__(self, rows: Sequence, batch_size: int, seed: int, collate) -> None:  # noqa: ANN001
        if not rows:
            raise DataError("no training examples")
        self.rows, self.batch_size, self.seed, self.collate = rows, batch_size, seed, collate
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        return torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        picked = []
        while len(picked) < self.batch_size:
            if self.index == len(self.rows):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            take = self._order[self.index:self.index + self.batch_size - len(picked)]
            picked += take
            self.index += len(take)
        return self.collate([self.rows[i] for i in picked])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"position": torch.tensor([self.epoch, self.index])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.epoch, self.index = (int(v) for v in state["position"])
        self._order = self._permutation()


def fixed_batches(rows: Sequence, batch_size: int, collate) -> list[Batch]:  # noqa: ANN001
    """All ROWS in order, in batches: the whole validation set at every evaluation."""
    return [collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def collate_labelled(pad_id: int):  # noqa: ANN201
    """Rows -> a ClassifyBatch, padded on the right."""
    def collate(rows: Sequence[Encoded]) -> ClassifyBatch:
        length = max(len(ids) for ids, _, _ in rows)
        ids = torch.full((len(rows), length), pad_id)
        types = torch.zeros((len(rows), length), dtype=torch.int64)
        for i, (row_ids, row_types, _) in enumerate(rows):
            ids[i, :len(row_ids)] = torch.tensor(row_ids)
            types[i, :len(row_types)] = torch.tensor(row_types)
        lengths = torch.tensor([len(r[0]) for r in rows])
        pad = torch.arange(length)[None, :] < lengths[:, None]
        return ClassifyBatch(ids, types, pad, torch.tensor([label for _, _, label in rows]))
    return collate


def collate_prompt_completions(pad_id: int):  # noqa: ANN201
    """Rows (ids, prompt length) -> an LMBatch whose targets are IGNORE on the prompt and padding,
    so only completion tokens (and the final EOS) are learned."""
    learned = collate_learned(pad_id)

    def collate(rows: Sequence[tuple[list[int], int]]) -> LMBatch:
        return learned([(ids, [k >= n_prompt for k in range(len(ids))]) for ids, n_prompt in rows])
    return collate


def collate_learned(pad_id: int):  # noqa: ANN201
    """Rows (ids, learn: per token, whether it is a target) -> an LMBatch whose targets are the
    learned tokens only (a chat's assistant turns) and IGNORE elsewhere."""
    def collate(rows: Sequence[tuple[list[int], list[bool]]]) -> LMBatch:
        length = max(len(ids) for ids, _ in rows) - 1
        inputs = torch.full((len(rows), length), pad_id)
        targets = torch.full((len(rows), length), IGNORE)
        for i, (ids, learn) in enumerate(rows):
            row = torch.tensor(ids)
            inputs[i, :len(ids) - 1] = row[:-1]
            targets[i, :len(ids) - 1] = torch.where(torch.tensor(learn[1:]), row[1:], IGNORE)  # target j is token j + 1
        return LMBatch(inputs, targets)
    return collate
