"""Per-frame image metrics for videos: PSNR, SSIM, LPIPS.

Every function takes a pair of videos `[B, C, T, H, W]` and returns one value per frame,
`[B, T]` (float64 for PSNR/SSIM, float32 for LPIPS), so callers can average over frames,
then over videos, and also keep per-timestep curves.

Conventions (stated once, used everywhere):
- PSNR and SSIM take values in [0, 1] (data range 1) and are computed in float64, so they
  agree with scikit-image to ~1e-10 whatever the input dtype.
- PSNR of identical frames is +inf mathematically. We clamp the per-frame MSE to
  `MSE_FLOOR = 1e-10`, which caps PSNR at `PSNR_MAX = 100` dB. Averages stay finite and a
  perfect frame counts as "100 dB", far above any real reconstruction (~25-40 dB).
- SSIM is the Wang et al. (2004) index with an 11x11 Gaussian window (sigma 1.5), K1 0.01,
  K2 0.03, population (not sample) covariances, averaged over the "valid" region (pixels
  whose window lies inside the frame), per channel, then over channels. This matches
  `skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=...)` exactly: skimage filters
  with reflect padding but then crops the 5-pixel border, so the padding never counts.
- LPIPS takes values in [-1, 1] (the lpips package's convention).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MSE_FLOOR = 1e-10
PSNR_MAX = 10.0 * math.log10(1.0 / MSE_FLOOR)  # 100 dB

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # skimage: int(truncate * sigma + 0.5) with truncate 3.5 -> 11x11 window
SSIM_K1, SSIM_K2 = 0.01, 0.03

# Values outside the stated range by more than this are a caller bug (e.g. [-1, 1] passed
# where [0, 1] is expected); smaller excursions are float rounding.
_RANGE_TOL = 1e-4


# --------------------------------------------------------------------------------------
# Input checks and reshaping
# --------------------------------------------------------------------------------------


def _check_pair(x: torch.Tensor, y: torch.Tensor, lo: float, hi: float, fn: str) -> None:
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise TypeError(f"{fn} expects two tensors, got {type(x).__name__}, {type(y).__name__}")
    if x.dim() != 5:
        raise ValueError(f"{fn} expects videos [B, C, T, H, W], got shape {tuple(x.shape)}")
    if x.shape != y.shape:
        raise ValueError(
            f"{fn} needs videos of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    for name, v in (("x", x), ("y", y)):
        vmin, vmax = v.min().item(), v.max().item()
        if vmin < lo - _RANGE_TOL or vmax > hi + _RANGE_TOL:
            raise ValueError(
                f"{fn}: {name} has values in [{vmin:.4g}, {vmax:.4g}], expected [{lo:g}, {hi:g}] "
                "(convert with (v + 1) / 2 from [-1, 1], and clamp model outputs first)"
            )


def video_to_frames(v: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W], frames of video b at rows b*T ... b*T + T-1."""
    b, c, t, h, w = v.shape
    return v.transpose(1, 2).reshape(b * t, c, h, w)


# --------------------------------------------------------------------------------------
# PSNR
# --------------------------------------------------------------------------------------


@torch.no_grad()
def psnr_per_frame(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each frame, data range 1.

    x, y: [B, C, T, H, W] in [0, 1].
    Returns [B, T] float64; identical frames give PSNR_MAX (100 dB), see module docstring.
    """
    _check_pair(x, y, 0.0, 1.0, "psnr_per_frame")
    diff = x.double() - y.double()
    mse = diff.square().mean(dim=(1, 3, 4))  # [B, T]
    return 10.0 * torch.log10(1.0 / mse.clamp_min(MSE_FLOOR))


# --------------------------------------------------------------------------------------
# SSIM
# --------------------------------------------------------------------------------------


def _gaussian_kernel_1d(device: torch.device) -> torch.Tensor:
    """The 11-tap Gaussian of scipy.ndimage.gaussian_filter(sigma=1.5, truncate=3.5), [11]."""
    offsets = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return g / g.sum()


def _ssim_frames(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """SSIM of frames x, y [N, C, H, W] (float64) -> [N], mean over valid pixels and channels."""
    n, c, h, w = x.shape
    k = g.numel()
    # The five local statistics are filtered in one grouped conv pass: x, y, x^2, y^2, xy.
    maps = torch.stack([x, y, x * x, y * y, x * y], dim=2).reshape(n * c * 5, 1, h, w)
    maps = F.conv2d(maps, g.view(1, 1, 1, k))  # separable: rows, then columns; "valid" only
    maps = F.conv2d(maps, g.view(1, 1, k, 1))
    mu_x, mu_y, e_xx, e_yy, e_xy = maps.view(n, c, 5, h - k + 1, w - k + 1).unbind(dim=2)

    var_x = e_xx - mu_x * mu_x  # population covariances (use_sample_covariance=False)
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data range 1
    s = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    return s.mean(dim=(2, 3)).mean(dim=1)


@torch.no_grad()
def ssim_per_frame(x: torch.Tensor, y: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """SSIM of each frame (11x11 Gaussian window, sigma 1.5), averaged over channels.

    x, y: [B, C, T, H, W] in [0, 1], H and W at least 11.
    chunk: frames per pass; bounds memory to ~chunk * C * 5 * H * W float64 values.
    Returns [B, T] float64; identical frames give exactly 1.
    """
    _check_pair(x, y, 0.0, 1.0, "ssim_per_frame")
    b, c, t, h, w = x.shape
    win = 2 * SSIM_RADIUS + 1
    if h < win or w < win:
        raise ValueError(f"ssim_per_frame needs frames of at least {win}x{win} pixels, got {h}x{w}")
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of frames, got {chunk}")
    g = _gaussian_kernel_1d(x.device)
    xf, yf = video_to_frames(x), video_to_frames(y)
    out = [
        _ssim_frames(xf[i : i + chunk].double(), yf[i : i + chunk].double(), g)
        for i in range(0, b * t, chunk)
    ]
    return torch.cat(out).view(b, t)


# --------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------


@torch.no_grad()
def lpips_per_frame(
    x: torch.Tensor, y: torch.Tensor, lpips_model: torch.nn.Module, chunk: int = 16
) -> torch.Tensor:
    """LPIPS distance of each frame pair.

    x, y: [B, 3, T, H, W] in [-1, 1].
    lpips_model: e.g. `vidgen.losses.lpips.build_lpips("alex")`, called as model(a, b) on
        [N, 3, H, W] in [-1, 1] and returning [N, 1, 1, 1].
    chunk: frames per forward pass (bounds activation memory).
    Returns [B, T] float32.
    """
    _check_pair(x, y, -1.0, 1.0, "lpips_per_frame")
    b, c, t, h, w = x.shape
    if c != 3:
        raise ValueError(f"lpips_per_frame needs RGB videos (C=3), got C={c}")
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of frames, got {chunk}")
    xf, yf = video_to_frames(x), video_to_frames(y)
    out = [
        lpips_model(xf[i : i + chunk], yf[i : i + chunk]).reshape(-1).float()
        for i in range(0, b * t, chunk)
    ]
    return torch.cat(out).view(b, t)
