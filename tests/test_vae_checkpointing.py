"""Activation checkpointing: same loss and gradients as without, on both execution paths."""

import pytest
import torch

from vidgen.models.vae import WanVAE
from vidgen.models.vae.layers import ResidualBlock


def tiny_vae() -> WanVAE:
    torch.manual_seed(0)
    vae = WanVAE(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1, dropout=0.1)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae.train()  # dropout on: checkpointing must replay the same dropout masks


def _loss_and_grads(vae: WanVAE, x: torch.Tensor, chunked: bool):
    vae.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    if chunked:
        mu, logvar = vae.encode(x, chunked=True)
        recon = vae.decode(mu + 0.1 * logvar, chunked=True, clamp=False)
    else:
        recon, mu, logvar = vae(x, generator=torch.Generator().manual_seed(7))
    loss = (recon - x).abs().mean() + 1e-3 * mu.pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in vae.named_parameters()}


@pytest.mark.parametrize("chunked", [False, True])
def test_checkpointing_gives_the_same_gradients(chunked):
    vae = tiny_vae()
    x = torch.randn(1, 3, 5, 16, 16)
    loss_ref, grads_ref = _loss_and_grads(vae, x, chunked)

    calls = []
    block = vae.decoder.up_blocks[0].resnets[0]
    assert isinstance(block, ResidualBlock)
    # a pre-hook: recomputation stops early, right after the last tensor backward needs
    hook = block.register_forward_pre_hook(lambda *args: calls.append(1))
    vae.enable_gradient_checkpointing()
    assert vae.gradient_checkpointing and vae.decoder.gradient_checkpointing
    loss_ckpt, grads_ckpt = _loss_and_grads(vae, x, chunked)
    hook.remove()

    decoder_calls = 2 if chunked else 1  # one per latent frame in the chunked path
    assert len(calls) == 2 * decoder_calls  # forward + recomputation in backward
    torch.testing.assert_close(loss_ckpt, loss_ref, rtol=1e-6, atol=1e-7)
    assert grads_ckpt.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_is_skipped_without_grad():
    vae = tiny_vae().eval().enable_gradient_checkpointing()
    x = torch.randn(1, 3, 5, 16, 16)
    with torch.no_grad():
        mu, _ = vae.encode(x, chunked=True)
    vae.enable_gradient_checkpointing(False)
    assert not vae.gradient_checkpointing
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(x, chunked=True)[0], mu)


@pytest.mark.parametrize("bias", [False, True])
def test_memory_lean_norm_silu_has_exact_gradients(bias):
    """RMSNorm(silu=True) saves only its input and recomputes in backward: check vs autograd."""
    from vidgen.models.vae.layers import RMSNorm

    norm = RMSNorm(5, bias=bias).double()
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 5, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: norm(x, silu=True), (x,))
    fused = norm(x, silu=True)
    plain = torch.nn.functional.silu(norm(x))
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)
    g = torch.randn_like(fused)
    params = [x, *norm.parameters()]
    for a, b in zip(torch.autograd.grad(fused, params, g), torch.autograd.grad(plain, params, g)):
        torch.testing.assert_close(a, b)
