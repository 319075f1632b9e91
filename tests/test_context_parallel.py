"""Ulysses context parallelism (gloo, CPU): cp ranks sharing one packed sequence give the
single-process outputs, gradients and training losses; dp x cp on a 2-D DeviceMesh."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_dit_model import PATCH, make_samples, tiny_model

from vidgen.diffusion.flow import flow_loss, interpolate
from vidgen.models.dit import pack_samples, patchify
from vidgen.models.dit.context_parallel import ContextParallel

HEADS = dict(num_heads=4)  # width 32: four heads of 8, so cp = 2 and cp = 4 both divide them


def _noised(packed, seed):
    """packed with x_t, and the (x0, eps) targets per sample, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    x0 = packed.unpack(packed.x)
    eps = [torch.randn(x.shape, generator=g) for x in x0]
    eps_tokens = torch.cat([patchify(e, PATCH) for e in eps])
    xt = interpolate(packed.x, eps_tokens, packed.per_token(packed.t))
    return dataclasses.replace(packed, x=xt), x0, eps


def _loss_and_grads(model, packed, x0, eps, cp=None):
    outs = model.forward_packed(packed, cp=cp)
    loss = flow_loss(outs, x0, eps, packed.weight)
    return outs, loss, torch.autograd.grad(loss, list(model.parameters()))


def _batch(seed):
    (packed,) = pack_samples(make_samples(seed), PATCH, max_tokens=64)
    return _noised(packed, seed)


def _worker(rank, world, cp_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world // cp_size, cp_size), mesh_dim_names=("dp", "cp"))
        cp = ContextParallel.from_group(mesh["cp"].get_group())
        dp_rank = mesh["dp"].get_local_rank()
        assert cp.size == cp_size and cp.rank == rank % cp_size
        model = tiny_model(seed=1, **HEADS).train()
        params = list(model.parameters())

        # one batch per dp group (the cp ranks of a group read the same one)
        batches = [_batch(seed) for seed in range(world // cp_size)]
        packed, x0, eps = batches[dp_rank]
        assert packed.num_tokens % cp_size, "the test wants an uneven split (padding)"
        outs, loss, grads = _loss_and_grads(model, packed, x0, eps, cp)
        ref_outs, ref_loss, _ = _loss_and_grads(model, packed, x0, eps)
        for a, b in zip(outs, ref_outs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)

        # the data-parallel mean over all ranks (what DDP / FSDP do) == the mean over the
        # dp groups' single-process gradients
        ref = [torch.zeros_like(p) for p in params]
        for b in batches:
            for r, g in zip(ref, _loss_and_grads(model, *b)[2]):
                r += g / len(batches)
        grad_err = 0.0
        for g, r in zip(grads, ref):
            g = g.contiguous()
            dist.all_reduce(g)
            torch.testing.assert_close(g / world, r, atol=1e-5, rtol=1e-4)
            grad_err = max(grad_err, float((g / world - r).abs().max()))
        out_err = max(float((a - b).abs().max()) for a, b in zip(outs, ref_outs))
        torch.save(dict(out_err=out_err, grad_err=grad_err, loss=float(loss), ref_loss=float(ref_loss),
                        padded=packed.num_tokens % cp_size != 0), f"{out_dir}/rank{rank}.pt")

        if world == cp_size:  # a few optimiser steps: the same losses as one process
            _train_steps_match(model, cp, batches[0])
    finally:
        dist.destroy_process_group()


def _train_steps_match(model, cp, batch, steps=3):
    reference = tiny_model(seed=1, **HEADS).train()
    reference.load_state_dict(model.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, reference)]
    for _ in range(steps):
        _, loss, grads = _loss_and_grads(model, *batch, cp=cp)
        for p, g in zip(model.parameters(), grads):
            g = g.contiguous()
            dist.all_reduce(g)
            p.grad = g / cp.size
        _, ref_loss, ref_grads = _loss_and_grads(reference, *batch)
        for p, g in zip(reference.parameters(), ref_grads):
            p.grad = g
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        for opt in opts:
            opt.step()


@pytest.mark.parametrize("world, cp_size", [(2, 2), (4, 2), (4, 4)], ids=["cp2", "dp2xcp2", "cp4"])
def test_context_parallel_equals_one_process(tmp_path, world, cp_size):
    mp.spawn(_worker, args=(world, cp_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for res in results:  # every rank: outputs and DP-mean gradients of one process, uneven split
        assert res["padded"]
        assert res["out_err"] < 1e-5 and res["grad_err"] < 1e-4
        assert res["loss"] == pytest.approx(res["ref_loss"], rel=1e-5)


def test_heads_must_divide_by_the_cp_size():
    model = tiny_model()  # two heads
    (packed,) = pack_samples(make_samples(), PATCH, max_tokens=64)
    with pytest.raises(ValueError, match=r"context parallel size 3 must divide .* \(2\); valid sizes: \[1, 2\]"):
        model.forward_packed(packed, cp=ContextParallel(None, 3, 0))


def test_split_pads_the_last_rank():
    shard = ContextParallel(None, 2, 1).shard(5)
    assert (shard.local, shard.padded) == (3, 6)
    assert shard.split(torch.arange(5), fill=9).tolist() == [3, 4, 9]
