"""Token files -> training batches: random windows for GPT, sentence pairs with masks for BERT,
noised and clean text for the encoder-decoder.

Every sampler draws from a generator of its own whose state is saved in every checkpoint: a
resumed run draws exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from lmkit.batches import IGNORE, Batch, LMBatch, MaskedLMBatch, Seq2SeqBatch
from lmkit.errors import DataError
from lmkit.tokenizer import Tokenizer


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> LMBatch:
    """Inputs tokens[s : s+length] and targets tokens[s+1 : s+length+1] for each start s."""
    rows = tokens[starts[:, None] + np.arange(length + 1)]  # (B, length + 1), read from the memory map
    rows = torch.from_numpy(rows.astype(np.int64))
    return LMBatch(rows[:, :-1], rows[:, 1:])


class SeededSampler:
    """An endless batch sampler drawing from a generator of its own, whose state is its position."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        raise NotImplementedError

    def _randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=self.generator))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def fixed_batches(self, n_batches: int) -> list[Batch]:
        """N_BATCHES batches drawn now and kept: the same validation set at every evaluation."""
        return [next(self) for _ in range(n_batches)]


class LMWindows(SeededSampler):
    """Endless random (inputs, targets) windows of SEQ_LEN tokens from a token array."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        if len(tokens) < seq_len + 1:
            raise DataError(f"the train split has {len(tokens)} tokens, fewer than max_seq_len + 1 = {seq_len + 1}; "
                            "add text or lower model.max_seq_len")
        super().__init__(seed)
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size

    def __next__(self) -> LMBatch:
        high = len(self.tokens) - self.seq_len  # last start that still has a target for every input
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator).numpy()
        return _windows(self.tokens, starts, self.seq_len)


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int) -> list[LMBatch]:
    """Fixed windows spread evenly over a (validation) token array, the same at every evaluation.

    Windows are shortened when the array is shorter than SEQ_LEN + 1 tokens.
    """
    length = min(seq_len, len(tokens) - 1)
    if length < 1:
        raise DataError(f"the validation split has only {len(tokens)} tokens; add text")
    n_windows = min(max_batches * batch_size, max(1, (len(tokens) - 1) // length))
    starts = np.linspace(0, len(tokens) - 1 - length, n_windows).round().astype(np.int64)
    return [_windows(tokens, starts[i:i + batch_size], length) for i in range(0, n_windows, batch_size)]


def _lines(tokens: np.ndarray, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(the tokens without end-of-document tokens, as int64; the position where each line starts).
    Lines end after a newline or end-of-document token."""
    tokens = np.asarray(tokens)
    ends = np.flatnonzero((tokens == tokenizer.newline_id) | (tokens == tokenizer.eos_id)) + 1
    keep = tokens != tokenizer.eos_id
    kept = tokens[keep].astype(np.int64)
    shift = np.cumsum(~keep)  # positions move left by the number of dropped tokens before them
    ends = ends - shift[ends - 1]
    return kept, np.unique(np.concatenate([[0], ends[ends < len(kept)]]))


class BertPairs(SeededSampler):
    """Endless BERT pretraining batches from a token array, sampled as BERT did it.

    Each example is `[CLS] A [SEP] B [SEP]`, padded to SEQ_LEN: A is a run of whole lines (a
    "sentence" here is a line), B the text from the line after A (label 0, is next) or, half of
    the time, from a random line away from A (label 1), as long as the room left (see _pair).
    10% of examples are shorter than SEQ_LEN, as in BERT, so the model also sees short inputs.
    Masks are drawn anew every time (dynamic masking): of the real tokens, MASK_PROB are chosen
    for prediction; of those 80% become [MASK], 10% a random token, 10% stay. Specials and padding are never chosen.

    Batches: MaskedLMBatch.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, tokenizer: Tokenizer,
                 mask_prob: float = 0.15) -> None:
        if seq_len < 8:
            raise DataError(f"max_seq_len={seq_len} is too short for sentence pairs; use at least 8")
        super().__init__(seed)
        self.tokens, self.line_starts = _lines(tokens, tokenizer)
        self.max_pair = min(seq_len - 3, len(self.tokens))  # tokens of A + B: room for [CLS] and two [SEP]
        if self.max_pair < 2:
            raise DataError(f"{len(self.tokens)} tokens are too few for sentence pairs; add text")
        self.seq_len, self.batch_size, self.tokenizer, self.mask_prob = seq_len, batch_size, tokenizer, mask_prob
        self.special_ids = torch.tensor(tokenizer.special_ids)  # never masked: [CLS], [SEP], padding, ...

    def __next__(self) -> MaskedLMBatch:
        rows = [self._pair() for _ in range(self.batch_size)]
        tok = self.tokenizer
        ids = torch.full((self.batch_size, self.seq_len), tok.pad_id, dtype=torch.int64)
        types = torch.zeros_like(ids)
        cls, sep = torch.tensor([tok.cls_id]), torch.tensor([tok.sep_id])
        for i, (a, b, _) in enumerate(rows):
            row = torch.cat([cls, a, sep, b, sep])
            ids[i, :len(row)] = row
            types[i, len(a) + 2:len(row)] = 1  # B and its [SEP]
        nsp = torch.tensor([label for _, _, label in rows])
        pad = ids != tok.pad_id
        masked, labels = self._mask(ids)
        return MaskedLMBatch(masked, types, pad, labels, nsp)

    def _pair(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(A, B, label) with len(A) + len(B) <= seq_len - 3; label 0 when B follows A.

        The label must not be readable from the pair's form, or next-sentence accuracy measures the
        form: both kinds of B start at a line start and fill the room A leaves (cut mid-line, as
        BERT truncated its pairs: cutting at a line end would let B's end tell the label, as long
        lines cluster in prose and A's lines predict its true continuation's); a pair whose B
        would run past the end of the text is drawn again, whatever its kind, so neither kind is
        cut short; a random B never overlaps A or A's true continuation.
        """
        start, a_end, b_start, b_end, label = self.pair_spans()
        return torch.from_numpy(self.tokens[start:a_end]), torch.from_numpy(self.tokens[b_start:b_end]), label

    def pair_spans(self) -> tuple[int, int, int, int, int]:
        """(A's start, A's end, B's start, B's end, label) of the next pair, as positions in self.tokens."""
        is_random = bool(torch.rand((), generator=self.generator) < 0.5)
        for _ in range(100):
            spans = self._try_spans(is_random)
            if spans is not None:
                return spans
        raise DataError(f"{len(self.tokens)} tokens are too few to draw next-sentence pairs whose random half "
                        "does not overlap the first half's text; add text or lower model.max_seq_len")

    def _random_line_start(self) -> int:
        return int(self.line_starts[self._randint(0, len(self.line_starts))])

    def _try_spans(self, is_random: bool) -> tuple[int, int, int, int, int] | None:
        """One draw of pair_spans, or None when it must be drawn again."""
        budget = self.max_pair
        if torch.rand((), generator=self.generator) < 0.1:
            budget = self._randint(2, budget + 1)
        n, starts = len(self.tokens), self.line_starts
        start = self._random_line_start()
        if start + budget > n:
            return None
        # A: whole lines up to a random split point (its first line cut there when it is longer).
        split = start + self._randint(1, budget)
        boundary = int(starts[np.searchsorted(starts, split, side="right") - 1])
        a_end = boundary if boundary > start else split
        b_len = budget - (a_end - start)
        following = int(starts[np.searchsorted(starts, a_end)]) if a_end <= starts[-1] else n  # next line start
        b_start = following
        if is_random:
            b_start = self._random_line_start()
            for _ in range(10):  # away from A and from A's true continuation
                if b_start + b_len <= start or b_start >= following + b_len:
                    break
                b_start = self._random_line_start()
            else:
                return None
        if b_start + b_len > n:
            return None
        return start, a_end, b_start, b_start + b_len, int(is_random)

    def _mask(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """80/10/10 masking of MASK_PROB of the real tokens; at least one per row."""
        tok = self.tokenizer
        candidates = ~torch.isin(ids, self.special_ids)  # (B, T)
        draw = torch.rand(ids.shape, generator=self.generator)
        chosen = candidates & (draw < self.mask_prob)
        # A row with nothing chosen gets its likeliest candidate, so every row has a target.
        fallback = torch.where(candidates, draw, 2.0).argmin(dim=1)
        empty = ~chosen.any(dim=1) & candidates.any(dim=1)
        chosen[empty, fallback[empty]] = True
        labels = torch.where(chosen, ids, IGNORE)
        action = torch.rand(ids.shape, generator=self.generator)
        random_ids = torch.randint(tok.n_special, tok.vocab_size, ids.shape, generator=self.generator)
        masked = torch.where(chosen & (action < 0.8), tok.mask_id, ids)
        masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
        return masked, labels


def seq2seq_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int, eos_id: int) -> Seq2SeqBatch:
    """(source ids, target ids) pairs -> a Seq2SeqBatch, padded on the right. The decoder reads
    EOS + target and predicts target + EOS: EOS is both its start token and its stop token.
    Targets are IGNORE at padding."""
    src_len = max(len(src) for src, _ in pairs)
    tgt_len = max(len(tgt) for _, tgt in pairs) + 1
    src = torch.full((len(pairs), src_len), pad_id)
    tgt_in = torch.full((len(pairs), tgt_len), pad_id)
    targets = torch.full((len(pairs), tgt_len), IGNORE)
    for i, (s, t) in enumerate(pairs):
        src[i, :len(s)] = torch.tensor(s, dtype=torch.int64)
        tgt_in[i, :len(t) + 1] = torch.tensor([eos_id, *t], dtype=torch.int64)
        targets[i, :len(t) + 1] = torch.tensor([*t, eos_id], dtype=torch.int64)
    src_pad = torch.arange(src_len)[None, :] < torch.tensor([len(s) for s, _ in pairs])[:, None]
    return Seq2SeqBatch(src, src_pad, tgt_in, targets)


class DenoisingSpans(SeededSampler):
    """Endless encoder-decoder pretraining batches: BART's text infilling.

    Each example is a run of whole lines (a line longer than the context is cut). Half the time it
    is as long as the context allows, half the time shorter, so that short inputs such as single
    lines are common too. NOISE of its tokens are hidden in spans whose lengths average MEAN_SPAN
    tokens; each span becomes ONE [MASK] in the source, so the model must also infer how much is
    missing. The target is the whole clean text: the decoder learns to copy what it sees through
    cross attention and to write what it does not -- the skills a rewriting task needs.

    Batches: Seq2SeqBatch, as seq2seq_batch.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, tokenizer: Tokenizer,
                 noise: float = 0.3, mean_span: float = 3.0) -> None:
        super().__init__(seed)
        self.tokens, self.line_starts = _lines(tokens, tokenizer)
        self.max_len = min(seq_len - 1, len(self.tokens))  # decoder input: EOS + text fits seq_len
        if self.max_len < 2:
            raise DataError(f"{len(self.tokens)} tokens are too few for denoising examples; add text")
        self.batch_size, self.tokenizer, self.noise, self.mean_span = batch_size, tokenizer, noise, mean_span

    def __next__(self) -> Batch:
        texts = [self._text() for _ in range(self.batch_size)]
        pairs = [(self._corrupt(text), text.tolist()) for text in texts]
        return seq2seq_batch(pairs, self.tokenizer.pad_id, self.tokenizer.eos_id)

    def _text(self) -> np.ndarray:
        """Whole lines from a random line start, at most max_len tokens."""
        budget = self.max_len if torch.rand((), generator=self.generator) < 0.5 else self._randint(2, self.max_len + 1)
        start = min(int(self.line_starts[self._randint(0, len(self.line_starts))]), len(self.tokens) - budget)
        end = start + budget
        boundary = int(self.line_starts[np.searchsorted(self.line_starts, end, side="right") - 1])
        return self.tokens[start:boundary if boundary - start >= 2 else end]  # >= 2: one kept, one hidden

    def _corrupt(self, text: np.ndarray) -> list[int]:
        """TEXT with about NOISE of its tokens in spans, each span replaced by one [MASK].

        As T5's random_spans_noise_mask: the hidden and the kept tokens are each cut into n_spans
        runs of random lengths, which then alternate, starting with either (a coin flip), so that
        a text may begin or end with a [MASK]."""
        length = len(text)
        n_noise = min(max(1, round(length * self.noise)), length - 1)
        n_spans = max(1, min(round(n_noise / self.mean_span), n_noise, length - n_noise))
        runs = [(keep, False) for keep in self._partition(length - n_noise, n_spans)]
        hidden = [(hide, True) for hide in self._partition(n_noise, n_spans)]
        order = zip(hidden, runs) if torch.rand((), generator=self.generator) < 0.5 else zip(runs, hidden)
        source, pos = [], 0
        for run_length, is_hidden in (run for pair in order for run in pair):
            source += [self.tokenizer.mask_id] if is_hidden else text[pos:pos + run_length].tolist()
            pos += run_length
        return source

    def _partition(self, total: int, parts: int) -> list[int]:
        """TOTAL cut into PARTS positive lengths at random."""
        cuts = (torch.randperm(total - 1, generator=self.generator)[:parts - 1] + 1).sort().values.tolist()
        bounds = [0, *cuts, total]
        return [b - a for a, b in zip(bounds, bounds[1:])]
