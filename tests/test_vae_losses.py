"""Reconstruction losses: reductions on known inputs and the mapping to the summed recipe."""

import math

import pytest
import torch

from vidgen.losses.recon import kl_loss, l1_loss, lpips_loss, vae_loss


class MeanAbsPerImage(torch.nn.Module):
    """A stand-in for LPIPS with a known value: mean |a - b| per image, shape [N, 1, 1, 1]."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, a, b):
        self.seen.append(a.shape)
        return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)


def test_l1_is_the_mean_over_elements():
    x = torch.zeros(2, 3, 5, 4, 4)
    recon = torch.zeros_like(x)
    recon[0] = 2.0  # half the elements off by 2
    assert l1_loss(x, recon).item() == pytest.approx(1.0)


def test_kl_is_summed_over_the_latent_and_divided_by_input_elements():
    mu = torch.zeros(2, 4, 2, 3, 3)
    logvar = torch.zeros_like(mu)
    assert kl_loss(mu, logvar, num_elements=100).item() == 0.0  # N(0, 1) has no KL
    mu.fill_(1.0)  # KL per element = 0.5 * mu^2 = 0.5, 72 latent elements per sample
    assert kl_loss(mu, logvar, num_elements=1).item() == pytest.approx(36.0)
    assert kl_loss(mu, logvar, num_elements=72).item() == pytest.approx(0.5)
    logvar.fill_(math.log(2.0))  # 0.5 * (1 + 2 - 1 - log 2) per element
    expected = 72 * 0.5 * (2.0 - math.log(2.0)) / 10
    assert kl_loss(mu, logvar, num_elements=10).item() == pytest.approx(expected, rel=1e-6)


def test_vae_loss_combines_the_terms_with_the_stated_reductions():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 5, 8, 8) * 2 - 1
    recon = x + 0.1 * torch.randn_like(x)
    mu, logvar = torch.randn(2, 4, 2, 1, 1), 0.1 * torch.randn(2, 4, 2, 1, 1)
    fake_lpips = MeanAbsPerImage()
    total, logs = vae_loss(
        x, recon, mu, logvar, l1_weight=3.0, kl_weight=3e-6, lpips_weight=3.0, lpips_fn=fake_lpips
    )
    assert fake_lpips.seen == [torch.Size([10, 3, 8, 8])]  # every frame of every clip

    pixels = 3 * 5 * 8 * 8
    l1 = (x - recon).abs().mean()
    kl = (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).sum(dim=(1, 2, 3, 4)).mean() / pixels
    torch.testing.assert_close(logs["l1"], l1)
    torch.testing.assert_close(logs["kl"], kl)
    torch.testing.assert_close(logs["lpips"], l1)  # the stand-in is per-image mean |x - recon|
    torch.testing.assert_close(total, 3 * l1 + 3e-6 * kl + 3 * l1)
    assert logs["total"] == total.detach() and all(not v.requires_grad for v in logs.values())

    # The summed recipe (LDM / Wan2.1: sums per sample, LPIPS added at every pixel, batch mean)
    # is exactly `pixels` times ours with the same weights.
    l1_sum = (x - recon).abs().sum(dim=(1, 2, 3, 4)).mean()
    kl_sum = (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).sum(dim=(1, 2, 3, 4)).mean()
    lpips_per_pixel = (x - recon).abs().mean(dim=(1, 3, 4), keepdim=True).expand_as(x)
    summed = 3 * l1_sum + 3e-6 * kl_sum + 3 * lpips_per_pixel.sum(dim=(1, 2, 3, 4)).mean()
    torch.testing.assert_close(total * pixels, summed, rtol=1e-5, atol=1e-5)


def test_lpips_on_a_random_frame_subset():
    x = torch.zeros(2, 3, 6, 4, 4)
    recon = torch.zeros_like(x)
    recon[:, :, 3] = 1.0  # only frame 3 differs
    fake = MeanAbsPerImage()
    all_frames = lpips_loss(x, recon, fake)
    assert all_frames.item() == pytest.approx(1 / 6)
    values = {
        lpips_loss(x, recon, fake, frames=2, generator=torch.Generator().manual_seed(s)).item()
        for s in range(20)
    }
    assert values == {0.0, 0.5}  # frame 3 drawn or not, out of 2 scored frames
    assert fake.seen[-1] == torch.Size([4, 3, 4, 4])  # 2 frames x 2 clips
    a = lpips_loss(x, recon, fake, frames=2, generator=torch.Generator().manual_seed(3))
    b = lpips_loss(x, recon, fake, frames=2, generator=torch.Generator().manual_seed(3))
    assert a == b
    assert lpips_loss(x, recon, fake, frames=10).item() == pytest.approx(1 / 6)  # T <= frames: all


def test_vae_loss_errors():
    x = torch.zeros(1, 3, 1, 8, 8)
    mu = torch.zeros(1, 4, 1, 1, 1)
    with pytest.raises(ValueError, match="lpips_weight=1.0 needs lpips_fn"):
        vae_loss(x, x, mu, mu, l1_weight=1.0, kl_weight=1e-6, lpips_weight=1.0)
    with pytest.raises(ValueError, match="loss weights must be >= 0"):
        vae_loss(x, x, mu, mu, l1_weight=-1.0, kl_weight=0.0, lpips_weight=0.0)
    with pytest.raises(ValueError, match="lpips_frames must be >= 1"):
        lpips_loss(x, x, MeanAbsPerImage(), frames=0)
    with pytest.raises(ValueError, match=r"shapes differ"):
        l1_loss(x, x[:, :, :, :4])
    total, logs = vae_loss(x, x, mu, mu, l1_weight=1.0, kl_weight=1.0, lpips_weight=0.0)
    assert total.item() == 0.0 and "lpips" not in logs


@pytest.mark.filterwarnings(
    "ignore:.*(pretrained|weight enum).*:UserWarning"
)  # torchvision, via lpips
def test_with_the_real_lpips_network():
    from vidgen.losses.lpips import build_lpips

    lpips_fn = build_lpips(net="alex", random_backbone=True)
    torch.manual_seed(0)
    x = torch.rand(1, 3, 2, 64, 64) * 2 - 1
    recon = (x + 0.2 * torch.randn_like(x)).requires_grad_()
    total, logs = vae_loss(
        x,
        recon,
        torch.zeros(1, 4, 1, 8, 8),
        torch.zeros(1, 4, 1, 8, 8),
        l1_weight=1.0,
        kl_weight=1e-6,
        lpips_weight=1.0,
        lpips_fn=lpips_fn,
        lpips_frames=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert logs["lpips"] > 0
    total.backward()
    assert recon.grad.abs().sum() > 0
    _, same = vae_loss(
        x,
        x,
        torch.zeros(1, 4, 1, 8, 8),
        torch.zeros(1, 4, 1, 8, 8),
        l1_weight=1.0,
        kl_weight=1e-6,
        lpips_weight=1.0,
        lpips_fn=lpips_fn,
    )
    assert same["lpips"].abs() < 1e-6
