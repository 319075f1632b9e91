"""Spatial tiling: exact when one tile covers the frame, close otherwise, weights sum to 1."""

import math

import pytest
import torch

from vidgen.models.vae import WanVAE
from vidgen.models.vae.tiling import blend_weights, tile_spans, tiled_decode, tiled_encode


@pytest.fixture(scope="module")
def vae():
    from vidgen.models.vae.layers import AttentionBlock

    torch.manual_seed(0)
    model = WanVAE(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1).eval()
    # Live attention, as in a trained VAE (a fresh one starts with zero output projections,
    # which would take the whole-frame attention out of the tiled-vs-untiled comparison).
    torch.manual_seed(1)
    for block in model.modules():
        if isinstance(block, AttentionBlock):
            block.proj.reset_parameters()
    return model


def smooth_clip(frames, height, width, batch=1, seed=1):
    """A clip with image-like spatial structure (random noise upsampled), in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, frames, height // 8, width // 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(frames, height, width), mode="trilinear")


def psnr(a, b):
    """PSNR in dB of two tensors in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / (a - b).pow(2).mean().item())


# --------------------------------------------------------------------------- layout and weights


@pytest.mark.parametrize(
    "size, tile, overlap",
    [(12, 8, 2), (32, 16, 4), (29, 16, 4), (100, 32, 0), (40, 8, 7), (8, 8, 4), (5, 8, 2)],
)
@pytest.mark.parametrize("scale", [1, 8])
def test_blend_weights_sum_to_one(size, tile, overlap, scale):
    spans = tile_spans(size, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == size
    assert all(b - a == min(tile, size) for a, b in spans)  # every tile full size
    assert all(b0 - a1 >= overlap for (_, b0), (a1, _) in zip(spans, spans[1:]))
    total = torch.zeros(size * scale, dtype=torch.float64)
    for (a, _), w in zip(spans, blend_weights(spans, scale)):
        assert (w > 0).all() and (w <= 1).all()
        total[a * scale : a * scale + len(w)] += w
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)


def test_two_tiles_cross_fade_linearly():
    spans = tile_spans(12, 8, 4)  # [(0, 8), (4, 12)]: 4 positions of overlap
    assert spans == [(0, 8), (4, 12)]
    first, second = blend_weights(spans)
    ramp = torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=torch.float64)
    torch.testing.assert_close(second[:4], ramp)
    torch.testing.assert_close(first[4:], 1 - ramp)
    assert (first[:4] == 1).all() and (second[4:] == 1).all()


@pytest.mark.parametrize(
    "tile, overlap, match",
    [
        (100, 32, r"tile=100 must be a positive multiple of 8.*e\.g\. 96 or 104"),
        (64, 12, r"overlap=12 must be a multiple of 8.*e\.g\. 8 or 16"),
        (64, 64, "overlap=64 must be smaller than tile=64"),
        (0, 0, "tile=0 must be a positive multiple of 8"),
        (64, -8, "overlap=-8 must be a multiple of 8 .* and >= 0"),
        (64.0, 16, "tile must be an int number of pixels, got 64.0"),
    ],
)
def test_bad_tile_or_overlap_is_refused(vae, tile, overlap, match):
    x, z = torch.zeros(1, 3, 1, 64, 64), torch.zeros(1, 4, 1, 8, 8)
    with pytest.raises(ValueError, match=match):
        tiled_encode(vae, x, tile=tile, overlap=overlap)
    with pytest.raises(ValueError, match=match):
        tiled_decode(vae, z, tile=tile, overlap=overlap)


def test_bad_inputs_are_refused(vae):
    with pytest.raises(ValueError, match="valid lengths are 1\\+4k"):
        tiled_encode(vae, torch.zeros(1, 3, 4, 64, 64), tile=32, overlap=8)
    with pytest.raises(ValueError, match="expected a video"):
        tiled_encode(vae, torch.zeros(1, 4, 1, 64, 64), tile=32, overlap=8)
    with pytest.raises(ValueError, match="expected latents"):
        tiled_decode(vae, torch.zeros(1, 3, 1, 8, 8), tile=32, overlap=8)


# --------------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("size", [(32, 48), (64, 64)])
def test_frame_within_one_tile_is_exactly_untiled(vae, size):
    x = smooth_clip(5, *size)
    with torch.no_grad():
        mu, logvar = vae.encode(x)
        tiled_mu, tiled_logvar = tiled_encode(vae, x, tile=64, overlap=16)
        assert torch.equal(tiled_mu, mu) and torch.equal(tiled_logvar, logvar)
        assert torch.equal(tiled_decode(vae, mu, tile=64, overlap=16), vae.decode(mu))


def test_tiled_reconstruction_is_close_to_untiled(vae):
    x = smooth_clip(5, 96, 128, batch=2)  # 2x3 tiles of 64 px (8 latent px), 32 px overlaps
    with torch.no_grad():
        mu, logvar = vae.encode(x)
        recon = vae.decode(mu)
        tiled_mu, tiled_logvar = tiled_encode(vae, x, tile=64, overlap=16)
        tiled_recon = tiled_decode(vae, tiled_mu, tile=64, overlap=16)
    assert tiled_mu.shape == mu.shape and tiled_recon.shape == recon.shape == x.shape
    assert recon.std() > 0.1  # the comparison is not between two near-constant outputs
    db = psnr(tiled_recon, recon)
    latent_err = ((tiled_mu - mu).norm() / mu.norm()).item()
    assert db > 30, f"tiled vs untiled reconstruction: PSNR {db:.1f} dB (want > 30)"
    assert latent_err < 0.1, f"tiled vs untiled mu: relative error {latent_err:.3f} (want < 0.1)"
    print(f"tiled vs untiled reconstruction PSNR {db:.1f} dB, mu relative error {latent_err:.4f}")


def test_each_tile_runs_with_a_fresh_causal_cache(vae):
    """Where one tile has weight 1, the tiled output is that tile's own chunked result, exactly.

    The bottom-right tile runs last: any causal state left over from earlier tiles (or from an
    earlier call) would change its frames after the first.
    """
    x = smooth_clip(9, 96, 96)
    tile, overlap = 64, 16  # latent tiles of 8 over 12: spans (0, 8) and (4, 12)
    with torch.no_grad():
        tiled_encode(vae, smooth_clip(9, 96, 96, seed=5), tile=tile, overlap=overlap)
        mu, _ = tiled_encode(vae, x, tile=tile, overlap=overlap)
        first = vae.encode(x[..., :64, :64])[0]
        last = vae.encode(x[..., 32:, 32:])[0]
        assert torch.equal(mu[..., :4, :4], first[..., :4, :4])
        assert torch.equal(mu[..., 8:, 8:], last[..., 4:, 4:])
        out = tiled_decode(vae, mu, tile=tile, overlap=overlap, clamp=False)
        first = vae.decode(mu[..., :8, :8], clamp=False)
        last = vae.decode(mu[..., 4:, 4:], clamp=False)
        assert torch.equal(out[..., :32, :32], first[..., :32, :32])
        assert torch.equal(out[..., 64:, 64:], last[..., 32:, 32:])
        assert out.shape[2] == 9
