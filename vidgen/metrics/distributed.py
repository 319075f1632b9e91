"""Summing metric state across ranks, when torch.distributed is initialised.

Metric accumulators keep local sums; `compute()` reduces a copy of them (never the local
state in place, so calling compute twice does not double-count). Every rank must call
`compute()`: the reductions are collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vidgen.utils.distributed import collective_device


def is_distributed() -> bool:
    """True when a process group with more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    # gloo (and the CPU side of "cpu:gloo,cuda:nccl") takes CPU; NCCL alone, CUDA.
    return collective_device(torch.device("cpu"))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of t over all ranks (a new tensor on t's device); t itself is untouched.

    Without an initialised multi-rank process group this is a copy of t.
    """
    if not is_distributed():
        return t.clone()
    buf = t.detach().to(_collective_device(), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def all_reduce_max_int(value: int) -> int:
    """Maximum of an integer over all ranks (e.g. the longest clip seen anywhere)."""
    if not is_distributed():
        return int(value)
    buf = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return int(buf.item())
