"""The collectives training code uses, with tensors on the device the backend serves.

NCCL moves CUDA tensors only and gloo CPU tensors, so a CPU flag all-reduced under NCCL
fails at the first step of a multi-GPU run. Every collective of the training modules
goes through these helpers: each puts its buffer on `collective_device` and hands the
result back on the caller's device. They act whenever a process group is up, world size
1 included, so a one-GPU `trainer=ddp trainer.devices=1` run exercises the same code as
an eight-GPU one; without a process group they are no-ops.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["initialized", "collective_device", "all_ranks_true", "all_reduce_mean_", "average_grads_",
           "broadcast_"]


def initialized() -> bool:
    """True when a torch.distributed process group is up (any world size)."""
    return dist.is_available() and dist.is_initialized()


def collective_device(like: torch.device) -> torch.device:
    """Where a collective's buffer must live: CUDA under NCCL, CPU under gloo; with a
    mixed backend ("cpu:gloo,cuda:nccl") the tensor's own device picks the backend."""
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if "gloo" in backend and "nccl" not in backend:
        return torch.device("cpu")
    return like


def all_ranks_true(flag: torch.Tensor) -> bool:
    """True only if the 0-d `flag` is true on every rank (a MIN all-reduce); every rank
    must call it, in the same order. Costs one device sync."""
    if initialized():
        buf = flag.detach().to(collective_device(flag.device), torch.int32)
        dist.all_reduce(buf, op=dist.ReduceOp.MIN)
        flag = buf
    return bool(flag.item())


def _by_dtype(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


@torch.no_grad()
def all_reduce_mean_(tensors: Iterable[torch.Tensor]) -> None:
    """Average tensors over ranks in place: one flat buffer (one collective) per dtype."""
    if not initialized():
        return
    for group in _by_dtype(tensors):
        flat = _flatten_dense_tensors([t.detach().to(collective_device(t.device)) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= dist.get_world_size()
        for t, mean in zip(group, _unflatten_dense_tensors(flat, group)):
            t.copy_(mean)


@torch.no_grad()
def average_grads_(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of `params` over ranks as DDP does (sum / world size), for
    parameters kept out of DDP's reducer. A parameter without a gradient on some rank (not
    used by its batch) counts as zero there; one without a gradient on every rank keeps
    `grad=None`, so the optimizer leaves it alone as it would in a single-process run."""
    if not initialized():
        return
    for group in _by_dtype(params):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
        used = torch.tensor([float(p.grad is not None) for p in group], dtype=group[0].dtype,
                            device=group[0].device)
        device = collective_device(group[0].device)
        flat = _flatten_dense_tensors([t.detach().to(device) for t in [*grads, used]])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        *sums, users = _unflatten_dense_tensors(flat, [*grads, used])
        world = dist.get_world_size()
        for p, total, n in zip(group, sums, users.tolist()):
            p.grad = (total / world).to(p.device) if n > 0 else None


@torch.no_grad()
def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite tensors in place with rank `src`'s values: one collective per dtype."""
    if not initialized():
        return
    for group in _by_dtype(tensors):
        flat = _flatten_dense_tensors([t.detach().to(collective_device(t.device)) for t in group])
        dist.broadcast(flat, src=src)
        for t, value in zip(group, _unflatten_dense_tensors(flat, group)):
            t.copy_(value)
