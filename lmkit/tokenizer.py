"""Sentencepiece tokenizers: training with settings that round-trip any UTF-8 text exactly, and one
Tokenizer class that every command uses; HFTokenizer puts an imported Hugging Face tokenizer
(GPT-2's byte-level BPE, BERT's WordPiece) behind the same interface.

Every lmkit tokenizer reserves the special tokens all architectures need, at fixed ids:
<pad>=0 <unk>=1 <s>=2 </s>=3 <cls>=4 <sep>=5 <mask>=6, and (tokenizers trained since chat landed)
the chat markers <|system|>=7 <|user|>=8 <|assistant|>=9 <|end|>=10. They are control symbols, so
no user text ever encodes to them (encode_with_special_tokens reads a rendered chat template, where
their strings stand for them). "\\n" is always the single byte piece <0x0A>.
"""

from __future__ import annotations

import io
import itertools
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from lmkit.config import TokenizerConfig
from lmkit.corpus import split_lines
from lmkit.errors import CheckpointError, DataError
from lmkit.fileio import atomic_write_bytes, atomic_write_json, content_fingerprint

SPECIAL_PIECES = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "cls": "<cls>", "sep": "<sep>",
                  "mask": "<mask>"}
# sentencepiece skips training sentences longer than its max_sentence_length (bytes); lines are cut
# into pieces of at most this many characters (4 bytes each at worst) so none is lost.
_TRAIN_PIECE_CHARS = 4096
CHAT_PIECES = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # role markers and end-of-turn
# lmkit's own chat template (rendered by lmkit.chat as transformers renders templates): each message
# is its role marker, its text and <|end|>, after the end-of-text token that starts every document
# in lmkit's training data, as it starts a prompt.
BUILTIN_CHAT_TEMPLATE = (
    "{{ eos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
_META_MARK = "\u2581"  # sentencepiece's whitespace symbol; literal occurrences are encoded as bytes


def _threads() -> int:
    return max(1, os.cpu_count() or 1)


def train_tokenizer(documents: Iterable[Iterable[str]], out_path: Path, cfg: TokenizerConfig) -> Tokenizer:
    """Train a sentencepiece model on the lines of DOCUMENTS and write it atomically to OUT_PATH.

    Settings chosen for an exact round trip: identity normalisation, whitespace kept as is (no
    dummy prefix, repeated spaces allowed), byte fallback for characters outside the vocabulary.
    The vocabulary size is a soft limit, so a small corpus yields a smaller vocabulary instead of
    failing with "vocabulary size too high".

    Raises:
        DataError: the corpus has no text, or is too varied for the requested vocabulary size.
    """
    counter = {"lines": 0}

    def sentences() -> Iterator[str]:
        for document in documents:
            for line in document:
                body = line.rstrip("\n")
                if not body.strip():
                    continue
                counter["lines"] += 1
                for start in range(0, len(body), _TRAIN_PIECE_CHARS):
                    yield body[start:start + _TRAIN_PIECE_CHARS]

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            vocab_size=cfg.vocab_size,
            model_type=cfg.model_type,
            character_coverage=cfg.character_coverage,
            input_sentence_size=cfg.max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=4 * _TRAIN_PIECE_CHARS,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            byte_fallback=True,
            hard_vocab_limit=False,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            control_symbols=[*(SPECIAL_PIECES[name] for name in ("cls", "sep", "mask")), *CHAT_PIECES],
            num_threads=_threads(),
            minloglevel=2,
        )
    except RuntimeError as err:
        if counter["lines"] == 0:
            raise DataError("the corpus has no text to train a tokenizer on") from None
        too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(err))
        if too_small:
            raise DataError(f"vocab_size={cfg.vocab_size} is too small for this corpus: it needs at least "
                            f"{too_small.group(1)} (256 byte pieces, 11 special tokens and the corpus's common "
                            f"characters); use --vocab-size {too_small.group(1)} or more") from None
        raise DataError(f"sentencepiece could not train a {cfg.model_type} tokenizer with vocab_size="
                        f"{cfg.vocab_size}: {str(err).splitlines()[-1]}") from None
    if counter["lines"] == 0:
        raise DataError("the corpus has no text to train a tokenizer on")
    atomic_write_bytes(out_path, model.getvalue())
    tokenizer = Tokenizer(model.getvalue(), source=out_path)
    meta = {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
            "requested_vocab_size": cfg.vocab_size, "model_type": cfg.model_type, "lines": counter["lines"]}
    atomic_write_json(out_path.with_suffix(".json"), meta)
    return tokenizer


class Tokenizer:
    """A sentencepiece model with lmkit's conventions for newlines and special tokens."""

    file_name = "tokenizer.model"  # in a checkpoint folder

    def __init__(self, model_bytes: bytes, source: Path | None = None, *, chat_template: str | None = None) -> None:
        """CHAT_TEMPLATE: one given for this model (`finetune --chat-template`); default: lmkit's
        own where the tokenizer reserves the chat markers."""
        # An empty proto "loads" as a model with no pieces (and sentencepiece logs a screenful of
        # C++ errors on first use); anything else it cannot parse raises.
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_bytes) if model_bytes else None
        except RuntimeError:
            self.sp = None
        if self.sp is None or self.sp.get_piece_size() == 0:
            raise CheckpointError(f"{source or 'the tokenizer'} is not a sentencepiece model (empty or damaged)")
        self.model_bytes = model_bytes
        self.source = source
        self.fingerprint = content_fingerprint(model_bytes)
        self.vocab_size = self.sp.get_piece_size()
        ids = {name: self.sp.piece_to_id(piece) for name, piece in SPECIAL_PIECES.items()}
        if ids != {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "cls": 4, "sep": 5, "mask": 6}:
            raise CheckpointError(f"{source or 'tokenizer'} was not trained by lmkit (special tokens differ)")
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = 0, 1, 2, 3
        self.cls_id, self.sep_id, self.mask_id = 4, 5, 6
        chat_ids = [self.sp.piece_to_id(piece) for piece in CHAT_PIECES]
        self.has_chat_tokens = chat_ids == list(range(7, 7 + len(CHAT_PIECES)))
        self.n_special = len(SPECIAL_PIECES) + len(CHAT_PIECES) * self.has_chat_tokens  # ids below are special
        self.special_ids = list(range(self.n_special))
        self.custom_chat_template = chat_template
        self.chat_template = chat_template or (BUILTIN_CHAT_TEMPLATE if self.has_chat_tokens else None)
        self._special_pattern = re.compile("|".join(re.escape(self.sp.id_to_piece(i)) for i in self.special_ids))
        self.special: dict[str, int] = {}  # the fixed ids above; HFTokenizer records its own
        self.newline_id = self.sp.piece_to_id("<0x0A>")
        self._meta_mark_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in _META_MARK.encode()]
        self._space_byte_id = self.sp.piece_to_id("<0x20>")

    @classmethod
    def load(cls, path: Path, chat_template: str | None = None) -> Tokenizer:
        if not path.is_file():
            raise CheckpointError(f"no tokenizer at {path}")
        return cls(path.read_bytes(), source=path, chat_template=chat_template)

    def options(self) -> dict[str, object]:
        """What a checkpoint records, beside the file, to rebuild this tokenizer."""
        return {"chat_template": self.custom_chat_template} if self.custom_chat_template else {}

    def with_chat_template(self, template: str) -> Tokenizer:
        return Tokenizer(self.model_bytes, self.source, chat_template=template)

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """encode(), except that the strings of the special tokens ("</s>", "<|user|>") are those
        tokens, as transformers reads a rendered chat template."""
        ids, start = [], 0
        for match in self._special_pattern.finditer(text):
            ids += self.encode(text[start:match.start()]) + [self.sp.piece_to_id(match.group())]
            start = match.end()
        return ids + self.encode(text[start:])

    def is_special(self, token: int) -> bool:
        return 0 <= token < self.n_special

    def special_tokens(self) -> dict[str, str]:
        """Role ("bos", "eos", ...) -> the special token's string."""
        return dict(SPECIAL_PIECES)

    def encode(self, text: str) -> list[int]:
        """Token ids for any text; decode(encode(text)) == text."""
        return [i for ids in self.encode_lines(split_lines(text)) for i in ids]

    def encode_lines(self, lines: list[str], threads: int | None = None) -> list[list[int]]:
        """Encode a batch of lines on THREADS threads (default: one per core). A line may end with
        "\\n" and holds no other newline."""
        bodies = [line[:-1] if line.endswith("\n") else line for line in lines]
        encoded = self.sp.encode(bodies, num_threads=threads or _threads())
        for k, body in enumerate(bodies):
            if _META_MARK in body:
                encoded[k] = self._encode_with_meta_marks(body)
            elif self._meta_mark_ids[0] in encoded[k]:
                encoded[k] = self._spaces_as_bytes(encoded[k])
            if lines[k].endswith("\n"):
                encoded[k].append(self.newline_id)
        return encoded

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def encode_document(self, text: str) -> list[int]:
        """TEXT as the start of a document, as the model reads a prompt: after the end-of-text
        token that separates documents in lmkit's training data."""
        return [self.eos_id, *self.encode(text)]

    @property
    def stop_ids(self) -> list[int]:
        """The tokens that end a generated text."""
        return [self.eos_id]

    def pieces(self, ids: Iterable[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]

    def _encode_with_meta_marks(self, body: str) -> list[int]:
        # sentencepiece reads a literal U+2581 as a space; spell it as its three UTF-8 bytes instead.
        parts = [self._spaces_as_bytes(self.sp.encode(part)) for part in body.split(_META_MARK)]
        ids = parts[0]
        for part in parts[1:]:
            ids += self._meta_mark_ids + part
        return ids

    def _spaces_as_bytes(self, ids: list[int]) -> list[int]:
        """sentencepiece spells a space inside byte-fallback pieces as the bytes of U+2581 (word
        models do this for every unknown word), which would decode to a literal U+2581; any U+2581
        sentencepiece sees is a space (literal ones are split off first), so spell it as <0x20>."""
        mark, out, k = self._meta_mark_ids, [], 0
        while k < len(ids):
            if ids[k:k + 3] == mark:
                out.append(self._space_byte_id)
                k += 3
            else:
                out.append(ids[k])
                k += 1
        return out


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (tokenizer.json) behind Tokenizer's interface, for
    models imported from the Hub format: their own vocabulary and special tokens, no lmkit
    conventions added. encode never adds special tokens ([CLS], <|endoftext|>); callers do.

    SPECIAL maps lmkit's roles (pad, unk, bos, eos, cls, sep, mask) to ids; a model without one
    (GPT-2 has no padding, BERT no end-of-text) borrows the nearest: padding is eos (never scored),
    BERT's eos is [SEP].
    """

    file_name = "tokenizer.json"

    def __init__(self, json_bytes: bytes, special: dict[str, int], source: Path | None = None, *,
                 prompts: str = "eos", stop_ids: Sequence[int] = (), chat_template: str | None = None) -> None:
        """PROMPTS: "eos" (a document starts after an end-of-text token, as lmkit's own and GPT-2
        read prompts) or "tokenizer" (as transformers encodes them: the tokenizer's post-processor
        adds its BOS, or nothing). STOP_IDS: the tokens that end a generated text (config.json's
        eos_token_id, which may be a list; default: eos). CHAT_TEMPLATE: tokenizer_config.json's."""
        from tokenizers import Tokenizer as Backend

        try:
            self.backend = Backend.from_str(json_bytes.decode("utf-8"))
        except Exception as err:  # tokenizers raises plain Exception on a bad file
            raise CheckpointError(f"{source or 'tokenizer.json'} is not a readable tokenizer ({err})") from None
        self.model_bytes, self.source, self.special = json_bytes, source, dict(special)
        self.fingerprint = content_fingerprint(json_bytes)
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        roles = {"pad": "eos", "bos": "eos", "cls": "bos", "sep": "eos", "mask": "unk", "eos": "sep", "unk": "eos"}
        ids = dict(special)
        for _ in range(2):  # a role may borrow from a role that borrows
            for role, fallback in roles.items():
                if ids.get(role) is None and ids.get(fallback) is not None:
                    ids[role] = ids[fallback]
        if ids.get("eos") is None:
            raise CheckpointError(f"{source or 'tokenizer'}: no end-of-text or separator token among {special}")
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = ids["pad"], ids["unk"], ids["bos"], ids["eos"]
        self.cls_id, self.sep_id, self.mask_id = ids["cls"], ids["sep"], ids["mask"]
        self.special_ids = sorted(set(special.values()))
        self.n_special = 0  # the specials are not the lowest ids: see special_ids
        newline = self.backend.encode("\n", add_special_tokens=False).ids
        self.newline_id = newline[0] if len(newline) == 1 else -1
        if prompts not in ("eos", "tokenizer"):
            raise CheckpointError(f"unknown prompt convention {prompts!r}")
        self.prompts, self.chat_template = prompts, chat_template
        self.stop_ids = list(stop_ids) or [self.eos_id]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_lines(self, lines: list[str], threads: int | None = None) -> list[list[int]]:
        """Encode a batch of lines (each may end with "\\n"), in parallel inside `tokenizers`."""
        return [e.ids for e in self.backend.encode_batch(lines, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def encode_document(self, text: str) -> list[int]:
        """TEXT as the start of a document (a prompt): AutoTokenizer's ids for it, or, for GPT-2
        style models, its ids after the end-of-text token."""
        if self.prompts == "tokenizer":
            return self.backend.encode(text, add_special_tokens=True).ids
        return [self.eos_id, *self.encode(text)]

    def options(self) -> dict[str, object]:
        """What a checkpoint records, beside the file and the special ids, to rebuild this tokenizer."""
        return {"prompts": self.prompts, "stop_ids": self.stop_ids, "chat_template": self.chat_template}

    def with_chat_template(self, template: str) -> HFTokenizer:
        return HFTokenizer(self.model_bytes, self.special, self.source, **{**self.options(), "chat_template": template})

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """encode(): `tokenizers` matches the added tokens' strings in any text."""
        return self.encode(text)

    def is_special(self, token: int) -> bool:
        added = self.backend.get_added_tokens_decoder().get(token)
        return added is not None and added.special

    def special_tokens(self) -> dict[str, str]:
        """Role ("bos", "eos", ...) -> the special token's string, for the roles this model names."""
        return {role: self.backend.id_to_token(i) for role, i in self.special.items()}

    def pieces(self, ids: Iterable[int]) -> list[str]:
        return [self.backend.id_to_token(i) for i in ids]


AnyTokenizer = Tokenizer | HFTokenizer


def load_tokenizer(path: Path, special: dict[str, int] | None = None,
                   options: dict[str, Any] | None = None) -> AnyTokenizer:
    """The tokenizer in file PATH: tokenizer.json (Hugging Face, with its SPECIAL ids and the
    OPTIONS of HFTokenizer.options()) or a sentencepiece model."""
    if path.name == HFTokenizer.file_name:
        if not path.is_file():
            raise CheckpointError(f"no tokenizer at {path}")
        return HFTokenizer(path.read_bytes(), special or {}, source=path, **(options or {}))
    return Tokenizer.load(path, **(options or {}))


def encode_stream(tokenizer: Tokenizer, lines: Iterable[str], pieces: bool = False) -> Iterator[str]:
    """Lines of text -> lines of space-separated ids (or pieces). A line's newline ends the output
    line instead of being encoded, so `decode_stream` restores the text byte for byte."""
    lines = iter(lines)
    batches = iter(lambda: list(itertools.islice(lines, 1024)), [])  # sentencepiece encodes a batch in parallel
    open_line = False  # the output line holds the ids of a long line's first pieces (corpus.iter_lines cuts them)
    for batch in batches:
        for line, ids in zip(batch, tokenizer.encode_lines([line.removesuffix("\n") for line in batch])):
            words = " ".join(tokenizer.pieces(ids) if pieces else map(str, ids))
            ends = line.endswith("\n")
            yield (" " if open_line and words else "") + words + ("\n" if ends else "")
            open_line = not ends and (open_line or bool(words))


def _whole_lines(pieces: Iterable[str]) -> Iterator[str]:
    """Lines that corpus.iter_lines handed on in pieces, whole again."""
    parts: list[str] = []
    for piece in pieces:
        parts.append(piece)
        if piece.endswith("\n"):
            yield "".join(parts)
            parts = []
    if parts:
        yield "".join(parts)


def decode_stream(tokenizer: Tokenizer, lines: Iterable[str]) -> Iterator[str]:
    """Lines of space-separated ids -> lines of text.

    Raises:
        DataError: naming the line of a word that is not an id of this tokenizer.
    """
    for line_no, line in enumerate(_whole_lines(lines), start=1):
        try:
            ids = [int(word) for word in line.split()]
        except ValueError:
            raise DataError(f"line {line_no}: expected token ids separated by spaces, got {line[:40]!r}") from None
        bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise DataError(f"line {line_no}: id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})")
        yield tokenizer.decode(ids) + ("\n" if line.endswith("\n") else "")
