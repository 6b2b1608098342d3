"""Data-parallel training on PyTorch's own engine.

`torchrun --nproc_per_node=N -m lmkit pretrain ...` (or `--nproc N`, which hands off to torchrun)
starts N processes; torchrun tells each its RANK, WORLD_SIZE and LOCAL_RANK. Each rank holds a
copy of the model wrapped in DistributedDataParallel (gloo on CPU, NCCL on GPU), which averages
gradients across ranks in backward.

Every rank draws the same global batch from the same seeded sampler and trains on its own slice
of the rows, so `train.batch_size` is the global micro-batch whatever N is, and the sampler state
in a checkpoint resumes any number of ranks. Losses are summed over scored units and divided by
the units of the whole global batch (counted with one all-reduce before the first forward), so
the gradient is the single-process one even when ranks score different numbers of tokens.
Rank 0 alone writes checkpoints, metrics and messages; creating the tokenizer, the prepared data
and the run folder happens on rank 0 while the others wait.

With train.strategy = "fsdp" the model is sharded instead of replicated (FSDP2, `fully_shard`):
each block's parameters, gradients and optimizer state are split across ranks and gathered one
block at a time for forward and backward, so a rank holds about 1/N of them: for models that do
not fit one GPU. Checkpoints hold the full, gathered weights and optimizer state in the usual
format, so an FSDP run resumes on any number of ranks, with either strategy, or in one process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

from lmkit.batches import Batch, map_tensors
from lmkit.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.size > 1


def from_env() -> World:
    """The ranks torchrun describes in the environment; one process when it did not start us."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group when running under torchrun; each GPU rank gets its own device."""
    world = from_env()
    if not world.enabled:
        return world, device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"distributed training runs on cpu (gloo) or cuda (NCCL), not {device.type}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def check_batch(batch_size: int, world: World) -> None:
    if batch_size % world.size:
        raise ConfigError(f"train.batch_size={batch_size} is the global micro-batch and must divide among "
                          f"{world.size} ranks")


def shard(batch: Batch, world: World) -> Batch:
    """This rank's rows of a global batch: a contiguous 1/size of every tensor's first dimension."""
    if not world.enabled:
        return batch
    rows = batch[0].size(0) // world.size
    return map_tensors(batch, lambda t: t[world.rank * rows:(world.rank + 1) * rows])


def main_first(world: World, work: Callable[[], T]) -> T:
    """Run WORK on rank 0, then on the others (which then find its files in place)."""
    if not world.enabled:
        return work()
    if world.is_main:
        result = work()
        dist.barrier()
        return result
    dist.barrier()
    return work()


def broadcast(world: World, value: T) -> T:
    """Rank 0's VALUE, on every rank."""
    if not world.enabled:
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def total(world: World, value: torch.Tensor) -> torch.Tensor:
    """VALUE summed over ranks."""
    if not world.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value


def agree(world: World, finished: bool, signum: int | None) -> tuple[bool, int | None]:
    """(finished, stop signal) as the ranks decide together: a time budget runs out, or a signal
    arrives, at slightly different moments on each rank, and all must stop after the same step."""
    if not world.enabled:
        return finished, signum
    flags = torch.tensor([int(finished), signum or 0])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), int(flags[1]) or None


def mean_metrics(world: World, metrics: dict[str, float], weight: int) -> dict[str, float]:
    """Metrics measured on each rank's part of the validation batches, averaged with WEIGHT, each
    rank's scored units (tokens, examples), as the weight: the loss per token of all of them."""
    if not world.enabled:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([weight, *(metrics[k] * weight for k in keys)], dtype=torch.float64)
    dist.all_reduce(values)
    return {k: (values[i + 1] / values[0]).item() for i, k in enumerate(keys)}


def wrap(model: nn.Module, world: World, strategy: str, unused_parameters: bool = False) -> nn.Module:
    """MODEL ready for data-parallel training on WORLD: a DistributedDataParallel replica, or with
    STRATEGY "fsdp" sharded in place, one FSDP unit per block of every layer stack (nn.ModuleList)
    plus one for the rest (embeddings, tied head, norms). UNUSED_PARAMETERS: DDP must expect
    parameters that get no gradient (a classifier's unused pretraining heads)."""
    if not world.enabled:
        return model
    if strategy == "fsdp":
        for stack in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
            for block in stack:
                fully_shard(block)
        fully_shard(model)
        return model
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=unused_parameters)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered, on rank 0's CPU


def model_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded model's full weights, gathered on rank 0 (every rank must call this; the others
    get an empty dict); None for any other model, whose state_dict() is already whole."""
    return get_model_state_dict(model, options=_FULL) if is_sharded(model) else None


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """OPTIMIZER's state_dict() in the usual layout (parameters numbered in group order), gathered
    on rank 0 when MODEL is sharded (every rank must call this then)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    full = get_optimizer_state_dict(model, optimizer, options=_FULL)  # keyed by parameter name
    if not full:
        return {}
    groups = full["param_groups"]
    index = {name: i for i, name in enumerate(n for group in groups for n in group["params"])}
    return {"state": {index[name]: value for name, value in full["state"].items()},
            "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in groups]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load STATE (the layout optimizer_state returns, full tensors) into OPTIMIZER; each rank of a
    sharded MODEL keeps its own shard."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    full = {"state": {order[int(i)]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                             for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) for micro-batches before the
    last of an accumulation."""
    model = getattr(model, "_orig_mod", model)  # under torch.compile
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(not skip)
    elif skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def batches(source: Iterator[Batch], world: World) -> Iterator[Batch]:
    """This rank's slice of each global batch from SOURCE."""
    for batch in source:
        yield shard(batch, world)


def finish(world: World) -> None:
    """Leave the process group. The barrier first lets gloo's worker threads retire the last
    collectives: one still freeing a tensor (which needs the GIL) while the main thread destroys
    the group (holding the GIL, joining those threads) deadlocks the rank."""
    if world.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
