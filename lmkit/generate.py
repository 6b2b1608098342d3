"""Sampling text from a causal language model: greedy, temperature, top-k and top-p, with a KV
cache so each new token costs one position of compute, not a pass over the whole text; and
filling in [MASK]s with a masked language model.

Only this module knows how tokens are picked; `lmkit generate`, evaluation samples and mid-run
samples all call it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lmkit.config import SampleConfig
from lmkit.device import autocast, uses_bf16
from lmkit.errors import DataError
from lmkit.tokenizer import Tokenizer


@dataclass
class Sample:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "eos" when the model ended the text itself


@dataclass
class Completion:
    prompt: str
    seed: int
    samples: list[Sample]

    def to_dict(self) -> dict[str, object]:
        return {"prompt": self.prompt, "seed": self.seed,
                "completions": [{"text": s.text, "tokens": len(s.tokens), "finish_reason": s.finish_reason}
                                for s in self.samples]}


def sample_next(logits: torch.Tensor, cfg: SampleConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token id for each row of LOGITS (B, V) -> (B,)."""
    if cfg.is_greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.size(-1):
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the best one always stays.
        drop_sorted = probs.cumsum(dim=-1) - probs > cfg.top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


class _TextStream:
    """Turns one sample's ids into text pieces as soon as they decode to whole characters."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.pending = tokenizer, []

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence of byte pieces: wait for the rest
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text, self.pending = self.tokenizer.decode(self.pending), []
        return text


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    cfg: SampleConfig,
    device: torch.device,
    on_text: Callable[[int, str], None] | None = None,
) -> Completion:
    """Continue PROMPT cfg.num_samples times (in one batch) until EOS or cfg.max_new_tokens.

    The prompt is preceded by EOS, the separator between documents in training data, so a prompt
    reads as the start of a text. When the context reaches the model's max_seq_len, the cache is
    rebuilt from the last half of it (learned positions cannot go further).

    Args:
        on_text: called with (sample index, new text) as soon as text can be decoded, for streaming.
    """
    seed = cfg.seed if cfg.seed is not None else secrets.randbits(63)
    generator = torch.Generator(device=device).manual_seed(seed)
    window = model.config.max_seq_len
    batch = cfg.num_samples
    cache_dtype = torch.bfloat16 if uses_bf16(device, "auto") else torch.float32
    context = torch.tensor([tokenizer.eos_id, *tokenizer.encode(prompt)], device=device)[-window:]
    context = context.expand(batch, -1)  # (B, T)
    samples = [Sample() for _ in range(batch)]
    streams = [_TextStream(tokenizer) for _ in range(batch)]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    with autocast(device):
        cache = model.new_cache(batch, device, cache_dtype)
        logits, _ = model(context, cache=cache)
        for _ in range(cfg.max_new_tokens):
            next_ids = sample_next(logits[:, -1], cfg, generator)  # (B,)
            next_ids = next_ids.masked_fill(finished, tokenizer.eos_id)
            for i, token in enumerate(next_ids.tolist()):
                if finished[i]:
                    continue
                if token == tokenizer.eos_id:
                    samples[i].finish_reason = "eos"
                    continue
                samples[i].tokens.append(token)
                piece = streams[i].push(token)
                samples[i].text += piece
                if piece and on_text:
                    on_text(i, piece)
            finished |= next_ids == tokenizer.eos_id
            if finished.all():
                break
            context = torch.cat([context, next_ids[:, None]], dim=1)
            if cache[0].length == window:
                context = context[:, -(window // 2):]
                cache = model.new_cache(batch, device, cache_dtype)
                logits, _ = model(context, cache=cache)
            else:
                logits, _ = model(next_ids[:, None], cache=cache)  # (B, 1) -> (B, 1, V)
    for i, stream in enumerate(streams):
        tail = stream.flush()
        samples[i].text += tail
        if tail and on_text:
            on_text(i, tail)
    return Completion(prompt, seed, samples)


MASK_TEXT = "[MASK]"


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


@torch.no_grad()
def fill_mask(model: nn.Module, tokenizer: Tokenizer, text: str, top_k: int, device: torch.device) -> FillMaskResult:
    """Predict each [MASK] in TEXT with a masked-LM (BERT), as one sentence: [CLS] text [SEP].

    Raises:
        DataError: TEXT has no [MASK], or is longer than the model's context.
    """
    parts = text.split(MASK_TEXT)
    if len(parts) == 1:
        raise DataError(f"no {MASK_TEXT} in {text[:60]!r}: a bert checkpoint fills in masks; write {MASK_TEXT} "
                        "where a word is missing")
    # The tokenizer joins a space to the word after it, so "the [MASK]" stands for "the" + " word":
    # the space before a mask goes into the masked token rather than being a token of its own.
    spaces = [part.endswith(" ") for part in parts[:-1]]
    ids = [tokenizer.cls_id]
    for part, space in zip(parts[:-1], spaces):
        ids += [*tokenizer.encode(part[:-1] if space else part), tokenizer.mask_id]
    ids += [*tokenizer.encode(parts[-1]), tokenizer.sep_id]
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
