"""Speculative decoding: a small draft model that shares the target's tokenizer (the student of
`lmkit distill` is one) proposes K tokens; the target scores all of them in one forward over its
KV cache and keeps the longest prefix it agrees with, plus one token of its own; both caches are
rolled back past the first rejection. Greedy, "agrees" means the target would have picked the same
token, so the output is the target's own, token for token. Sampling, draft token x (drawn from the
draft's distribution q) is kept with probability min(1, p(x) / q(x)), and the first rejected one is
replaced by a draw from max(0, p - q), renormalised (Leviathan et al. 2023; Chen et al. 2023): the
tokens are distributed exactly as the target's own samples.

A round is one target forward for up to K + 1 tokens, instead of one per token: the gain is the
acceptance rate times K, less the draft's cost. Rounds run while the target's whole context fits its
window; past it, decoding goes on without the draft, sliding the window as lmkit.generate does.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lmkit.config import ConfigError, SampleConfig
from lmkit.device import autocast, autocast_dtype
from lmkit.search import _penalties, extend, next_token_probs, sample_next
from lmkit.tokenizer import Tokenizer

if TYPE_CHECKING:
    from lmkit.generate import Completion


@dataclass
class Speculation:
    """How the draft fared: tokens proposed and accepted, target forwards (rounds)."""

    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    plain_steps: int = 0  # tokens decoded without the draft (past the window)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {"draft_proposed": self.proposed, "draft_accepted": self.accepted,
                "acceptance_rate": round(self.acceptance_rate, 4), "target_rounds": self.rounds,
                "plain_steps": self.plain_steps}


def check_options(cfg: SampleConfig) -> None:
    """Raises ConfigError for settings speculative decoding does not take."""
    if cfg.beam > 1 or cfg.num_samples > 1:
        raise ConfigError("--draft decodes one sequence: leave out --beam and --num-return-sequences")
    if _penalties(cfg):
        raise ConfigError("--draft does not take --repetition-penalty or --no-repeat-ngram-size")


class _Cached:
    """One model's KV cache over the committed tokens; the tokens not yet in it are fed with the next call."""

    def __init__(self, model: nn.Module, tokens: list[int], device: torch.device, dtype: torch.dtype,
                 reach: int) -> None:
        """REACH: the most positions the cache will hold (not the whole context of a long-context model)."""
        self.model, self.device = model, device
        self.cache = model.new_cache(1, device, dtype, min(model.config.max_seq_len, reach))
        if len(tokens) > 1:
            model(torch.tensor([tokens[:-1]], device=device), cache=self.cache)
        self.pending = tokens[-1:]

    @property
    def length(self) -> int:
        return self.cache[0].length

    def feed(self, extra: list[int]) -> torch.Tensor:
        """Logits (T, V) after each of the pending tokens and EXTRA, which join the cache."""
        ids = self.pending + extra
        self.pending = []
        return self.model(torch.tensor([ids], device=self.device), cache=self.cache)[0][0]

    def keep(self, length: int, pending: list[int]) -> None:
        """Forget cached positions from LENGTH on; PENDING are fed next."""
        for layer in self.cache:
            layer.length = length
        self.pending = pending


@torch.no_grad()
def speculate(target: nn.Module, draft: nn.Module, prompt_ids: list[int], cfg: SampleConfig, device: torch.device,
              emit: Callable[[int], bool], *, draft_tokens: int = 4,
              generator: torch.Generator | None = None) -> Speculation:
    """Continue PROMPT_IDS with TARGET, DRAFT proposing DRAFT_TOKENS tokens a round. Each new token
    goes to EMIT(token), which returns True to stop (an end-of-text token, a stop string, the
    length limit)."""
    check_options(cfg)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ConfigError(f"the draft scores {draft.config.vocab_size} tokens, the model {target.config.vocab_size}: "
                          "they must share the vocabulary")
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    k, greedy = draft_tokens, cfg.is_greedy
    window = target.config.max_seq_len
    stats = Speculation()
    sequence = list(prompt_ids[-window:])
    dtype = autocast_dtype(device, "auto") or torch.float32
    with autocast(device):
        # Full context only: every token the target scores must fit the window with K more behind it.
        if len(sequence) + k + 1 < min(window, draft.config.max_seq_len):
            reach = len(sequence) + cfg.max_new_tokens + k + 1
            tgt, dft = _Cached(target, sequence, device, dtype, reach), _Cached(draft, sequence, device, dtype, reach)
            while len(sequence) + k + 1 < min(window, draft.config.max_seq_len):
                stats.rounds += 1
                logits = dft.feed([])[-1]
                proposed, draft_probs = [], []
                for i in range(k):
                    q = None if greedy else next_token_probs(logits[None], cfg)[0]  # (V,)
                    token = int(logits.argmax() if greedy else torch.multinomial(q, 1, generator=generator))
                    proposed.append(token)
                    draft_probs.append(q)
                    if i < k - 1:
                        logits = dft.feed([token])[-1]
                scores = tgt.feed(proposed)[-(k + 1):]  # (K + 1, V): after the last committed token and each proposal
                accepted, token = _judge(scores, proposed, draft_probs, cfg, generator)
                stats.proposed, stats.accepted = stats.proposed + k, stats.accepted + accepted
                # Both caches hold the committed tokens; the target keeps the proposals it agreed with, the
                # draft those of them it has seen (all but the last proposal); the rest is fed next round.
                base = len(sequence)
                tgt.keep(base + accepted, [token])
                dft.keep(base + min(accepted, k - 1), proposed[k - 1:] * (accepted == k) + [token])
                for new in [*proposed[:accepted], token]:
                    sequence.append(new)
                    if emit(new):
                        return stats
        _plain(target, sequence, cfg, device, emit, generator, stats)
    return stats


def _judge(scores: torch.Tensor, proposed: list[int], draft_probs: list[torch.Tensor | None], cfg: SampleConfig,
           generator: torch.Generator) -> tuple[int, int]:
    """(how many proposals the target keeps, the token it adds): its own pick after the last kept one."""
    if cfg.is_greedy:
        picks = scores.argmax(dim=-1).tolist()  # (K + 1,)
        accepted = next((i for i, (a, b) in enumerate(zip(proposed, picks)) if a != b), len(proposed))
        return accepted, picks[accepted]
    probs = next_token_probs(scores, cfg)  # (K + 1, V)
    for i, (token, q) in enumerate(zip(proposed, draft_probs)):
        p = probs[i]
        if torch.rand((), generator=generator, device=p.device) * q[token] >= p[token]:  # rejected
            residual = (p - q).clamp(min=0)
            residual = residual / residual.sum() if residual.sum() > 0 else p
            return i, int(torch.multinomial(residual, 1, generator=generator))
    return len(proposed), int(torch.multinomial(probs[-1], 1, generator=generator))


def _plain(model: nn.Module, sequence: list[int], cfg: SampleConfig, device: torch.device,
           emit: Callable[[int], bool], generator: torch.Generator, stats: Speculation) -> None:
    """Go on without the draft, exactly as lmkit.generate decodes one row (its window slides)."""
    from lmkit.generate import CausalStepper

    stepper = CausalStepper(model, sequence, 1, device, cfg.max_new_tokens)
    while True:
        token = int(sample_next(stepper.logits(), cfg, generator)[0])
        stats.plain_steps += 1
        if emit(token):
            return
        stepper.advance(torch.tensor([token], device=device))


def generate_with_draft(target: nn.Module, draft: nn.Module, tokenizer: Tokenizer, prompt: str, cfg: SampleConfig,
                        device: torch.device, *, draft_tokens: int = 4,
                        on_text: Callable[[int, str], None] | None = None) -> tuple[Completion, Speculation]:
    """lmkit.generate.generate for one sample, with DRAFT proposing tokens; and how it fared."""
    from lmkit.generate import Completion, Sample, _Texts

    seed = cfg.seed if cfg.seed is not None else secrets.randbits(63)
    generator = torch.Generator(device=device).manual_seed(seed)
    texts, sample = _Texts(tokenizer, cfg.stop, on_text), Sample()
    stop_ids = set(tokenizer.stop_ids)
    on_token, stopped = texts.stream if on_text else None, texts.stopped if cfg.stop else None

    def emit(token: int) -> bool:
        return extend(0, sample, token, stop_ids, on_token, stopped) or len(sample.tokens) == cfg.max_new_tokens

    stats = speculate(target, draft, tokenizer.encode_document(prompt), cfg, device, emit,
                      draft_tokens=draft_tokens, generator=generator)
    sample.text = texts.final(sample.tokens)
    texts.finish(0, sample.text)
    return Completion(prompt, seed, [sample]), stats
