"""Per-frame PSNR / SSIM / LPIPS against scikit-image and the lpips package."""

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vidgen.metrics.frames import PSNR_MAX, lpips_per_frame, psnr_per_frame, ssim_per_frame


def _video_pair(seed=0, shape=(2, 3, 3, 24, 20)):
    """A video and a noisy, clamped copy of it, [B, C, T, H, W] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    y = (x + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)
    return x, y


def test_psnr_matches_skimage_per_frame():
    x, y = _video_pair()
    ours = psnr_per_frame(x, y)
    assert ours.shape == (2, 3) and ours.dtype == torch.float64
    for b in range(2):
        for t in range(3):
            ref = peak_signal_noise_ratio(
                x[b, :, t].double().numpy(), y[b, :, t].double().numpy(), data_range=1
            )
            assert ours[b, t].item() == pytest.approx(ref, abs=1e-9)


@pytest.mark.parametrize("channels", [3, 1])
def test_ssim_matches_skimage_per_frame(channels):
    x, y = _video_pair(seed=1, shape=(2, channels, 3, 24, 20))
    ours = ssim_per_frame(x, y, chunk=4)  # chunk not dividing B*T=6: exercises the tail chunk
    assert ours.shape == (2, 3) and ours.dtype == torch.float64
    for b in range(2):
        for t in range(3):
            ref = structural_similarity(
                x[b, :, t].double().numpy(),
                y[b, :, t].double().numpy(),
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=1,
                channel_axis=0,
            )
            assert ours[b, t].item() == pytest.approx(ref, abs=1e-9)


def test_ssim_on_smooth_images_matches_skimage():
    # Smooth, highly correlated frames: the regime where variance cancellation bites.
    h = w = 32
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = (0.5 + 0.4 * torch.sin(6 * xx) * torch.cos(4 * yy)).expand(1, 3, 2, h, w).contiguous()
    other = (base * 0.98 + 0.01).clamp(0, 1)
    ours = ssim_per_frame(base, other)
    ref = structural_similarity(
        base[0, :, 0].double().numpy(),
        other[0, :, 0].double().numpy(),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1,
        channel_axis=0,
    )
    assert ours[0, 0].item() == pytest.approx(ref, abs=1e-9)


def test_identical_videos_give_psnr_cap_and_ssim_one():
    x, _ = _video_pair()
    assert PSNR_MAX == pytest.approx(100.0)
    assert torch.allclose(
        psnr_per_frame(x, x.clone()), torch.full((2, 3), 100.0, dtype=torch.float64)
    )
    assert torch.allclose(
        ssim_per_frame(x, x.clone()), torch.ones(2, 3, dtype=torch.float64), atol=1e-12
    )


def test_frame_metrics_reject_bad_inputs():
    x, y = _video_pair()
    with pytest.raises(ValueError, match=r"expected \[0, 1\]"):
        psnr_per_frame(x * 2 - 1, y)  # a [-1, 1] video where [0, 1] is expected
    with pytest.raises(ValueError, match="equal shape"):
        ssim_per_frame(x, y[:, :, :2])
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        psnr_per_frame(x[0], y[0])
    small = torch.rand(1, 3, 2, 8, 16)
    with pytest.raises(ValueError, match="at least 11x11 pixels, got 8x16"):
        ssim_per_frame(small, small)


def test_lpips_per_frame_matches_direct_calls():
    from vidgen.losses.lpips import build_lpips

    torch.manual_seed(0)
    model = build_lpips("alex", random_backbone=True)
    x01, y01 = _video_pair(seed=2, shape=(2, 3, 3, 32, 32))
    x, y = x01 * 2 - 1, y01 * 2 - 1
    ours = lpips_per_frame(x, y, model, chunk=4)
    assert ours.shape == (2, 3)
    with torch.no_grad():
        for b in range(2):
            for t in range(3):
                ref = model(x[b, :, t][None], y[b, :, t][None]).item()
                assert ours[b, t].item() == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert np.all(ours.numpy() > 0)
    assert torch.allclose(lpips_per_frame(x, x.clone(), model), torch.zeros(2, 3), atol=1e-6)
