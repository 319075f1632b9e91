"""Same weights, same outputs as diffusers' AutoencoderKLWan (our key names are its key names)."""

import pytest
import torch

from vidgen.models.vae import WanVAE

diffusers = pytest.importorskip("diffusers")

TOL = dict(rtol=1e-5, atol=2e-5)


def wan_vae_pair(latents_mean=None, latents_std=None):
    """A tiny perturbed WanVAE and diffusers' AutoencoderKLWan with the same weights (other tests
    use it); with latent statistics, both normalise latents by them."""
    torch.manual_seed(0)
    ours = WanVAE(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1).eval()
    stats = {}
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if latents_mean is not None:
            ours.latents_mean.copy_(torch.tensor(latents_mean))
            ours.latents_std.copy_(torch.tensor(latents_std))
            stats = dict(latents_mean=latents_mean, latents_std=latents_std)
    theirs = diffusers.AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        **stats,
    ).eval()
    # Only our two latent-statistics buffers are extra (diffusers keeps them in its config).
    state = {k: v for k, v in ours.state_dict().items() if k not in ("latents_mean", "latents_std")}
    theirs.load_state_dict(state, strict=True)
    return ours, theirs


@pytest.fixture(scope="module")
def pair():
    return wan_vae_pair()


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_and_decode_match_diffusers(pair, frames):
    ours, theirs = pair
    x = torch.rand(1, 3, frames, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = theirs.encode(x).latent_dist
        reference = theirs.decode(posterior.mean).sample  # diffusers clamps to [-1, 1]
        for chunked in (False, True):
            mu, logvar = ours.encode(x, chunked=chunked)
            torch.testing.assert_close(mu, posterior.mean, **TOL)
            torch.testing.assert_close(logvar, posterior.logvar, **TOL)
            torch.testing.assert_close(
                ours.decode(posterior.mean, chunked=chunked), reference, **TOL
            )
    assert (reference.abs() < 1).float().mean() > 0.5  # the comparison is not all clamped values
