"""Token files -> training batches.

Language-model batches are random windows of the train split, drawn from a generator of their
own whose state is saved in every checkpoint: a resumed run draws exactly the batches the
uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from lmkit.errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs (B, T), targets (B, T), int64


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> Batch:
    """Inputs tokens[s : s+length] and targets tokens[s+1 : s+length+1] for each start s."""
    rows = tokens[starts[:, None] + np.arange(length + 1)]  # (B, length + 1), read from the memory map
    rows = torch.from_numpy(rows.astype(np.int64))
    return rows[:, :-1], rows[:, 1:]


class LMWindows:
    """Endless random (inputs, targets) windows of SEQ_LEN tokens from a token array."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        if len(tokens) < seq_len + 1:
            raise DataError(f"the train split has {len(tokens)} tokens, fewer than max_seq_len + 1 = {seq_len + 1}; "
                            "add text or lower model.max_seq_len")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        high = len(self.tokens) - self.seq_len  # last start that still has a target for every input
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator).numpy()
        return _windows(self.tokens, starts, self.seq_len)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int) -> list[Batch]:
    """Fixed windows spread evenly over a (validation) token array, the same at every evaluation.

    Windows are shortened when the array is shorter than SEQ_LEN + 1 tokens.
    """
    length = min(seq_len, len(tokens) - 1)
    if length < 1:
        raise DataError(f"the validation split has only {len(tokens)} tokens; add text")
    n_windows = min(max_batches * batch_size, max(1, (len(tokens) - 1) // length))
    starts = np.linspace(0, len(tokens) - 1 - length, n_windows).round().astype(np.int64)
    return [_windows(tokens, starts[i:i + batch_size], length) for i in range(0, n_windows, batch_size)]
