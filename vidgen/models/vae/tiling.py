"""Spatial tiling for WanVAE encode / decode: large frames in overlapping, linearly blended tiles.

    with torch.no_grad():
        mu, logvar = tiled_encode(vae, video, tile=256, overlap=64)   # video [B, 3, T, H, W]
        video = tiled_decode(vae, mu, tile=256, overlap=64)           # the same tiles, /8

Why: the chunked causal path bounds activation memory in *time* (one chunk of frames), but one
chunk of a 1280x720 frame is still large at full width. Tiling bounds it in space as well. Each
tile runs the whole chunked path on its own (`vae.encode` / `vae.decode` build a fresh cache per
call, so no causal state leaks from one tile into the next) and is added, times its blend
weight, into an output allocated once. Peak memory: the output plus one tile's chunk activations.
Meant for inference: under autograd every tile's activations would be kept for backward anyway.

Layout, per axis, computed once in latent units so that encode and decode tiles correspond (the
pixel tile [a, b) is the latent tile [a/s, b/s), s = vae.spatial_compression, 8 for Wan):

- a frame no larger than `tile` is one tile, i.e. the plain untiled call, bit for bit;
- otherwise n = 1 + ceil((size - tile) / (tile - overlap)) full-size tiles, the first flush with
  the start, the last flush with the end, the rest evenly spaced: neighbours overlap by at
  least `overlap` (the slack is shared out evenly, never left as a sliver at the edge).

Blending, per axis: across the overlap of two neighbouring tiles the later tile's weight rises
linearly, (i + 0.5) / n at the i-th of n overlapping positions, and the earlier tile's falls as
its complement; elsewhere a tile weighs 1. Where tiles sit closer than `tile / 2` apart, three
can cover one position; the weights are then divided by their sum there, so they always sum to
1. A 2D weight is the product of its two 1D weights, so it sums to 1 as well. Encode blends the
latents (mu and logvar) over overlap/s latent positions, decode blends pixels over the overlap
in pixels.

Tiles see less context than the whole frame (the mid-block attention spans one tile, the
convolutions stop at the tile's edge), so a tiled result is close to, not equal to, the untiled
one; tests/test_vae_tiling.py and bench/bench_vae_stage3.py report the PSNR between the two.
"""

from __future__ import annotations

import math

import torch

from vidgen.models.vae.vae import WanVAE

__all__ = ["blend_weights", "check_tiling", "tile_spans", "tiled_decode", "tiled_encode"]


# --------------------------------------------------------------------------- layout and weights


def check_tiling(vae: WanVAE, tile: int, overlap: int) -> None:
    """Raise ValueError unless tile / overlap are valid pixel sizes for this VAE.

    Both must be multiples of the spatial compression s (8 for Wan) so that pixel and latent
    tiles correspond exactly; tile >= s, 0 <= overlap < tile.
    """
    s = vae.spatial_compression
    problems = []
    for name, value in (("tile", tile), ("overlap", overlap)):
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{name} must be an int number of pixels, got {value!r}")
    if problems:
        raise ValueError("; ".join(problems))
    if tile < s or tile % s:
        problems.append(
            f"tile={tile} must be a positive multiple of {s} (the VAE's spatial compression), "
            f"e.g. {max(s, tile // s * s)} or {max(s, tile // s * s + s)}"
        )
    if overlap < 0 or overlap % s:
        problems.append(
            f"overlap={overlap} must be a multiple of {s} (the VAE's spatial compression) "
            f"and >= 0, e.g. {max(0, overlap // s * s)} or {max(0, overlap // s * s + s)}"
        )
    if overlap >= tile:
        problems.append(f"overlap={overlap} must be smaller than tile={tile}")
    if problems:
        raise ValueError("invalid tiling: " + "; ".join(problems))


def tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] of the tiles covering [0, size) along one axis (any one unit).

    One span (0, size) when size <= tile; otherwise full-size tiles, first and last flush with
    the ends, evenly spaced so that neighbours overlap by at least `overlap`.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    if size <= tile:
        return [(0, size)]
    n = 1 + math.ceil((size - tile) / (tile - overlap))
    starts = [round(k * (size - tile) / (n - 1)) for k in range(n)]
    return [(a, a + tile) for a in starts]


def blend_weights(spans: list[tuple[int, int]], scale: int = 1) -> list[torch.Tensor]:
    """1D blend weights, one float64 tensor of length (stop - start) * scale per span.

    spans: output of tile_spans (sorted, covering [0, spans[-1][1]) without gaps).
    scale: output positions per span unit (s when latent spans weight decoded pixels).
    The weights of all tiles covering a position sum to 1 (see the module docstring).
    """
    windows = []
    for k, (a, b) in enumerate(spans):
        w = torch.ones((b - a) * scale, dtype=torch.float64)
        if k > 0:  # rise across the overlap with the previous tile: a prefix of this tile
            n = (spans[k - 1][1] - a) * scale
            if n > 0:
                w[:n] = torch.minimum(w[:n], _ramp(n))
        if k < len(spans) - 1:  # fall across the overlap with the next tile: a suffix
            n = (b - spans[k + 1][0]) * scale
            if n > 0:
                w[-n:] = torch.minimum(w[-n:], 1.0 - _ramp(n))
        windows.append(w)
    total = torch.zeros(spans[-1][1] * scale, dtype=torch.float64)
    for (a, _), w in zip(spans, windows):
        total[a * scale : a * scale + len(w)] += w
    # exactly 1 already where at most two tiles overlap; renormalises where three do
    return [w / total[a * scale : a * scale + len(w)] for (a, _), w in zip(spans, windows)]


def _ramp(n: int) -> torch.Tensor:
    """(i + 0.5) / n for i < n: linear from ~0 to ~1, symmetric, never exactly 0 or 1."""
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n


def _tiles(h: int, w: int, tile: int, overlap: int, s: int, scale: int):
    """Yield (y0, y1, x0, x1) latent spans and the [rows, cols] weight at `scale` per unit."""
    rows, cols = tile_spans(h, tile // s, overlap // s), tile_spans(w, tile // s, overlap // s)
    wy, wx = blend_weights(rows, scale), blend_weights(cols, scale)
    for (y0, y1), wr in zip(rows, wy):
        for (x0, x1), wc in zip(cols, wx):
            yield y0, y1, x0, x1, wr[:, None] * wc[None, :]


# --------------------------------------------------------------------------- encode / decode


def tiled_encode(
    vae: WanVAE, x: torch.Tensor, tile: int = 256, overlap: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, C, T, H, W] in [-1, 1] -> (mu, logvar), each [B, z_dim, 1+(T-1)/f, H/s, W/s].

    tile, overlap: in pixels (multiples of s). Each tile is encoded with the chunked causal
    path; mu and logvar are blended in latent space. A frame within one tile is encoded whole.
    """
    check_tiling(vae, tile, overlap)
    c = vae.config["in_channels"]
    if x.dim() != 5 or x.shape[1] != c:
        raise ValueError(f"expected a video [B, {c}, T, H, W], got shape {tuple(x.shape)}")
    _, t, h, w = vae.latent_shape(*x.shape[2:])  # validates frames and frame size
    s = vae.spatial_compression
    if x.shape[3] <= tile and x.shape[4] <= tile:
        return vae.encode(x, chunked=True)
    mu = logvar = None
    for y0, y1, x0, x1, weight in _tiles(h, w, tile, overlap, s, scale=1):
        m, lv = vae.encode(x[..., y0 * s : y1 * s, x0 * s : x1 * s], chunked=True)
        if mu is None:  # allocate once, in the model's dtype
            mu = m.new_zeros(m.shape[0], m.shape[1], t, h, w)
            logvar = torch.zeros_like(mu)
        weight = weight.to(m)
        mu[..., y0:y1, x0:x1].addcmul_(m, weight)
        logvar[..., y0:y1, x0:x1].addcmul_(lv, weight)
    return mu, logvar


def tiled_decode(
    vae: WanVAE, z: torch.Tensor, tile: int = 256, overlap: int = 64, clamp: bool = True
) -> torch.Tensor:
    """z: [B, z_dim, n, h, w] (raw latents) -> [B, C, 1+(n-1)*f, h*s, w*s].

    tile, overlap: in *pixels* (multiples of s), i.e. latent tiles of tile/s with overlap/s, so
    the tiles are the ones tiled_encode uses. Each tile is decoded with the chunked causal path
    (unclamped), the pixels blended, and the result clamped to [-1, 1] when `clamp`.
    """
    check_tiling(vae, tile, overlap)
    if z.dim() != 5 or z.shape[1] != vae.z_dim or z.shape[2] < 1:
        raise ValueError(
            f"expected latents [B, {vae.z_dim}, T>=1, h, w], got shape {tuple(z.shape)}"
        )
    s = vae.spatial_compression
    h, w = z.shape[3:]
    if h * s <= tile and w * s <= tile:
        return vae.decode(z, chunked=True, clamp=clamp)
    out = None
    for y0, y1, x0, x1, weight in _tiles(h, w, tile, overlap, s, scale=s):
        y = vae.decode(z[..., y0:y1, x0:x1], chunked=True, clamp=False)
        if out is None:  # allocate once: [B, C, T, H, W]
            out = y.new_zeros(*y.shape[:3], h * s, w * s)
        out[..., y0 * s : y1 * s, x0 * s : x1 * s].addcmul_(y, weight.to(y))
    return out.clamp_(-1.0, 1.0) if clamp else out
