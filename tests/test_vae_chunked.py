"""Chunked causal inference: chunked == whole clip, causality, bounded per-chunk activations."""

import pytest
import torch

from vidgen.models.vae import WanVAE
from vidgen.models.vae.layers import CausalConv3d, Resample

TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_vae(temporal=True, seed=0, **kw) -> WanVAE:
    """A ~30k-parameter VAE with every parameter perturbed (norm gains, attention, time convs)."""
    torch.manual_seed(seed)
    cfg = dict(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1, temporal=temporal)
    vae = WanVAE(**{**cfg, **kw}).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.mark.parametrize("frames", [1, 5, 9, 13])
def test_chunked_encode_matches_whole(vae, frames):
    x = torch.randn(2, 3, frames, 16, 16)
    with torch.no_grad():
        mu_w, lv_w = vae.encode(x, chunked=False)
        mu_c, lv_c = vae.encode(x, chunked=True)
    assert mu_w.shape == (2, 4, 1 + (frames - 1) // 4, 2, 2)
    torch.testing.assert_close(mu_c, mu_w, **TOL)
    torch.testing.assert_close(lv_c, lv_w, **TOL)


@pytest.mark.parametrize("latent_frames", [1, 2, 3, 4])
def test_chunked_decode_matches_whole(vae, latent_frames):
    z = torch.randn(2, 4, latent_frames, 2, 2)
    with torch.no_grad():
        whole = vae.decode(z, chunked=False, clamp=False)
        chunked = vae.decode(z, chunked=True, clamp=False)
    assert whole.shape == (2, 3, 1 + 4 * (latent_frames - 1), 16, 16)
    torch.testing.assert_close(chunked, whole, **TOL)


def test_2d_model_chunked_matches_whole_for_any_length():
    vae = tiny_vae(temporal=False)
    x = torch.randn(1, 3, 3, 16, 16)
    with torch.no_grad():
        mu_w, _ = vae.encode(x, chunked=False)
        mu_c, _ = vae.encode(x, chunked=True)
        mu_frame, _ = vae.encode(x[:, :, 2:3], chunked=False)
        rec_w = vae.decode(mu_w, chunked=False)
        rec_c = vae.decode(mu_w, chunked=True)
    assert mu_w.shape[2] == 3
    torch.testing.assert_close(mu_c, mu_w, **TOL)
    torch.testing.assert_close(rec_c, rec_w, **TOL)
    torch.testing.assert_close(mu_w[:, :, 2:3], mu_frame, **TOL)  # frames are independent


@pytest.mark.parametrize("chunked", [False, True])
def test_encoder_is_causal(vae, chunked):
    x = torch.randn(1, 3, 13, 16, 16)
    with torch.no_grad():
        mu_long, lv_long = vae.encode(x, chunked=chunked)
        for k in (0, 1, 2):
            mu, lv = vae.encode(x[:, :, : 1 + 4 * k], chunked=chunked)
            torch.testing.assert_close(mu_long[:, :, : 1 + k], mu, **TOL)
            torch.testing.assert_close(lv_long[:, :, : 1 + k], lv, **TOL)
    # and the future does matter: changing the last frame changes the last latent frame
    x2 = x.clone()
    x2[:, :, -1] += 1.0
    with torch.no_grad():
        mu2, _ = vae.encode(x2, chunked=chunked)
    torch.testing.assert_close(mu2[:, :, :3], mu_long[:, :, :3], **TOL)
    assert (mu2[:, :, 3] - mu_long[:, :, 3]).abs().max() > 1e-4


def test_decoder_is_causal(vae):
    z = torch.randn(1, 4, 4, 2, 2)
    with torch.no_grad():
        long = vae.decode(z, chunked=False, clamp=False)
        short = vae.decode(z[:, :, :2], chunked=False, clamp=False)
    torch.testing.assert_close(long[:, :, :5], short, **TOL)


def _conv_input_frames(monkeypatch, run) -> int:
    """Largest number of frames any 3D convolution received (after padding / cache concat)."""
    import torch.nn.modules.conv as conv_module

    seen = []
    conv3d = conv_module.F.conv3d

    def spy(x, *args, **kwargs):
        seen.append(x.shape[2])
        return conv3d(x, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(conv_module.F, "conv3d", spy)
        with torch.no_grad():
            run()
    return max(seen)


def test_chunked_path_never_sees_the_whole_clip(vae, monkeypatch):
    x = torch.randn(1, 3, 17, 16, 16)
    # the whole-clip path convolves all 17 frames plus 2 of causal padding ...
    assert _conv_input_frames(monkeypatch, lambda: vae.encode(x, chunked=False)) == 19
    # ... the chunked path at most one 4-frame chunk plus 2 cached frames
    assert _conv_input_frames(monkeypatch, lambda: vae.encode(x, chunked=True)) <= 4 + 2
    z = torch.randn(1, 4, 5, 2, 2)
    assert _conv_input_frames(monkeypatch, lambda: vae.decode(z, chunked=False)) == 17 + 2
    assert _conv_input_frames(monkeypatch, lambda: vae.decode(z, chunked=True)) <= 4 + 2


def test_chunked_cache_holds_a_few_frames_per_layer(vae):
    """The cache is keyed by module and holds <= 2 frames each, whatever the clip length."""
    x = torch.randn(1, 3, 17, 16, 16)
    cache = {}
    with torch.no_grad():
        for start, stop in [(0, 1), (1, 5), (5, 9), (9, 13), (13, 17)]:
            vae.encoder(x[:, :, start:stop], cache)
    assert all(isinstance(k, (CausalConv3d, Resample)) for k in cache)
    assert max(v.shape[2] for v in cache.values()) <= 2
    # every temporal layer of the encoder has its own entry
    expected = [
        m
        for m in vae.encoder.modules()
        if (isinstance(m, CausalConv3d) and m.history) or getattr(m, "mode", "") == "downsample3d"
    ]
    assert set(cache) == set(expected)
