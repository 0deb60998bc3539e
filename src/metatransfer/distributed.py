"""torchrun support: the same commands run as one process or as N ranks of torch.distributed.

Nothing here is active in a plain `mtl ...` process (world size 1: every helper is the identity).
Under torchrun (RANK/WORLD_SIZE set) the process group is started with nccl on CUDA and gloo on
CPU; pre-training is data parallel, meta-training splits the tasks of a meta-batch across ranks and
all-reduces the gradients, meta-test splits episodes. Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

S = TypeVar("S", np.ndarray, torch.Tensor, list)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


_CONTEXT: DistContext | None = None


def context() -> DistContext:
    """The process's place in the job, starting the process group on first use under torchrun."""
    global _CONTEXT
    if _CONTEXT is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if world > 1 and not torch_dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local)
            # A rank that dies makes the others fail at their next collective within this timeout.
            timeout = datetime.timedelta(seconds=float(os.environ.get("MTL_DIST_TIMEOUT", "1800")))
            torch_dist.init_process_group(backend=backend, timeout=timeout)
            # Left to interpreter teardown, the backend's threads can be destroyed while still joinable,
            # and the rank aborts ("terminate called without an active exception") after its work is done.
            atexit.register(_close_process_group)
        _CONTEXT = DistContext(rank, world, local)
    return _CONTEXT


def _close_process_group() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier() -> None:
    if context().active:
        torch_dist.barrier()


def broadcast_flag(value: bool) -> bool:
    """Rank 0's boolean, on every rank (e.g. whether the run directory is being resumed)."""
    if not context().active:
        return value
    t = torch.tensor([int(value)], dtype=torch.int64)
    torch_dist.broadcast(t, src=0)
    return bool(t.item())


def rank_share(items: S) -> S:
    """This rank's contiguous share of `items` (an array, tensor or list), in order; shares differ by at most one."""
    ctx = context()
    if not ctx.active:
        return items
    n = len(items)
    return items[n * ctx.rank // ctx.world_size : n * (ctx.rank + 1) // ctx.world_size]


def gather_rows(rows: np.ndarray) -> np.ndarray:
    """Concatenate every rank's `rows` along axis 0, in rank order (the inverse of `rank_share`)."""
    ctx = context()
    if not ctx.active:
        return rows
    parts: list[np.ndarray | None] = [None] * ctx.world_size
    torch_dist.all_gather_object(parts, rows)
    return np.concatenate([p for p in parts if p is not None])


def wrap_data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel under torchrun (gradients averaged across ranks), the model itself otherwise."""
    if not context().active:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_reduce_grads(params: list[torch.Tensor], world_weight: float = 1.0) -> None:
    """Sum each parameter's gradient over ranks and scale by `world_weight` (e.g. 1/world for a mean)."""
    if not context().active:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch_dist.all_reduce(p.grad, op=torch_dist.ReduceOp.SUM)
        if world_weight != 1.0:
            p.grad.mul_(world_weight)
