"""WanVAE API: shapes and validation, latent statistics, training forward, save / load."""

import json

import pytest
import torch

from vidgen.models.vae import WanVAE

TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1)  # lists, as Hydra passes


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return WanVAE(**TINY).eval()


def test_compression_and_latent_shape(vae):
    assert (vae.spatial_compression, vae.temporal_compression) == (8, 4)
    assert vae.latent_shape(17, 64, 48) == (4, 5, 8, 6)
    vae2d = WanVAE(**TINY, temporal=False)
    assert vae2d.temporal_compression == 1 and vae2d.latent_shape(10, 16, 16) == (4, 10, 2, 2)
    assert WanVAE(**{**TINY, "dim_mult": [1, 2]}, temporal_downsample=[True]).latent_shape(
        5, 4, 4
    ) == (4, 3, 2, 2)


@pytest.mark.parametrize(
    "frames, message",
    [
        (10, "got 10 frames; valid lengths are 1+4k, nearest 9 or 13"),
        (4, "got 4 frames; valid lengths are 1+4k, nearest 1 or 5"),
        (0, "got 0 frames; valid lengths are 1+4k, nearest 1"),
    ],
)
def test_invalid_frame_count_names_the_nearest_lengths(vae, frames, message):
    with pytest.raises(ValueError) as err:
        vae.encode(torch.zeros(1, 3, frames, 16, 16))
    assert str(err.value) == message


def test_2d_model_takes_any_frame_count():
    vae2d = WanVAE(**TINY, temporal=False).eval()
    with torch.no_grad():
        mu, _ = vae2d.encode(torch.zeros(1, 3, 10, 16, 16))
    assert mu.shape == (1, 4, 10, 2, 2)


def test_invalid_sizes_and_shapes(vae):
    with pytest.raises(ValueError, match=r"multiple of 8 .*height 20 \(nearest 16 or 24\)"):
        vae.encode(torch.zeros(1, 3, 1, 20, 16))
    with pytest.raises(ValueError, match=r"width 4 \(nearest 8\)"):
        vae.latent_shape(1, 16, 4)
    with pytest.raises(
        ValueError, match=r"expected a video \[B, 3, T, H, W\], got shape \(1, 4, 1, 16, 16\)"
    ):
        vae.encode(torch.zeros(1, 4, 1, 16, 16))
    with pytest.raises(ValueError, match=r"expected latents \[B, 4, T>=1, h, w\]"):
        vae.decode(torch.zeros(1, 3, 1, 2, 2))
    with pytest.raises(
        ValueError, match=r"temporal_downsample needs one flag per downsample.*3 flags; got 2"
    ):
        WanVAE(**TINY, temporal_downsample=[True, True])


def test_forward_is_the_training_path(vae):
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(1)
    recon, mu, logvar = vae(x, generator=g)
    assert recon.shape == x.shape and mu.shape == logvar.shape == (2, 4, 2, 2, 2)
    recon_again, _, _ = vae(x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(recon, recon_again)  # the generator makes sampling reproducible
    with torch.no_grad():
        recon_mean, mu2, _ = vae(x, sample_posterior=False)
        torch.testing.assert_close(recon_mean, vae.decode(mu2, chunked=False, clamp=False))
    assert not torch.allclose(recon.detach(), recon_mean)
    # last_layer is the decoder's final conv weight and receives the reconstruction gradient
    assert vae.last_layer is vae.decoder.conv_out.weight
    (grad,) = torch.autograd.grad(recon.abs().mean(), vae.last_layer)
    assert grad.abs().sum() > 0


def test_decode_clamps_by_default():
    vae = WanVAE(**TINY).eval()
    z = torch.randn(1, 4, 1, 2, 2)
    with torch.no_grad():
        vae.decoder.conv_out.bias.copy_(torch.tensor([-2.0, 0.0, 2.0]))  # push outputs past +-1
        raw, clamped = vae.decode(z, clamp=False), vae.decode(z)
    assert raw.abs().max() > 1 and clamped.abs().max() <= 1
    torch.testing.assert_close(clamped, raw.clamp(-1, 1))


def test_latent_statistics_are_applied_in_one_place(vae):
    model = WanVAE(**TINY, latents_mean=[1.0, 2.0, 3.0, 4.0], latents_std=[1.0, 2.0, 4.0, 8.0])
    mu = torch.randn(2, 4, 3, 2, 2)
    z = model.normalize(mu)
    torch.testing.assert_close(z[:, 3], (mu[:, 3] - 4.0) / 8.0)
    torch.testing.assert_close(model.denormalize(z), mu)
    model.set_latent_stats(torch.zeros(4), torch.ones(4))
    torch.testing.assert_close(model.normalize(mu), mu)
    with pytest.raises(ValueError, match="latent std must be > 0"):
        model.set_latent_stats([0.0] * 4, [1.0, 0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"latent mean needs 4 values \(z_dim\), got 3"):
        model.set_latent_stats([0.0] * 3, [1.0] * 4)
    with pytest.raises(ValueError, match=r"expected latents \[B, 4, \.\.\.\]"):
        model.normalize(torch.zeros(1, 3, 1, 1, 1))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = WanVAE(**TINY, attn_scales=[0.5]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.set_latent_stats(torch.arange(4.0), torch.arange(1.0, 5.0))
    model.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config == {"_class_name": "WanVAE", **model.config} and config["latents_std"] == [1.0, 2.0, 3.0, 4.0]

    loaded = WanVAE.from_pretrained(tmp_path / "vae").eval()
    assert loaded.config == model.config
    x = torch.randn(1, 3, 5, 16, 16)
    with torch.no_grad():
        mu_a, lv_a = model.encode(x)
        mu_b, lv_b = loaded.encode(x)
        assert torch.equal(mu_a, mu_b) and torch.equal(lv_a, lv_b)
        assert torch.equal(model.decode(mu_a), loaded.decode(mu_a))
        assert torch.equal(model.normalize(mu_a), loaded.normalize(mu_a))


def test_from_pretrained_missing_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing config.json, model.safetensors"):
        WanVAE.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(WanVAE(**TINY).config))
    with pytest.raises(FileNotFoundError, match=r"missing model.safetensors"):
        WanVAE.from_pretrained(tmp_path)


def test_attention_blocks_start_as_identity():
    """As in Wan2.1, the attention output projection's weight starts at zero, so a block
    adds only its bias; the 2D and 3D models alike."""
    from vidgen.models.vae.layers import AttentionBlock

    for temporal in (False, True):
        model = WanVAE(**{**TINY, "temporal": temporal}, attn_scales=[0.5])
        blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
        assert len(blocks) >= 2  # the middle block's, the encoder's at scale 0.5
        for block in blocks:
            assert torch.count_nonzero(block.proj.weight) == 0
            x = torch.randn(2, block.proj.in_channels, 3, 4, 4)
            expected = x + block.proj.bias.view(1, -1, 1, 1, 1)
            torch.testing.assert_close(block(x), expected)


def test_size_presets_build_the_vae_and_reload_from_a_checkpoint(tmp_path):
    """model.size picks a VAE_PRESETS entry, model.vae values override it (null: the preset's),
    and a .ckpt of such a run rebuilds the same VAE (load_vae reads hparams.size too)."""
    from vidgen.lit.vae import VAEModule
    from vidgen.models.vae import VAE_PRESETS, build_wan_vae, load_vae

    assert build_wan_vae("wan2.1").config == WanVAE().config  # WanVAE's defaults are Wan2.1's
    demo = build_wan_vae("demo", base_dim=8, num_res_blocks=None, temporal=False).config
    assert demo == WanVAE(base_dim=8, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1,
                          temporal_downsample=(True, True), temporal=False).config
    assert VAE_PRESETS["demo"]["dim_mult"] == (1, 2, 2)  # 4x in space (the demo configs' size)
    with pytest.raises(ValueError, match=r"unknown WanVAE size 'wan2.2'; valid: wan2.1, demo"):
        build_wan_vae("wan2.2")
    module = VAEModule(size="demo", vae=dict(base_dim=8, z_dim=4, temporal=True), loss=dict(lpips_weight=0.0),
                       optim=dict(lr=1e-4))
    ckpt = tmp_path / "run.ckpt"
    torch.save(dict(hyper_parameters=dict(module.hparams), state_dict=module.state_dict()), ckpt)
    loaded = load_vae(str(ckpt))
    assert loaded.config == module.vae.config and loaded.config["dim_mult"] == [1, 2, 2]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), module.vae.state_dict().values()))


def test_exported_folders_name_their_class(tmp_path):
    """One folder format for every model (vidgen/models/export.py): a VAE folder is no DiT."""
    from vidgen.models.dit.model import WanDiT, wan_tiny

    WanVAE(**TINY).save_pretrained(tmp_path / "vae")
    wan_tiny().save_pretrained(tmp_path / "dit")
    with pytest.raises(ValueError, match=r"describes a 'WanVAE', not a 'WanDiT'"):
        WanDiT.from_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match=r"describes a 'WanDiT', not a 'WanVAE'"):
        WanVAE.from_pretrained(tmp_path / "dit")
    half = WanVAE.from_pretrained(tmp_path / "vae", dtype=torch.bfloat16)
    assert {p.dtype for p in half.state_dict().values()} == {torch.bfloat16}
