"""Token-weighted losses: a training step's gradient is the gradient of the whole global batch in
one piece, however the batch is split into micro-batches (gradient accumulation) or ranks, even
when the pieces score very different numbers of tokens."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmkit import distributed, objectives
from lmkit.batches import IGNORE, Batch, LMBatch, MaskedLMBatch, Seq2SeqBatch, map_tensors
from lmkit.config import ModelConfig, TrainConfig
from lmkit.models import build_model
from lmkit.train import _optimizer_step

VOCAB, ROWS, LENGTH = 64, 4, 16


def _scored_rows(counts: list[int]) -> torch.Tensor:
    """(ROWS, LENGTH) bool: row i has counts[i] scored positions, at its end."""
    return torch.arange(LENGTH)[None, :] >= LENGTH - torch.tensor(counts)[:, None]


def _bert() -> tuple[ModelConfig, Batch, Callable]:
    """The issue's case: the two halves of a BERT batch hold 9 and 21 masked tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8, VOCAB, (ROWS, LENGTH), generator=g)
    masked = _scored_rows([4, 5, 10, 11])
    batch = MaskedLMBatch(ids, torch.zeros_like(ids), torch.ones_like(ids, dtype=torch.bool),
                          torch.where(masked, ids, IGNORE), torch.tensor([0, 1, 1, 0]))
    return ModelConfig(arch="bert", vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, max_seq_len=LENGTH), batch, \
        objectives.mlm_nsp_loss


def _seq2seq() -> tuple[ModelConfig, Batch, Callable]:
    """Short targets in one half, long ones in the other."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(8, VOCAB, (ROWS, 8), generator=g)
    tgt = torch.randint(8, VOCAB, (ROWS, LENGTH), generator=g)
    scored = ~_scored_rows([13, 12, 1, 0])  # targets at the start: 3, 4, 15 and 16 tokens
    batch = Seq2SeqBatch(src, torch.ones_like(src, dtype=torch.bool), tgt, torch.where(scored, tgt.roll(-1, 1), IGNORE))
    return ModelConfig(arch="seq2seq", vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, max_seq_len=LENGTH), \
        batch, objectives.seq2seq_loss


def _instruct() -> tuple[ModelConfig, Batch, Callable]:
    """Prompt/completion rows: 2 and 3 completion tokens in one half, 13 and 14 in the other."""
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(8, VOCAB, (ROWS, LENGTH + 1), generator=g)
    batch = LMBatch(tokens[:, :-1], torch.where(_scored_rows([2, 3, 13, 14]), tokens[:, 1:], IGNORE))
    return ModelConfig(arch="llama", vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64,
                       max_seq_len=LENGTH, bias=False, activation="silu"), batch, objectives.causal_lm_loss


CASES = {"bert": _bert, "seq2seq": _seq2seq, "instruct": _instruct}


def _halves(batch: Batch) -> list[Batch]:
    return [map_tensors(batch, lambda t: t[:ROWS // 2]), map_tensors(batch, lambda t: t[ROWS // 2:])]


def _step(case: str, micro_batches: list[Batch], world: distributed.World = distributed.World()) -> torch.Tensor:
    """The change of every weight (flattened) in one _optimizer_step of SGD at lr 1: minus the gradient."""
    cfg, _, loss_fn = CASES[case]()
    torch.manual_seed(0)
    model = build_model(cfg)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    trained = distributed.wrap(model, world, "ddp", unused_parameters=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    _optimizer_step(trained, list(model.parameters()), iter(micro_batches), loss_fn, optimizer, 1.0,
                    TrainConfig(grad_accum=len(micro_batches), grad_clip=0.0), torch.device("cpu"), world=world)
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


def _mean_of_means(case: str) -> torch.Tensor:
    """What the loop computed before: the mean over micro-batches of each one's mean loss."""
    cfg, batch, loss_fn = CASES[case]()
    torch.manual_seed(0)
    model = build_model(cfg)
    loss = sum((loss_fn(model, b) / b.loss_units()).sum() for b in _halves(batch)) / 2
    loss.backward()
    return -torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()])


@pytest.mark.parametrize("case", CASES)
def test_accumulating_two_uneven_micro_batches_gives_the_single_batch_gradient(case: str) -> None:
    _, batch, _ = CASES[case]()
    whole, accumulated = _step(case, [batch]), _step(case, _halves(batch))
    scale = whole.abs().max().item()
    assert (whole - accumulated).abs().max().item() < 1e-5 * max(1.0, scale)
    # the test can tell: averaging the two halves' means would be far off
    assert (whole - _mean_of_means(case)).norm() > 0.05 * whole.norm()


def _rank(rank: int, case: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    world = distributed.World(rank, 2)
    _, batch, _ = CASES[case]()
    # each rank holds one half of the global batch, as a rank's slice of each global micro-batch;
    # two micro-batches per rank: the first and the second row of its half
    mine = _halves(batch)[rank]
    delta = _step(case, [map_tensors(mine, lambda t: t[:1]), map_tensors(mine, lambda t: t[1:])], world)
    if rank == 0:
        torch.save(delta, out)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_with_accumulation_give_the_single_batch_gradient(case: str, tmp_path: Path) -> None:
    out = tmp_path / "delta.pt"
    mp.spawn(_rank, args=(case, _free_port(), str(out)), nprocs=2)
    _, batch, _ = CASES[case]()
    whole = _step(case, [batch])
    assert (whole - torch.load(out)).abs().max().item() < 1e-5 * max(1.0, whole.abs().max().item())
