"""Speculative decoding: a small draft model that shares the target's tokenizer (the student of
`lmkit distill` is one) proposes K tokens; the target scores all of them in one forward over its
KV cache and keeps the longest prefix it agrees with, plus one token of its own; both caches are
rolled back past the first rejection. Greedy, "agrees" means the target would have picked the same
token, so the output is the target's own, token for token. Sampling, draft token x (drawn from the
draft's distribution q) is kept with probability min(1, p(x) / q(x)), and the first rejected one is
replaced by a draw from max(0, p - q), renormalised (Leviathan et al. 2023; Chen et al. 2023): the
tokens are distributed exactly as the target's own samples.

A round is one target forward for up to K + 1 tokens, instead of one per token: the gain is the
acceptance rate times K, less the draft's cost. Several rows (prompts, or samples of one) speculate
together: each keeps its own length in both caches (a SlotCache), since each accepts its own number
of proposals, and leaves the batch when it ends. Rounds run while a row's whole context fits the
window; past it, the row goes on alone without the draft, sliding the window as lmkit.generate does.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmkit.checkpoint import Checkpoint, resolve
from lmkit.config import ConfigError, SampleConfig, check_range
from lmkit.device import autocast, autocast_dtype
from lmkit.errors import CheckpointError, DataError
from lmkit.generate import CausalStepper, Completion, Sample, _Texts, decoding_of
from lmkit.models.layers import SlotCache
from lmkit.project import Project
from lmkit.search import _penalties, extend, next_token_probs, sample_next
from lmkit.tokenizer import Tokenizer


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


MAX_DRAFT_TOKENS = 32  # beyond, a draft's proposals are almost never all accepted: the extra passes are waste


def check_options(cfg: SampleConfig, draft_tokens: int = 4) -> None:
    """Raises ConfigError for settings speculative decoding does not take."""
    check_range("draft_tokens", draft_tokens, 1, MAX_DRAFT_TOKENS)
    if cfg.beam > 1:
        raise ConfigError("--draft samples or decodes greedily: leave out --beam")
    if _penalties(cfg):
        raise ConfigError("--draft does not take --repetition-penalty or --no-repeat-ngram-size")


def open_draft(path: Path | None, project: Project, target: Checkpoint, cfg: SampleConfig, draft_tokens: int = 4,
               quantize: str | None = None) -> Checkpoint | None:
    """The draft checkpoint that `lmkit generate --draft PATH` means (see lmkit.checkpoint.resolve;
    None: no draft), checked by check_draft before either model loads.

    Raises:
        CheckpointError: PATH is no checkpoint; as check_draft.
    """
    if path is None:
        return None
    draft = Checkpoint(resolve(path, project))
    check_draft(target, draft, cfg, draft_tokens, quantize)
    return draft


def check_draft(target: Checkpoint, draft: Checkpoint, cfg: SampleConfig, draft_tokens: int = 4,
                quantize: str | None = None) -> None:
    """Whether DRAFT can propose tokens for TARGET under CFG (the settings of check_options), checked
    before either model loads. QUANTIZE: how TARGET is to be decoded (None: as it is saved).

    Raises:
        ConfigError: a setting speculative decoding does not take.
        DataError: TARGET would decode with int8 weights.
        CheckpointError: DRAFT is no decoder language model, or has another tokenizer.
    """
    check_options(cfg, draft_tokens)
    if quantize or target.is_int8:
        raise DataError("--draft needs the model's float weights: int8 quantizes activations per call, so "
                        "scoring the draft's tokens together would differ slightly from one at a time "
                        "(the draft itself may be an int8 checkpoint)")
    if draft.tokenizer_fingerprint != target.tokenizer_fingerprint:
        raise CheckpointError(f"the draft {draft.path} uses tokenizer {draft.tokenizer_fingerprint}, the "
                              f"model {target.tokenizer_fingerprint}: a draft must share the model's tokenizer "
                              "(distill one with `lmkit distill --teacher`)")
    if decoding_of(draft) != "continue":
        raise CheckpointError(f"the draft {draft.path} is not a decoder language model")


class _Rows:
    """One model's KV cache over the committed tokens of the rows still speculating, each row at a
    length of its own (a SlotCache: rows accept different numbers of proposals); the tokens a row
    has not fed yet go in with the next call. The active rows are the first slots; `row_of` names
    the sequence each slot decodes."""

    def __init__(self, model: nn.Module, sequences: list[list[int]], rows: list[int], device: torch.device,
                 dtype: torch.dtype, reach: int) -> None:
        """REACH: the most positions a row will hold (not the whole context of a long-context model)."""
        self.model, self.device = model, device
        probe = model.new_cache(1, device, dtype, 1)[0]  # the geometry of one layer's cache
        _, heads, _, head_dim = probe.k.shape
        reach = min(model.config.max_seq_len, reach)
        self.cache = [SlotCache(len(rows), heads, head_dim, reach, device, dtype) for _ in range(model.config.n_layer)]
        for slot, row in enumerate(rows):
            tokens = sequences[row]
            if len(tokens) > 1:  # prefilled alone, then moved into its slot
                prefill = model.new_cache(1, device, dtype, len(tokens) - 1)
                model(torch.tensor([tokens[:-1]], device=device), cache=prefill)
                for layer, cache in zip(prefill, self.cache):
                    cache.load(slot, layer)
        for cache in self.cache:
            cache.active = len(rows)
        self.row_of = list(rows)
        self.pending = [sequences[row][-1:] for row in rows]

    @property
    def active(self) -> int:
        return len(self.row_of)

    def feed(self, extra: list[list[int]] | None = None) -> list[torch.Tensor]:
        """Each active row's logits (T_r, V) after its pending tokens and its EXTRA, which join its
        cache. Rows of fewer tokens are padded on the right: the padding is written past the row's
        length, where no later query looks, and overwritten by what comes next."""
        ids = [p + (extra[slot] if extra else []) for slot, p in enumerate(self.pending)]
        width = max(map(len, ids))
        batch = torch.tensor([row + [0] * (width - len(row)) for row in ids], device=self.device)  # (n, T)
        logits = self.model(batch, cache=self.cache)[0]  # (n, T, V)
        for cache in self.cache:
            cache.lengths[:self.active] -= torch.tensor([width - len(row) for row in ids], device=self.device)
        self.pending = [[] for _ in ids]
        return [logits[slot, :len(row)] for slot, row in enumerate(ids)]

    def keep(self, slot: int, length: int, pending: list[int]) -> None:
        """Forget SLOT's cached positions from LENGTH on; PENDING are fed next."""
        for cache in self.cache:
            cache.lengths[slot] = length
        self.pending[slot] = pending

    def drop(self, slot: int) -> None:
        """SLOT leaves; the last active slot moves into its place."""
        last = self.active - 1
        if slot != last:
            for cache in self.cache:
                cache.move(last, slot)
            self.row_of[slot], self.pending[slot] = self.row_of[last], self.pending[last]
        self.row_of.pop()
        self.pending.pop()
        for cache in self.cache:
            cache.active = last


@torch.no_grad()
def speculate(target: nn.Module, draft: nn.Module, prompts: list[list[int]], cfg: SampleConfig, device: torch.device,
              emit: Callable[[int, int], bool], *, draft_tokens: int = 4,
              generator: torch.Generator | None = None) -> Speculation:
    """Continue each of PROMPTS (rows decoded together) with TARGET, DRAFT proposing DRAFT_TOKENS
    tokens a round. Each new token of row r goes to EMIT(r, token), which returns True to end the
    row (an end-of-text token, a stop string, the length limit)."""
    check_options(cfg, draft_tokens)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ConfigError(f"the draft scores {draft.config.vocab_size} tokens, the model {target.config.vocab_size}: "
                          "they must share the vocabulary")
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    k, greedy = draft_tokens, cfg.is_greedy
    window = target.config.max_seq_len
    limit = min(window, draft.config.max_seq_len)
    stats = Speculation()
    sequences = [list(ids[-window:]) for ids in prompts]

    def room(row: int) -> bool:  # every token the target scores must fit the window with K more behind it
        return len(sequences[row]) + k + 1 < limit

    dtype = autocast_dtype(device, "auto") or torch.float32
    with autocast(device):
        rows = [row for row in range(len(sequences)) if room(row)]
        plain = [row for row in range(len(sequences)) if not room(row)]
        if rows:
            reach = max(len(sequences[row]) for row in rows) + cfg.max_new_tokens + k + 1
            tgt, dft = (_Rows(m, sequences, rows, device, dtype, reach) for m in (target, draft))
        while rows and tgt.active:
            stats.rounds += 1
            logits = torch.stack([scores[-1] for scores in dft.feed()])  # (n, V)
            proposed, draft_probs = [], []  # K x (n,), K x (n, V)
            for i in range(k):
                q = None if greedy else next_token_probs(logits, cfg)
                tokens = logits.argmax(dim=-1) if greedy else torch.multinomial(q, 1, generator=generator)[:, 0]
                proposed.append(tokens)
                draft_probs.append(q)
                if i < k - 1:
                    logits = torch.stack([scores[-1] for scores in dft.feed(tokens[:, None].tolist())])
            proposals = torch.stack(proposed, dim=1).tolist()  # (n, K)
            scores = torch.stack(tgt.feed(proposals))  # (n, K + 1, V): after the last committed token and each proposal
            picks = scores.argmax(dim=-1).tolist() if greedy else None
            for slot in reversed(range(tgt.active)):  # from the end: a dropped slot takes the last one, already done
                row, mine = tgt.row_of[slot], proposals[slot]
                accepted, token = _judge(scores[slot], mine, [q[slot] for q in draft_probs] if not greedy else None,
                                         picks[slot] if greedy else None, cfg, generator)
                stats.proposed, stats.accepted = stats.proposed + k, stats.accepted + accepted
                # Both caches hold the committed tokens; the target keeps the proposals it agreed with, the
                # draft those of them it has seen (all but the last proposal); the rest is fed next round.
                base = len(sequences[row])
                tgt.keep(slot, base + accepted, [token])
                dft.keep(slot, base + min(accepted, k - 1), mine[k - 1:] * (accepted == k) + [token])
                ended = False
                for new in [*mine[:accepted], token]:
                    sequences[row].append(new)
                    if emit(row, new):
                        ended = True
                        break
                if ended or not room(row):
                    tgt.drop(slot)
                    dft.drop(slot)
                    if not ended:
                        plain.append(row)
        for row in sorted(plain):
            _plain(target, sequences[row], cfg, device, lambda token, row=row: emit(row, token), generator, stats)
    return stats


def _judge(scores: torch.Tensor, proposed: list[int], draft_probs: list[torch.Tensor] | None,
           picks: list[int] | None, cfg: SampleConfig, generator: torch.Generator) -> tuple[int, int]:
    """(how many proposals the target keeps, the token it adds): its own pick after the last kept one.
    SCORES (K + 1, V) the target's logits; greedy, PICKS their argmax; sampling, DRAFT_PROBS the K
    distributions the proposals were drawn from."""
    if picks is not None:
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
    """lmkit.generate.generate with DRAFT proposing tokens (cfg.num_samples rows decoded together);
    and how it fared."""
    seed = cfg.seed if cfg.seed is not None else secrets.randbits(63)
    generator = torch.Generator(device=device).manual_seed(seed)
    texts, samples = _Texts(tokenizer, cfg.stop, on_text), [Sample() for _ in range(cfg.num_samples)]
    stop_ids = set(tokenizer.stop_ids)
    on_token, stopped = texts.stream if on_text else None, texts.stopped if cfg.stop else None

    def emit(row: int, token: int) -> bool:
        sample = samples[row]
        return extend(row, sample, token, stop_ids, on_token, stopped) or len(sample.tokens) == cfg.max_new_tokens

    stats = speculate(target, draft, [tokenizer.encode_document(prompt)] * cfg.num_samples, cfg, device, emit,
                      draft_tokens=draft_tokens, generator=generator)
    for row, sample in enumerate(samples):
        sample.text = texts.final(sample.tokens)
        texts.finish(row, sample.text)
    return Completion(prompt, seed, samples), stats
