"""Stage-3 GAN building blocks: 3D discriminator, hinge, LeCam, R1, adaptive weight."""

import pytest
import torch
from torch import nn

from vidgen.losses.gan import (
    LeCam,
    adaptive_weight,
    gan_start_factor,
    hinge_d_loss,
    hinge_g_loss,
    r1_penalty,
)
from vidgen.models.vae.discriminator import Discriminator3D

# ---------------------------------------------------------------- discriminator


@pytest.fixture(scope="module")
def disc():
    torch.manual_seed(0)
    return Discriminator3D(base_channels=4, num_layers=3, max_channels=16)


@pytest.mark.parametrize("t,h,w", [(1, 32, 32), (5, 32, 48), (9, 40, 32), (17, 32, 32)])
def test_discriminator_shapes(disc, t, h, w):
    x = torch.randn(2, 3, t, h, w)
    out = disc(x)
    assert out.shape == (2, 1, *disc.output_shape(t, h, w))
    assert all(s >= 1 for s in out.shape)
    assert torch.isfinite(out).all()


def test_discriminator_known_shape_and_temporal_downsampling(disc):
    # 17 frames -> 9 -> 5 -> 3 through three stride-2 layers; 32px -> 16 -> 8 -> 4 -> 3 -> 2.
    assert disc.output_shape(17, 32, 32) == (3, 2, 2)
    assert disc.output_shape(1, 64, 64) == (1, 6, 6)


def test_discriminator_has_no_batchnorm_and_sane_init():
    for norm in ("group", "none"):
        d = Discriminator3D(base_channels=8, norm=norm)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in d.modules())
        assert any(isinstance(m, nn.GroupNorm) for m in d.modules()) == (norm == "group")
    big = Discriminator3D(base_channels=64)
    w = big.net[5].weight
    assert abs(w.std().item() - 0.02) < 2e-3 and abs(w.mean().item()) < 1e-3


def test_discriminator_spectral_norm_and_errors():
    d = Discriminator3D(base_channels=4, max_channels=8, spectral_norm=True, norm="none")
    assert d(torch.randn(1, 3, 5, 32, 32)).shape == (1, 1, 1, 2, 2)
    with pytest.raises(ValueError, match="H, W >= 24"):
        d(torch.randn(1, 3, 5, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        d(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="BatchNorm"):
        Discriminator3D(norm="batch")
    with pytest.raises(ValueError, match="odd"):
        Discriminator3D(temporal_kernel=4)


# ---------------------------------------------------------------- hinge


def test_hinge_losses_known_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - x) = [0, 0.5, 2] -> mean 2.5/3
    fake = torch.tensor([[-2.0, 0.0]])  # relu(1 + x) = [0, 1] -> mean 0.5
    expected = 0.5 * (2.5 / 3 + 0.5)
    assert hinge_d_loss(real, fake).item() == pytest.approx(expected)
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)
    assert hinge_g_loss(fake).item() == pytest.approx(1.0)


def test_gan_start_factor():
    assert [gan_start_factor(s, 10) for s in (0, 9, 10, 11)] == [0.0, 0.0, 1.0, 1.0]


# ---------------------------------------------------------------- LeCam


def test_lecam_update_forward_and_state_dict():
    lecam = LeCam(decay=0.9)
    real, fake = torch.full((2, 1, 3), 2.0), torch.full((2, 1, 3), -1.0)
    lecam.update(real, fake)
    assert lecam.ema_real.item() == pytest.approx(0.2)  # 0.9 * 0 + 0.1 * 2
    assert lecam.ema_fake.item() == pytest.approx(-0.1)
    lecam.update(real, fake)
    assert lecam.ema_real.item() == pytest.approx(0.9 * 0.2 + 0.2)

    # relu(2 - ema_fake)^2 + relu(ema_real - (-1))^2
    expected = (2.0 - lecam.ema_fake.item()) ** 2 + (lecam.ema_real.item() + 1.0) ** 2
    real_g = real.clone().requires_grad_(True)
    loss = lecam(real_g, fake)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert real_g.grad is not None and (real_g.grad > 0).all()
    # Logits already on the right side of the anchors cost nothing.
    assert lecam(torch.full((3,), -5.0), torch.full((3,), 5.0)).item() == 0.0

    state = lecam.state_dict()
    assert set(state) == {"ema_real", "ema_fake"}
    resumed = LeCam(decay=0.9)
    resumed.load_state_dict(state)
    for m in (lecam, resumed):  # the two continue identically
        m.update(real, fake)
    assert torch.equal(resumed.ema_real, lecam.ema_real) and torch.equal(
        resumed.ema_fake, lecam.ema_fake
    )


def test_lecam_buffers_stay_fp32_when_module_is_cast():
    lecam = LeCam().to(torch.bfloat16)
    assert lecam.ema_real.dtype == torch.float32 and lecam.ema_fake.dtype == torch.float32


# ---------------------------------------------------------------- R1


def test_r1_penalty_positive_and_trains_discriminator(disc):
    torch.manual_seed(1)
    real = torch.randn(2, 3, 5, 32, 32)
    disc.zero_grad()
    penalty = r1_penalty(disc, real)
    assert penalty.ndim == 0 and penalty.item() > 0
    penalty.backward()  # needs create_graph=True inside
    grads = [p.grad for p in disc.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert real.grad is None  # the caller's tensor is left alone


def test_r1_penalty_matches_analytic_value_for_linear_d():
    # D(x) = sum(a * x) per sample -> grad_x = a, penalty = ||a||^2.
    a = torch.tensor([1.0, -2.0, 3.0])

    class Linear(nn.Module):
        def forward(self, x):
            return (x * a).sum(dim=1)

    assert r1_penalty(Linear(), torch.randn(4, 3)).item() == pytest.approx(14.0)


# ---------------------------------------------------------------- adaptive weight


def test_adaptive_weight_equals_hand_computed_ratio():
    # out_i = 1.5 * w_i; nll = sum(out^2) -> d/dw_i = 4.5 w_i; g = -3 sum(out) -> d/dw_i = -4.5.
    w = torch.tensor([1.0, 2.0], requires_grad=True)  # stands in for the last layer's weight
    out = 1.5 * w
    nll = out.pow(2).sum()
    g = -3.0 * out.sum()
    nll_grad_norm = 4.5 * (1.0**2 + 2.0**2) ** 0.5
    g_grad_norm = 4.5 * 2**0.5
    weight = adaptive_weight(nll, g, w)
    assert weight.item() == pytest.approx(nll_grad_norm / (g_grad_norm + 1e-4), rel=1e-6)
    assert not weight.requires_grad
    # No .grad was written, and the graph survives for the step's real backward.
    assert w.grad is None
    (nll + weight * g).backward()
    assert torch.allclose(w.grad, 4.5 * w.detach() - 4.5 * weight)


def test_adaptive_weight_clamped_and_errors():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    nll = (w**2).sum()
    g_flat = (w * 1e-12).sum()  # almost no GAN gradient -> huge ratio -> clamp
    assert adaptive_weight(nll, g_flat, w, max_weight=7.0).item() == 7.0
    with pytest.raises(ValueError, match="does not depend"):
        other = torch.ones(2, requires_grad=True)
        adaptive_weight(nll, (other * 2).sum(), w)
    with torch.no_grad():
        with pytest.raises(ValueError, match="validation"):
            adaptive_weight((w**2).sum(), w.sum(), w)
