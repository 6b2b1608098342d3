"""How the next tokens are chosen, for any model that produces next-token logits one position at
a time: sampling (temperature, top-k, top-p) or greedy, beam search, and the rules both share --
repetition penalty, no repeated n-grams, stopping at EOS or at a stop string.

Models are driven through a Stepper (lmkit.generate has one for GPT and one for the encoder-
decoder), so the search never knows which architecture it is running.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from lmkit.config import SampleConfig

Stopped = Callable[[int, list[int]], bool]  # (row, its generated tokens) -> True when a stop string appeared


class Stepper(Protocol):
    """N rows of text being extended by one model, one token per call of advance()."""

    limit: int | None  # the most tokens a row can get (a decoder's positions); None: no limit

    def logits(self) -> torch.Tensor:
        """(N, V): scores of every possible next token of every row."""
        ...

    def advance(self, tokens: torch.Tensor, parents: torch.Tensor | None = None) -> None:
        """Append TOKENS (N,) to the rows; with PARENTS (N,), row i first becomes a copy of row parents[i]."""
        ...


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens, without the final EOS
    score: float  # what beam search ranks by: sum of log-probabilities / length ** length_penalty
    finish_reason: str  # "eos", "stop" or "length"


def sample_next(logits: torch.Tensor, cfg: SampleConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token id for each row of LOGITS (B, V) -> (B,)."""
    if cfg.is_greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(next_token_probs(logits, cfg), 1, generator=generator).squeeze(-1)


def next_token_probs(logits: torch.Tensor, cfg: SampleConfig) -> torch.Tensor:
    """The distribution (B, V) sample_next draws from when sampling: LOGITS (B, V) at cfg's
    temperature, cut to its top-k and top-p tokens."""
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
    return logits.softmax(dim=-1)


def penalize(logits: torch.Tensor, histories: Sequence[list[int]], cfg: SampleConfig) -> torch.Tensor:
    """Apply the repetition penalty and the n-gram ban to LOGITS (N, V), given each row's text so far.

    Repetition penalty (CTRL): a token already in the row has its logit divided by the penalty when
    positive, multiplied when negative. No-repeat n-gram: a token that would complete an n-gram
    already in the row gets -inf.
    """
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros_like(logits, dtype=torch.bool)
        for row, history in enumerate(histories):
            seen[row, history] = True
        penalized = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    n = cfg.no_repeat_ngram_size
    if n:
        logits = logits.clone()
        for row, history in enumerate(histories):
            if len(history) < n:
                continue
            prefix = tuple(history[len(history) - n + 1:])  # the n - 1 last tokens
            banned = [history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i:i + n - 1]) == prefix]
            logits[row, banned] = float("-inf")
    return logits


def _penalties(cfg: SampleConfig) -> bool:
    return cfg.repetition_penalty != 1.0 or cfg.no_repeat_ngram_size > 0


def extend(row: int, hypothesis: Any, token: int, eos_ids: frozenset[int] | set[int],
           on_token: Callable[[int, list[int]], None] | None, stopped: Stopped | None) -> bool:
    """Add TOKEN to row ROW's HYPOTHESIS (anything with tokens and finish_reason): an end-of-text
    id ends it ("eos"), and so does a stop string its text now holds ("stop"); True when it ended.
    What sampling, batched serving and speculative decoding all do with each new token."""
    if token in eos_ids:
        hypothesis.finish_reason = "eos"
        return True
    hypothesis.tokens.append(token)
    if on_token:
        on_token(row, hypothesis.tokens)
    if stopped and stopped(row, hypothesis.tokens):
        hypothesis.finish_reason = "stop"
        return True
    return False


def _max_steps(stepper: Stepper, cfg: SampleConfig) -> int:
    return min(cfg.max_new_tokens, stepper.limit or cfg.max_new_tokens)


def _stop_ids(eos: int | Sequence[int]) -> tuple[frozenset[int], int]:
    """(every end-of-text id, the one that pads finished rows): a model may have several (Llama 3)."""
    ids = frozenset([eos] if isinstance(eos, int) else eos)
    return ids, min(ids)


def sample(stepper: Stepper, n_rows: int, cfg: SampleConfig, eos_id: int | Sequence[int], *,
           prefixes: Sequence[list[int]] | None = None, generator: torch.Generator | None = None,
           stopped: Stopped | None = None,
           on_token: Callable[[int, list[int]], None] | None = None) -> list[Hypothesis]:
    """Extend each row by sampling (or greedily) until EOS, a stop string, or the length limit.

    Args:
        prefixes: each row's tokens before generation (a GPT prompt), seen by the penalties.
        on_token: called with (row, its tokens so far) after each token, for streaming.

    Returns:
        one Hypothesis per row (score 0: sampling does not rank).
    """
    eos_ids, eos_id = _stop_ids(eos_id)
    prefixes = prefixes or [[] for _ in range(n_rows)]
    done = [Hypothesis([], 0.0, "length") for _ in range(n_rows)]
    finished = torch.zeros(n_rows, dtype=torch.bool)
    steps = _max_steps(stepper, cfg)
    for step in range(steps):
        logits = stepper.logits()
        if _penalties(cfg):
            logits = penalize(logits, [p + h.tokens for p, h in zip(prefixes, done)], cfg)
        next_ids = sample_next(logits, cfg, generator).cpu().masked_fill(finished, eos_id)  # (N,)
        for row, token in enumerate(next_ids.tolist()):
            if not finished[row] and extend(row, done[row], token, eos_ids, on_token, stopped):
                finished[row] = True
        if finished.all() or step == steps - 1:
            break
        stepper.advance(next_ids.to(logits.device))
    return done


def beam_search(stepper: Stepper, n_inputs: int, cfg: SampleConfig, eos_id: int | Sequence[int], *,
                prefixes: Sequence[list[int]] | None = None, stopped: Stopped | None = None) -> list[list[Hypothesis]]:
    """The cfg.num_samples best continuations of each input by beam search of width K = cfg.beam.

    The stepper holds n_inputs * K rows, the K beams of each input consecutive. Each step extends
    every beam by every token, and keeps the K best-scoring live extensions per input; those that
    end (EOS or a stop string) among the best K join the input's finished hypotheses (at most K,
    the best). Scores are sums of log-probabilities; hypotheses are ranked by score / length **
    cfg.length_penalty (length in generated tokens, EOS included). An input is done when it has K
    finished hypotheses and its best live beam, scored at its current length, cannot beat the worst
    of them (Hugging Face's default rule; exact when length_penalty <= 0, since a live sum only
    falls as it grows). With K at least the number of possible sequences nothing is ever pruned,
    so the search returns the best sequence exactly.

    Returns:
        per input, its hypotheses best first; inputs that ran out of steps include their live beams
        (finish_reason "length").
    """
    K, lp = cfg.beam, cfg.length_penalty
    eos_ids, eos_id = _stop_ids(eos_id)
    n_rows = n_inputs * K
    prefixes = prefixes or [[] for _ in range(n_rows)]
    generated: list[list[int]] = [[] for _ in range(n_rows)]
    scores = torch.full((n_inputs, K), -math.inf)
    scores[:, 0] = 0.0  # the beams of an input start identical: only the first is live at first
    finished: list[list[Hypothesis]] = [[] for _ in range(n_inputs)]
    done = [False] * n_inputs
    steps = _max_steps(stepper, cfg)
    for step in range(steps):
        length = step + 1
        logits = stepper.logits()
        if _penalties(cfg):
            logits = penalize(logits, [p + g for p, g in zip(prefixes, generated)], cfg)
        logp = F.log_softmax(logits.float(), dim=-1).cpu()  # (N, V)
        V = logp.size(-1)
        candidates = (scores.view(n_rows, 1) + logp).view(n_inputs, K * V)
        top_scores, top_index = candidates.topk(min(2 * K, K * V), dim=1)  # enough for K live after K ends
        rows, tokens, new_scores = [], [], []
        for b in range(n_inputs):
            live: list[tuple[int, int, float]] = []
            for rank, (score, index) in enumerate(zip(top_scores[b].tolist(), top_index[b].tolist())):
                if done[b] or score == -math.inf or len(live) == K:
                    break
                row, token = b * K + index // V, index % V
                if token in eos_ids:
                    if rank < K:
                        _keep(finished[b], Hypothesis(list(generated[row]), score / length ** lp, "eos"), K)
                    continue
                if stopped and stopped(row, generated[row] + [token]):
                    if rank < K:
                        _keep(finished[b], Hypothesis(generated[row] + [token], score / length ** lp, "stop"), K)
                    continue
                live.append((row, token, score))
            live += [(b * K, eos_id, -math.inf)] * (K - len(live))  # dead beams fill the batch
            rows += [row for row, _, _ in live]
            tokens += [token for _, token, _ in live]
            new_scores += [score for _, _, score in live]
            best_live = max(score for _, _, score in live)
            if not done[b]:
                done[b] = _cannot_improve(finished[b], best_live, length, K, lp)
        generated = [generated[row] + [token] for row, token in zip(rows, tokens)]
        scores = torch.tensor(new_scores).view(n_inputs, K)
        if all(done) or step == steps - 1:
            break
        device = logits.device
        stepper.advance(torch.tensor(tokens, device=device), torch.tensor(rows, device=device))
    for b in range(n_inputs):
        if not done[b]:  # out of steps: the live beams end here
            for k in range(K):
                if scores[b, k] > -math.inf:
                    _keep(finished[b], Hypothesis(generated[b * K + k], scores[b, k].item() / steps ** lp,
                                                  "length"), K)
    return [sorted(f, key=lambda h: -h.score)[:cfg.num_samples] for f in finished]


def _keep(finished: list[Hypothesis], hypothesis: Hypothesis, k: int) -> None:
    """Add HYPOTHESIS to the K best finished ones."""
    if len(finished) < k:
        finished.append(hypothesis)
        return
    worst = min(range(k), key=lambda i: finished[i].score)
    if hypothesis.score > finished[worst].score:
        finished[worst] = hypothesis


def _cannot_improve(finished: list[Hypothesis], best_live: float, length: int, k: int,
                    length_penalty: float) -> bool:
    """True when K hypotheses are finished and the best live beam, ranked at its current LENGTH,
    does not beat the worst of them. (With length_penalty > 0 a longer continuation could still
    rank higher; an exact bound would have to assume the longest, which almost never stops early.)"""
    if len(finished) < k:
        return False
    return best_live == -math.inf or best_live / length ** length_penalty <= min(h.score for h in finished)
