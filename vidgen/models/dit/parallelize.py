"""Parallelism applied to a built `WanDiT`, apart from the model and from training (as
torchtitan's ``parallelize.py``): compiling per block, FSDP2 sharding, and the sharded-tensor
helpers that checkpoints and exports use.

    dit = build_wan_dit("1.3B")
    compile_blocks(dit)                          # optional
    apply_fsdp(dit, "cuda", FsdpOptions(param_dtype="bfloat16"))
    full = gather_full(ema.shadow, keep=rank == 0)   # every rank calls it, in the same order

Parameters shard over every rank of the world, whatever other mesh the run uses: with context
parallelism over the (dp, cp) mesh flattened, as torchtitan shards over dp_shard x cp; the
gradient mean over all ranks is then the data-parallel mean (context_parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

DTYPE_NAMES = (None, "float32", "bfloat16", "float16")


@dataclass
class FsdpOptions:
    """``model.fsdp`` (trainer=fsdp2 only): FSDP2's mixed precision and resharding."""

    param_dtype: str | None = None      # e.g. bfloat16: FSDP2 mixed precision instead of autocast
    reduce_dtype: str | None = None     # gradient reduce-scatter dtype (None: param_dtype)
    reshard_after_forward: bool = True  # False: keep gathered weights for backward (more memory)

    def __post_init__(self):
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) not in DTYPE_NAMES:
                raise ValueError(f"model.fsdp.{name}={getattr(self, name)!r}; valid: null, float32, "
                                 "bfloat16, float16")


def compile_blocks(dit: nn.Module) -> None:
    """torch.compile each transformer block (dynamic shapes): names and checkpoints stay the same."""
    for block in dit.blocks:
        block.compile(dynamic=True)


def apply_fsdp(dit: nn.Module, device_type: str, options: FsdpOptions) -> None:
    """Shard every block, then the root, over all ranks with FSDP2 (``fully_shard``), in place.

    The packed forwards are registered with FSDP so that they gather and free the weights as
    ``forward`` does. Needs an initialised process group.
    """
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
    dtype = lambda name: getattr(torch, name) if name else None  # noqa: E731
    mp = MixedPrecisionPolicy(param_dtype=dtype(options.param_dtype), reduce_dtype=dtype(options.reduce_dtype))
    for block in dit.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=options.reshard_after_forward)
    fully_shard(dit, mesh=mesh, mp_policy=mp, reshard_after_forward=options.reshard_after_forward)
    for method in ("forward_packed", "forward_packed_tokens"):  # FSDP hooks only wrap forward()
        register_fsdp_forward_method(dit, method)


def is_dtensor(t) -> bool:
    return isinstance(t, DTensor)


def gather_full(tensors: dict[str, Tensor], keep: bool) -> dict[str, Tensor]:
    """Full CPU copies of (possibly sharded) tensors, one at a time; {} where not ``keep``.

    Every rank must call this (``full_tensor`` is a collective) in the same order.
    """
    out = {}
    for name, t in tensors.items():
        full = t.full_tensor() if is_dtensor(t) else t
        if keep:
            out[name] = full.detach().cpu().clone()
    return out


def distribute_like(mine: dict[str, Tensor], theirs: dict[str, Tensor]) -> dict[str, Tensor]:
    """``theirs`` (full tensors, e.g. from a checkpoint) sharded as ``mine`` are, name by name."""
    return {k: distribute_tensor(v.to(mine[k].device), mine[k].device_mesh, mine[k].placements)
            if is_dtensor(mine.get(k)) else v for k, v in theirs.items()}


def full_state_dict(dit: nn.Module, sharded: bool) -> dict[str, Tensor]:
    """The model's full state dict: gathered to CPU on rank 0 when ``sharded`` (a collective)."""
    if not sharded:
        return dit.state_dict()
    return get_model_state_dict(dit, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
