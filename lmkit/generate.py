"""Producing text with a trained model: GPT continues a prompt, the encoder-decoder rewrites a
source text, BERT fills in [MASK]s.

GPT and the encoder-decoder are driven through steppers that keep a KV cache, so each new token
costs one position of compute, not a pass over the whole text; lmkit.search decides which tokens
(sampling, greedy or beam search). `lmkit generate`, `lmkit eval` and evaluation samples all call
this module.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmkit import search
from lmkit.chat import ChatFormat, Message
from lmkit.config import SampleConfig
from lmkit.device import autocast, autocast_dtype
from lmkit.errors import CheckpointError, DataError
from lmkit.models import ARCHS
from lmkit.quantize import model_for_decoding
from lmkit.tokenizer import Tokenizer

MASK_TEXT = "[MASK]"  # in an input text: the mask token, for BERT's fill-mask and the denoiser


@dataclass
class Sample:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "eos" when the model ended the text itself, "stop" at a stop string
    score: float | None = None  # beam search: log-probability / length ** length_penalty


@dataclass
class Completion:
    prompt: str  # the GPT prompt, or the encoder-decoder's source
    seed: int
    samples: list[Sample]

    def to_dict(self) -> dict[str, object]:
        return {"prompt": self.prompt, "seed": self.seed,
                "completions": [{"text": s.text, "tokens": len(s.tokens), "finish_reason": s.finish_reason,
                                 **({"score": s.score} if s.score is not None else {})} for s in self.samples]}


def decoding_of(ckpt: Any, fill_mask: bool = False) -> str:
    """What `lmkit generate` does with the checkpoint CKPT: "classify" (label each text), "fill-mask"
    (a masked-LM predicts each [MASK]), "rewrite" (an encoder-decoder maps each text to another) or
    "continue" (a decoder continues each prompt), as its task and architecture say.

    Raises:
        CheckpointError: FILL_MASK asked of a model that is no masked-LM.
    """
    if ckpt.labels:  # a classifier (lmkit.tasks.classify): its head is part of the checkpoint
        return "classify"
    arch = ARCHS[ckpt.config.model.arch]
    if fill_mask and arch.decoding != "fill-mask":
        masked = [a.name for a in ARCHS.values() if a.decoding == "fill-mask"]
        raise CheckpointError(f"{ckpt.path} is a {arch.name} checkpoint; 'lmkit generate --fill-mask' needs a "
                              f"masked-LM ({' or '.join(masked)}) one")
    return arch.decoding


def sample_config(arch: str, temperature: float | None = None, **options: Any) -> SampleConfig:
    """The sampling settings for a model of ARCH: OPTIONS (SampleConfig fields), and the
    architecture's own temperature when TEMPERATURE is None (an encoder-decoder decodes greedily)."""
    default = ARCHS[arch].default_temperature
    return SampleConfig(temperature=default if temperature is None else temperature, **options)


def generation_mode(ckpt: Any, *, fill_mask: bool = False, chat: bool = False, system: str | None = None,
                    chat_template: Path | None = None, draft: bool = False) -> str:
    """What `lmkit generate` does with the checkpoint CKPT and its flags: decoding_of's mode, or for a
    decoder "chat" (answer each prompt as a user's message, CHAT) or "speculate" (continue each
    prompt with a draft model's help, DRAFT).

    Raises:
        CheckpointError: as decoding_of.
        DataError: a flag that goes with neither the checkpoint nor the other flags.
    """
    mode = decoding_of(ckpt, fill_mask)
    if (chat or system or chat_template) and mode != "continue":
        raise DataError(f"--chat answers with a decoder (gpt or llama); {ckpt.path} is a "
                        f"{ckpt.config.model.arch} checkpoint for {mode}")
    if (system or chat_template) and not chat:
        raise DataError("--system and --chat-template go with --chat")
    if draft and (mode != "continue" or chat):
        raise DataError("--draft speeds up continuing a prompt with a decoder (not --chat, seq2seq or BERT)")
    return "chat" if chat else "speculate" if draft else mode


def require_decoder(ckpt: Any, what: str) -> None:
    """Refuse CKPT unless it continues text (a decoder language model); WHAT opens the message, e.g.
    "lmkit chat talks to a decoder".

    Raises:
        DataError: CKPT is another architecture, or a decoder finetuned for a task without text.
    """
    if decoding_of(ckpt) != "continue":
        raise DataError(f"{what} (gpt or llama); {ckpt.path} is a {ckpt.config.model.arch} checkpoint for task "
                        f"{ckpt.task!r}")


def load_for_generation(ckpt: Any, device: torch.device, quantize: str | None = None, *, compile_model: bool = False,
                        log: Callable[[str], None] = lambda _: None) -> tuple[nn.Module, Tokenizer]:
    """CKPT's model on DEVICE, ready to decode (int8 with QUANTIZE "int8" or an int8 checkpoint;
    compiled by torch.compile with dynamic shapes when COMPILE_MODEL), and its tokenizer.

    Raises:
        CheckpointError: damaged weights, or an unknown QUANTIZE.
    """
    model = model_for_decoding(ckpt, device, quantize)
    if compile_model:
        log("compiling the model (torch.compile): the first tokens wait for it")
        model = torch.compile(model, dynamic=True)
    return model, ckpt.tokenizer()


class CausalStepper:
    """Decoder rows (GPT, llama) continuing one prompt. When the context reaches max_seq_len the
    cache is rebuilt from the last half of it, so decoding goes on over the most recent window
    (learned positions cannot go further, and rotary ones were trained on no longer contexts)."""

    limit = None

    def __init__(self, model: nn.Module, prompt: list[int], rows: int, device: torch.device,
                 max_new_tokens: int | None = None) -> None:
        self.model, self.window, self.rows = model, model.config.max_seq_len, rows
        self.dtype = autocast_dtype(device, "auto") or torch.float32
        self.context = torch.tensor(prompt, device=device)[-self.window:].expand(rows, -1)  # (N, T)
        # The cache holds what this text can reach, not the whole context of a long-context model.
        reach = self.context.size(1) + (max_new_tokens if max_new_tokens is not None else self.window)
        self.cache_len = min(self.window, reach)
        self._restart()

    def _restart(self) -> None:
        self.cache = self.model.new_cache(self.rows, self.context.device, self.dtype, self.cache_len)
        self._logits = self.model(self.context, cache=self.cache)[0][:, -1]  # (N, V)

    def logits(self) -> torch.Tensor:
        return self._logits

    def advance(self, tokens: torch.Tensor, parents: torch.Tensor | None = None) -> None:
        if parents is not None:
            self.context = self.context[parents]
            for layer in self.cache:
                layer.reorder(parents)
        self.context = torch.cat([self.context, tokens[:, None]], dim=1)
        if self.cache[0].length == self.cache_len:
            self.context = self.context[:, -(self.window // 2):]
            self._restart()
        else:
            self._logits = self.model(tokens[:, None], cache=self.cache)[0][:, -1]  # (N, 1) -> (N, V)


class Seq2SeqStepper:
    """Encoder-decoder rows: each source encoded once, REPEAT decoder rows per source."""

    def __init__(self, model: nn.Module, src: torch.Tensor, src_pad: torch.Tensor, repeat: int, eos_id: int) -> None:
        dtype = autocast_dtype(src.device, "auto") or torch.float32
        self.model, self.limit = model, model.config.max_seq_len
        self.state = model.start_decoding(src, src_pad, repeat, dtype)
        start = torch.full((src.size(0) * repeat, 1), eos_id, device=src.device)  # EOS starts every target
        self._logits = model.decode(start, self.state)[:, -1]  # (N, V)

    def logits(self) -> torch.Tensor:
        return self._logits

    def advance(self, tokens: torch.Tensor, parents: torch.Tensor | None = None) -> None:
        if parents is not None:
            self.state.reorder(parents)
        self._logits = self.model.decode(tokens[:, None], self.state)[:, -1]


class _RowText:
    """One row's text, decoded as its tokens arrive without decoding the whole text again.

    Each step decodes a short window: the tokens of the last piece of final text and the new ones.
    The window starts one piece back because decoders treat a sequence's first token specially
    (sentencepiece and Metaspace drop its leading space), so both decodes compared start alike.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.text = ""  # the text of tokens[:read]; no later token changes it
        self.pending = ""  # the text of tokens[read:]: it may end in an incomplete UTF-8 sequence
        self.start = self.read = self.seen = 0  # window tokens[start:read]; tokens taken so far
        self.window = ""  # decode(tokens[start:read])

    def update(self, tokens: list[int]) -> str:
        """The text of TOKENS, which extend the tokens of the last call."""
        if len(tokens) == self.seen:
            return self.text + self.pending
        self.seen = len(tokens)
        decode = self.tokenizer.decode
        new = decode(tokens[self.start:])
        if not new.startswith(self.window):  # earlier text changed (a run of byte tokens decodes all or
            self.start = self.read = 0  # nothing in Llama 2's tokenizer): decode it all this once
            self.text = self.window = ""
            new = decode(tokens)
        if new.endswith("\ufffd"):  # wait for the rest of the character's bytes
            self.pending = new[len(self.window):]
            return self.text + self.pending
        self.text += new[len(self.window):]
        self.pending, self.start, self.read = "", self.read, len(tokens)
        self.window = decode(tokens[self.start:self.read])
        return self.text


class _Texts:
    """Decoded text of each row, with stop strings cut off; streams what can no longer change.

    While sampling, each row's text grows token by token (_RowText), and stop strings are looked
    for only where the new text could complete one, so a long stream costs linear time.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], on_text: Callable[[int, str], None] | None):
        self.tokenizer, self.stop, self.on_text = tokenizer, stop, on_text
        self.holdback = max((len(s) for s in stop), default=1) - 1  # might be the start of a stop string
        self.emitted: dict[int, int] = {}
        self.rows: dict[int, _RowText] = {}
        self.searched: dict[int, int] = {}  # where the next stop search in a row's text starts

    def final(self, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens)
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        return text[:cut] if cut >= 0 else text

    def stopped(self, row: int, tokens: list[int]) -> bool:
        """Whether a stop string appeared in the row's text (TOKENS extend those of the last call)."""
        return self._stop_at(row, self._text(row, tokens)) >= 0

    def stopped_anew(self, row: int, tokens: list[int]) -> bool:
        """stopped() for any TOKENS (a beam search's rows change): decodes them whole."""
        text = self.tokenizer.decode(tokens)
        return any(s in text for s in self.stop)

    def stream(self, row: int, tokens: list[int]) -> None:
        text = self._text(row, tokens).rstrip("\ufffd")  # an incomplete UTF-8 sequence waits for its bytes
        cut = self._stop_at(row, text)
        self._emit(row, text[:cut] if cut >= 0 else text[:len(text) - self.holdback])

    def finish(self, row: int, text: str) -> None:
        self._emit(row, text)

    def _text(self, row: int, tokens: list[int]) -> str:
        if row not in self.rows:
            self.rows[row] = _RowText(self.tokenizer)
        return self.rows[row].update(tokens)

    def _stop_at(self, row: int, text: str) -> int:
        """Where the first stop string in TEXT starts, or -1. An earlier call saw no stop string in
        the final text before self.searched[row], so only the text from one stop's length before it
        is searched."""
        start = max(0, self.searched.get(row, 0) - self.holdback)
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if not found:
            self.searched[row] = len(self.rows[row].text)
        return min(found, default=-1)

    def _emit(self, row: int, text: str) -> None:
        done = self.emitted.get(row, 0)
        if self.on_text and len(text) > done:
            self.on_text(row, text[done:])
            self.emitted[row] = len(text)


def _search(stepper: search.Stepper, n_inputs: int, cfg: SampleConfig, stop_ids: list[int],
            generator: torch.Generator, texts: _Texts, prefixes: list[list[int]] | None) -> list[list[Sample]]:
    """Run the search cfg asks for, ending a text at any of STOP_IDS; the samples of each input."""
    if cfg.beam > 1:
        stopped = texts.stopped_anew if cfg.stop else None
        found = search.beam_search(stepper, n_inputs, cfg, stop_ids, prefixes=prefixes, stopped=stopped)
        return [[Sample(texts.final(h.tokens), h.tokens, h.finish_reason, h.score) for h in hyps] for hyps in found]
    stopped = texts.stopped if cfg.stop else None
    rows = search.sample(stepper, n_inputs * cfg.num_samples, cfg, stop_ids, prefixes=prefixes,
                         generator=generator, stopped=stopped, on_token=texts.stream if texts.on_text else None)
    samples = [Sample(texts.final(h.tokens), h.tokens, h.finish_reason) for h in rows]
    for row, s in enumerate(samples):
        texts.finish(row, s.text)
    return [samples[i:i + cfg.num_samples] for i in range(0, len(samples), cfg.num_samples)]


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    cfg: SampleConfig,
    device: torch.device,
    on_text: Callable[[int, str], None] | None = None,
) -> Completion:
    """Continue PROMPT with a GPT cfg.num_samples times (in one batch), or return the best
    cfg.num_samples of a beam search, until EOS, a stop string or cfg.max_new_tokens.

    The prompt is encoded as the start of a document (tokenizer.encode_document): after EOS, the
    separator between documents in lmkit's training data, or as transformers encodes it for an
    imported Llama-family model (with its BOS, if it has one). Generation stops at any of the
    tokenizer's stop ids.

    Args:
        on_text: called with (sample index, new text) as soon as text is final, for streaming
            (sampling only; a beam search knows its result at the end).
    """
    return _continue(model, tokenizer, prompt, tokenizer.encode_document(prompt), tokenizer.stop_ids, cfg, device,
                     on_text)


@torch.no_grad()
def reply(model: nn.Module, form: ChatFormat, messages: Sequence[Message], cfg: SampleConfig, device: torch.device,
          on_text: Callable[[int, str], None] | None = None) -> Completion:
    """The assistant's next message after MESSAGES (rendered by FORM's chat template, with its
    generation prompt), ending at the template's end-of-turn token or the tokenizer's stop ids.
    The completion's prompt is the last message's text. ON_TEXT as for generate."""
    return _continue(model, form.tokenizer, messages[-1]["content"], form.prompt(messages), form.stop_ids, cfg,
                     device, on_text)


def _continue(model: nn.Module, tokenizer: Tokenizer, prompt: str, prompt_ids: list[int], stop_ids: list[int],
              cfg: SampleConfig, device: torch.device, on_text: Callable[[int, str], None] | None) -> Completion:
    seed = cfg.seed if cfg.seed is not None else secrets.randbits(63)
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = cfg.beam if cfg.beam > 1 else cfg.num_samples
    with autocast(device):
        stepper = CausalStepper(model, prompt_ids, rows, device, cfg.max_new_tokens)
        samples = _search(stepper, 1, cfg, stop_ids, generator, _Texts(tokenizer, cfg.stop, on_text),
                          [prompt_ids] * rows)
    return Completion(prompt, seed, samples[0])


@torch.no_grad()
def translate(model: nn.Module, tokenizer: Tokenizer, sources: Sequence[str], cfg: SampleConfig,
              device: torch.device, on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Rewrite each of SOURCES with an encoder-decoder, all in one batch: cfg.num_samples samples,
    or the best of a beam search. A source longer than the model's context is cut to fit. Each
    [MASK] in a source is the mask token, which a denoising (pretrained) model fills in.

    Args:
        on_text: as for generate(), with the row index (source i, sample j: i * num_samples + j).
    """
    seed = cfg.seed if cfg.seed is not None else secrets.randbits(63)
    generator = torch.Generator(device=device).manual_seed(seed)
    encoded = [encode_masked(tokenizer, text)[0][:model.config.max_seq_len] for text in sources]
    length = max(1, *map(len, encoded))
    src = torch.full((len(encoded), length), tokenizer.pad_id)
    for i, ids in enumerate(encoded):
        src[i, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
    src_pad = torch.arange(length)[None, :] < torch.tensor([max(1, len(ids)) for ids in encoded])[:, None]
    repeat = cfg.beam if cfg.beam > 1 else cfg.num_samples
    with autocast(device):
        stepper = Seq2SeqStepper(model, src.to(device), src_pad.to(device), repeat, tokenizer.eos_id)
        samples = _search(stepper, len(encoded), cfg, tokenizer.stop_ids, generator,
                          _Texts(tokenizer, cfg.stop, on_text), None)
    return [Completion(text, seed, found) for text, found in zip(sources, samples)]


@dataclass
class FilledMask:
    """The TOP_K likeliest tokens for one [MASK]: (decoded text, id, probability), best first."""

    position: int  # token position in the model input
    candidates: list[tuple[str, int, float]]
    space_before: bool = False  # the text had a space before [MASK], given to the masked word


@dataclass
class FillMaskResult:
    text: str
    masks: list[FilledMask]

    @property
    def filled(self) -> str:
        """TEXT with each [MASK] replaced by its likeliest token."""
        parts = self.text.split(MASK_TEXT)
        out = parts[0]
        for mask, part in zip(self.masks, parts[1:]):
            best = mask.candidates[0][0]
            out = (out[:-1] if mask.space_before and best.startswith(" ") else out) + best + part
        return out

    def to_dict(self) -> dict[str, object]:
        return {"text": self.text, "filled": self.filled,
                "masks": [{"position": m.position,
                           "candidates": [{"text": text, "id": i, "prob": p} for text, i, p in m.candidates]}
                          for m in self.masks]}


def encode_masked(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[bool]]:
    """TEXT's ids with each [MASK] as the mask token; and, per mask, whether a space preceded it.

    The tokenizer joins a space to the word after it, so "the [MASK]" stands for "the" + " word":
    the space before a mask goes into the masked token rather than being a token of its own.
    """
    parts = text.split(MASK_TEXT)
    spaces = [part.endswith(" ") for part in parts[:-1]]
    ids: list[int] = []
    for part, space in zip(parts[:-1], spaces):
        ids += [*tokenizer.encode(part[:-1] if space else part), tokenizer.mask_id]
    return ids + tokenizer.encode(parts[-1]), spaces


@torch.no_grad()
def fill_mask(model: nn.Module, tokenizer: Tokenizer, text: str, top_k: int, device: torch.device) -> FillMaskResult:
    """Predict each [MASK] in TEXT with a masked-LM (BERT), as one sentence: [CLS] text [SEP].

    Raises:
        DataError: TEXT has no [MASK], or is longer than the model's context.
    """
    if MASK_TEXT not in text:
        raise DataError(f"no {MASK_TEXT} in {text[:60]!r}: a bert checkpoint fills in masks; write {MASK_TEXT} "
                        "where a word is missing")
    masked, spaces = encode_masked(tokenizer, text)
    ids = [tokenizer.cls_id, *masked, tokenizer.sep_id]
    if len(ids) > model.config.max_seq_len:
        raise DataError(f"{text[:60]!r} is {len(ids)} tokens; the model reads at most {model.config.max_seq_len}")
    idx = torch.tensor([ids], device=device)  # (1, T)
    positions = [t for t, i in enumerate(ids) if i == tokenizer.mask_id]
    with autocast(device):
        hidden = model.hidden_states(idx)[0, positions]  # (M, C)
        probs = model.mlm_logits(hidden).float().softmax(dim=-1)  # (M, V)
    best = probs.topk(min(top_k, probs.size(-1)), dim=-1)
    masks = [FilledMask(pos, [(tokenizer.decode([i]), i, p) for i, p in zip(ids_.tolist(), ps.tolist())], space)
             for pos, ids_, ps, space in zip(positions, best.indices, best.values, spaces)]
    return FillMaskResult(text, masks)
