"""Ulysses context parallelism: one packed token sequence split across the ranks of a group.

Every rank of a context-parallel (cp) group holds 1/cp of the packed sequence's tokens
(padded to a multiple of cp). Per-token work (patch embedding, modulation, feed-forward,
RoPE, the output head) runs on the local slice. Attention needs the whole sequence: an
all-to-all turns [1, N/cp, H, D] (local tokens, all heads) into [1, N, H/cp, D] (all tokens,
H/cp heads), any backend runs on that with the packed offsets unchanged (the padding tail is
cut off first, so it is attended by nothing and attends to nothing), and a second all-to-all
goes back. Text and image keys are replicated on every rank, so cross-attention takes this
rank's heads of them and needs the all-to-all for the queries only.

Gradients: every rank must end with the same loss. Training takes each rank's loss on its
own tokens and sums it over the group (``SequenceShard.sum``); ``WanDiT.forward_packed``
all-gathers the output instead (``gather``). Both backwards sum the ranks' gradients (as
torch's differentiable collectives do), so each rank's parameter gradients are cp x its
share, and the data-parallel mean over all ranks (DDP, FSDP) gives the gradient of the
uninterrupted single-process step.

As in DeepSpeed-Ulysses, the number of heads must divide by the cp size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .attention import attention


def check_heads(cp_size: int, num_heads: int) -> None:
    """Ulysses splits the heads across the cp ranks: ``cp_size`` must divide ``num_heads``."""
    if num_heads % cp_size:
        valid = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"context parallel size {cp_size} must divide the number of attention heads "
            f"({num_heads}); valid sizes: {valid}"
        )


def context_parallel_group(cp_size: int, device_type: str) -> ContextParallel:
    """This rank's cp group in a 2-D DeviceMesh ("dp", "cp") over every rank: the cp ranks of
    a group are neighbours (ranks [g * cp_size, (g + 1) * cp_size) form data-parallel group g)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError(
            f"context_parallel={cp_size} needs torch.distributed: launch with trainer.devices x "
            "trainer.num_nodes a multiple of it (trainer=ddp or trainer=fsdp2)"
        )
    world = dist.get_world_size()
    if cp_size < 1 or world % cp_size:
        raise ValueError(
            f"context_parallel={cp_size} must divide the world size {world} (trainer.devices x "
            f"trainer.num_nodes); valid: {[d for d in range(1, world + 1) if world % d == 0]}"
        )
    mesh = init_device_mesh(device_type, (world // cp_size, cp_size), mesh_dim_names=("dp", "cp"))
    return ContextParallel.from_group(mesh["cp"].get_group())


@dataclass(frozen=True)
class ContextParallel:
    """A cp group: ``group`` (None = the default group), its ``size`` and this rank in it."""

    group: object
    size: int
    rank: int

    @classmethod
    def from_group(cls, group=None) -> ContextParallel:
        if not dist.is_initialized():
            raise RuntimeError("context parallelism needs torch.distributed to be initialised")
        return cls(group, dist.get_world_size(group), dist.get_rank(group))

    def check_heads(self, num_heads: int) -> None:
        check_heads(self.size, num_heads)

    def shard(self, num_tokens: int) -> SequenceShard:
        """The plan for a sequence of ``num_tokens`` real tokens."""
        return SequenceShard(self, num_tokens, math.ceil(num_tokens / self.size))


@dataclass(frozen=True)
class SequenceShard:
    """This rank's slice [rank * local, (rank + 1) * local) of a sequence padded to size * local."""

    cp: ContextParallel
    total: int
    local: int

    @property
    def padded(self) -> int:
        return self.local * self.cp.size

    def split(self, t: Tensor, fill: Tensor | float = 0) -> Tensor:
        """[total, ...] -> this rank's [local, ...]; the padding repeats ``fill``."""
        pad = self.padded - self.total
        if pad:
            fill = torch.as_tensor(fill, dtype=t.dtype, device=t.device)
            t = torch.cat([t, fill.expand(pad, *t.shape[1:])])
        return t[self.cp.rank * self.local : (self.cp.rank + 1) * self.local]

    def sum(self, t: Tensor) -> Tensor:
        """The sum of ``t`` over the group's ranks, on every rank (differentiable like gather:
        its backward sums the ranks' gradients)."""
        return _Sum.apply(t, self.cp)

    def gather(self, t: Tensor) -> Tensor:
        """This rank's [local, ...] -> the whole [total, ...] on every rank (differentiable)."""
        return _Gather.apply(t, self.cp)[: self.total]

    def attention(self, q: Tensor, k: Tensor, v: Tensor, kv_local: bool, **kwargs) -> Tensor:
        """``attention`` over the whole sequence for local queries q [1, local, H, D].

        kv_local: k, v are local tokens too (self-attention); else they are replicated
        (text / image keys) and this rank takes its heads of them.
        """
        heads = q.shape[2] // self.cp.size
        q = _Exchange.apply(q, self.cp, True)[:, : self.total]
        if kv_local:
            k = _Exchange.apply(k, self.cp, True)[:, : self.total]
            v = _Exchange.apply(v, self.cp, True)[:, : self.total]
        else:
            k = k[:, :, self.cp.rank * heads : (self.cp.rank + 1) * heads]
            v = v[:, :, self.cp.rank * heads : (self.cp.rank + 1) * heads]
        out = attention(q, k, v, **kwargs)
        out = F.pad(out, (0, 0, 0, 0, 0, self.padded - self.total))
        return _Exchange.apply(out, self.cp, False)


# ---- collectives with their adjoints ----


def _all_to_all(x: Tensor, cp: ContextParallel) -> Tensor:
    """Chunk j of dim 0 goes to rank j; chunk j of the result came from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=cp.group)
    return out


def _seq_to_heads(x: Tensor, cp: ContextParallel) -> Tensor:
    """[1, n, H, D] local tokens -> [1, cp * n, H / cp, D] all tokens, this rank's heads."""
    _, n, h, d = x.shape
    x = x[0].unflatten(1, (cp.size, h // cp.size)).transpose(0, 1)  # [cp, n, H/cp, D]
    return _all_to_all(x, cp).flatten(0, 1)[None]


def _heads_to_seq(x: Tensor, cp: ContextParallel) -> Tensor:
    """The inverse of ``_seq_to_heads``."""
    _, total, h, d = x.shape
    x = _all_to_all(x[0].unflatten(0, (cp.size, total // cp.size)), cp)  # [cp, n, H/cp, D]
    return x.transpose(0, 1).flatten(1, 2)[None]


class _Exchange(torch.autograd.Function):
    """``_seq_to_heads`` (to_heads=True) or ``_heads_to_seq``; each is the other's adjoint."""

    @staticmethod
    def forward(ctx, x, cp, to_heads):
        ctx.cp, ctx.to_heads = cp, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, cp)

    @staticmethod
    def backward(ctx, grad):
        return (_heads_to_seq if ctx.to_heads else _seq_to_heads)(grad, ctx.cp), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cp):
        ctx.cp = cp
        parts = [torch.empty_like(x) for _ in range(cp.size)]
        dist.all_gather(parts, x.contiguous(), group=cp.group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.cp.group)
        local = grad.shape[0] // ctx.cp.size
        return grad[ctx.cp.rank * local : (ctx.cp.rank + 1) * local], None


class _Sum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cp):
        ctx.cp = cp
        out = x.clone()
        dist.all_reduce(out, group=cp.group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.cp.group)
        return grad, None
