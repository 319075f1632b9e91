"""2D -> 3D inflation: the 1-frame invariant, identity temporal resampling, config checks."""

import pytest
import torch

from vidgen.models.vae import WanVAE, inflate_2d_to_3d

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def vae2d():
    torch.manual_seed(0)
    vae = WanVAE(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1, temporal=False)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae.set_latent_stats(torch.linspace(-1, 1, 4), torch.linspace(0.5, 2, 4))
    return vae.eval()


@pytest.fixture(scope="module")
def vae3d(vae2d):
    return inflate_2d_to_3d(vae2d).eval()


def test_inflated_model_is_3d_with_same_widths(vae2d, vae3d):
    assert vae3d.temporal and vae3d.temporal_compression == 4
    cfg2, cfg3 = vae2d.config, vae3d.config
    assert {k: v for k, v in cfg3.items() if k != "temporal"} == {
        k: v for k, v in cfg2.items() if k != "temporal"
    }
    assert vae3d.encoder.conv_in.weight.shape[2] == 3 and vae2d.encoder.conv_in.weight.shape[2] == 1
    torch.testing.assert_close(vae3d.latents_std, vae2d.latents_std)
    # the 2D kernel sits in the newest tap, the older taps are zero
    w3, w2 = vae3d.decoder.conv_out.weight, vae2d.decoder.conv_out.weight
    assert torch.equal(w3[:, :, -1], w2[:, :, 0]) and not w3[:, :, :-1].any()


@pytest.mark.parametrize("chunked", [False, True])
def test_one_frame_clip_reproduces_the_2d_model(vae2d, vae3d, chunked):
    x = torch.randn(2, 3, 1, 16, 16)
    with torch.no_grad():
        mu2, lv2 = vae2d.encode(x, chunked=chunked)
        mu3, lv3 = vae3d.encode(x, chunked=chunked)
        torch.testing.assert_close(mu3, mu2, **TOL)
        torch.testing.assert_close(lv3, lv2, **TOL)
        torch.testing.assert_close(
            vae3d.decode(mu2, chunked=chunked, clamp=False),
            vae2d.decode(mu2, chunked=chunked, clamp=False),
            **TOL,
        )


def test_temporal_layers_start_as_keep_newest_and_repeat(vae2d, vae3d):
    """Encoder: latent j = 2D latent of frame 4j. Decoder: each latent frame repeated 4 times."""
    x = torch.randn(1, 3, 9, 16, 16)
    with torch.no_grad():
        mu3, _ = vae3d.encode(x)
        mu2, _ = vae2d.encode(x[:, :, [0, 4, 8]])
        torch.testing.assert_close(mu3, mu2, **TOL)
        rec3 = vae3d.decode(mu2, clamp=False)
        rec2 = vae2d.decode(mu2, clamp=False)  # [1, 3, 3, H, W]: one frame per latent frame
    expected = torch.cat([rec2[:, :, :1], rec2[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
    torch.testing.assert_close(rec3, expected, **TOL)


def test_overrides_and_device_dtype(vae2d):
    vae3d = inflate_2d_to_3d(
        vae2d,
        temporal_downsample=(True, True, False),
        dropout=0.1,
        latents_mean=[0.0] * 4,
        base_dim=8,
    )
    assert vae3d.config["temporal_downsample"] == [True, True, False]
    assert vae3d.config["dropout"] == 0.1
    assert vae3d.latents_mean.tolist() == [0.0] * 4  # the override wins over the 2D statistics
    assert vae3d.latents_std.tolist() == vae2d.latents_std.tolist()
    x = torch.randn(1, 3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vae3d.eval().encode(x)[0], vae2d.encode(x)[0], **TOL)


def test_incompatible_configs_are_rejected(vae2d, vae3d):
    with pytest.raises(ValueError, match="already 3D"):
        inflate_2d_to_3d(vae3d)
    with pytest.raises(ValueError, match=r"base_dim: 2D has 8, asked for 16"):
        inflate_2d_to_3d(vae2d, base_dim=16)
    with pytest.raises(ValueError, match=r"unknown WanVAE option\(s\) \['widht'\]"):
        inflate_2d_to_3d(vae2d, widht=3)
    with pytest.raises(ValueError, match="temporal=False cannot"):
        inflate_2d_to_3d(vae2d, temporal=False)
    with pytest.raises(TypeError, match="needs a WanVAE"):
        inflate_2d_to_3d(torch.nn.Linear(2, 2))
