"""Sampling text from a causal language model: greedy, temperature, top-k and top-p, with a KV
cache so each new token costs one position of compute, not a pass over the whole text.

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
