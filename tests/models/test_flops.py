"""The FLOPs behind MFU: every architecture's Arch.train_flops against what torch's FlopCounterMode
counts in a real training step (forward and backward), on batches with padding, BERT's masking and
an encoder-decoder's two lengths. The count is the work of the real tokens: the sum of each row's
step run alone at its real length (a padded batch computes more: waste, not model work)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lmkit import data, objectives, train
from lmkit.batches import IGNORE, Batch, ClassifyBatch, LMBatch, MaskedLMBatch, Seq2SeqBatch
from lmkit.config import ModelConfig
from lmkit.models import ARCHS, build_model
from lmkit.models.heads import SequenceClassifier

# Small, but with attention (context 64) and the output layer (vocabulary 1024) each well over 5%
# of the count, so that leaving either out, or counting it at the wrong width, fails.
V, T = 1024, 64
SHAPE = {"vocab_size": V, "d_model": 32, "n_layer": 2, "n_head": 4, "max_seq_len": T}
LLAMA = {"n_kv_head": 2, "head_dim": 16, "d_ff": 96, "bias": False, "activation": "silu"}  # heads x head size 64 != d
LENGTHS = torch.tensor([64, 64, 50, 23])
REAL = torch.arange(T)[None, :] < LENGTHS[:, None]  # (4, T)


def ids(*shape: int) -> torch.Tensor:
    return torch.randint(5, V, shape)


def lm_windows() -> LMBatch:
    tokens = ids(4, T + 1)
    return LMBatch(tokens[:, :-1], tokens[:, 1:])


def instruct() -> LMBatch:
    """A prompt of 20 tokens learned from nothing, then the completion, then padding."""
    inputs = ids(4, T)
    targets = inputs.roll(-1, dims=1).masked_fill(~REAL, IGNORE)
    targets[:, :20] = IGNORE
    return LMBatch(inputs, targets)


def masked_pairs() -> MaskedLMBatch:
    """As data.BertPairs draws them: 15% of the real tokens chosen, sentence B from position 30."""
    tokens = ids(4, T).masked_fill(~REAL, 0)
    labels = torch.where((torch.rand(4, T) < 0.15) & REAL, tokens, IGNORE)
    types = (torch.arange(T) >= 30).long() * REAL
    return MaskedLMBatch(tokens, types, REAL, labels, torch.tensor([0, 1, 1, 0]))


def texts() -> ClassifyBatch:
    return ClassifyBatch(ids(4, T).masked_fill(~REAL, 0), torch.zeros(4, T, dtype=torch.long), REAL,
                         torch.tensor([0, 2, 1, 1]))


def pairs() -> Seq2SeqBatch:
    lengths = [(64, 63), (40, 55), (64, 20), (12, 30)]  # (source, target): the decoder reads target + 1
    return data.seq2seq_batch([(ids(s).tolist(), ids(t).tolist()) for s, t in lengths], 0, 1)


def rows(batch: Batch) -> list[Batch]:
    """Each row of BATCH alone, cut to its real length (for a decoder: up to its last target)."""
    out = []
    for i in range(batch[0].size(0)):
        one = type(batch)(*(t[i:i + 1] for t in batch))
        if isinstance(one, LMBatch):
            n = int(((one.targets != IGNORE) * torch.arange(1, T + 1)).max())
            one = LMBatch(one.inputs[:, :n], one.targets[:, :n])
        elif isinstance(one, Seq2SeqBatch):
            s, n = int(one.src_pad.sum()), int((one.targets != IGNORE).sum())
            one = Seq2SeqBatch(one.src[:, :s], one.src_pad[:, :s], one.tgt_in[:, :n], one.targets[:, :n])
        else:
            n = int(one.pad_mask.sum())
            one = type(one)(*(t[:, :n] if t.dim() == 2 else t for t in one))
        out.append(one)
    return out


def counted(model: torch.nn.Module, loss_fn: objectives.LossFn, batch: Batch) -> int:
    """FLOPs of one training step's forward and backward, as FlopCounterMode counts them (the math
    attention kernel: the CPU's fused one is not counted)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_fn(model, batch).sum().backward()
    model.zero_grad()
    return counter.get_total_flops()


CASES = {
    "gpt": ({"arch": "gpt"}, lm_windows, objectives.causal_lm_loss),
    "gpt-instruct": ({"arch": "gpt"}, instruct, objectives.causal_lm_loss),
    "gpt-classify": ({"arch": "gpt"}, texts, objectives.classify_loss),
    "llama": ({"arch": "llama", **LLAMA}, lm_windows, objectives.causal_lm_loss),
    "llama-classify": ({"arch": "llama", **LLAMA}, texts, objectives.classify_loss),
    "bert": ({"arch": "bert", "activation": "gelu"}, masked_pairs, objectives.mlm_nsp_loss),
    "bert-classify": ({"arch": "bert", "activation": "gelu"}, texts, objectives.classify_loss),
    "bert-classify-mean": ({"arch": "bert", "activation": "gelu", "pooling": "mean"}, texts, objectives.classify_loss),
    "seq2seq": ({"arch": "seq2seq"}, pairs, objectives.seq2seq_loss),
}


@pytest.mark.parametrize("case", CASES)
def test_train_flops_is_what_a_training_step_computes_for_the_real_tokens(case: str) -> None:
    settings, make, loss_fn = CASES[case]
    cfg = ModelConfig(**SHAPE, **settings)
    model = build_model(cfg)
    if loss_fn is objectives.classify_loss:
        model = SequenceClassifier(model, 3)
    batch = make()
    real = sum(counted(model, loss_fn, row) for row in rows(batch))
    assert ARCHS[cfg.arch].train_flops(cfg, batch) == pytest.approx(real, rel=0.05)


def test_the_training_loop_counts_each_batch_it_draws() -> None:
    """The loop's count is the architecture's, on the batches themselves, through any wrapper."""
    cfg = ModelConfig(**SHAPE, arch="bert", activation="gelu")

    class Wrapper(torch.nn.Module):  # as DDP holds the model
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    count = train._train_flops(Wrapper(SequenceClassifier(build_model(cfg), 3)))
    batches = [texts(), texts()]
    tally = train._FlopTally(iter(batches), count)
    assert [next(tally), next(tally)] == batches
    assert tally.take() == 2 * ARCHS["bert"].train_flops(cfg, batches[0]) and tally.take() == 0
    assert train._train_flops(torch.nn.Linear(2, 2)) is None  # not an lmkit model: no MFU
