"""Image-to-video conditioning: the Wan2.1 layout (checked against diffusers' pipeline), T2V init."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from test_vae_diffusers_parity import wan_vae_pair

from vidgen.i2v import condition_video, encode_condition, first_frame_mask
from vidgen.models.dit import expand_t2v, pack_samples
from vidgen.models.dit.model import wan_tiny

diffusers = pytest.importorskip("diffusers")
MEAN, STD = [0.1, -0.2, 0.3, 0.0], [0.5, 1.5, 2.0, 1.0]


@pytest.fixture(scope="module")
def vae_pair():
    return wan_vae_pair(MEAN, STD)


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_condition_matches_diffusers_wan_i2v_pipeline(vae_pair, frames):
    """mask + first-frame latent == what WanImageToVideoPipeline.prepare_latents feeds its DiT."""
    from diffusers import WanImageToVideoPipeline

    ours, theirs = vae_pair
    video = torch.rand(2, 3, frames, 16, 24) * 2 - 1
    pipe = SimpleNamespace(vae=theirs, config=SimpleNamespace(expand_timesteps=False),
                           vae_scale_factor_temporal=4, vae_scale_factor_spatial=8)
    with torch.no_grad():
        expected = torch.cat([  # one image at a time: the pipeline repeats it batch_size times
            WanImageToVideoPipeline.prepare_latents(
                pipe, video[i : i + 1, :, 0], batch_size=1, num_channels_latents=4, height=16,
                width=24, num_frames=frames, dtype=torch.float32, device="cpu",
            )[1]
            for i in range(2)
        ])
        cond = encode_condition(ours, video, chunked=False)
    assert cond.shape == (2, 8, 1 + (frames - 1) // 4, 2, 3)
    torch.testing.assert_close(cond, expected, rtol=1e-5, atol=2e-5)
    assert cond[:, 4:].abs().max() > 0.05  # the latent part is not trivially zero


def test_mask_marks_only_the_first_latent_frame():
    m = first_frame_mask(3, 2, 2, temporal=4)
    assert m.shape == (1, 4, 3, 2, 2)
    assert m[:, :, 0].eq(1).all() and m[:, :, 1:].eq(0).all()
    video = torch.randn(1, 3, 5, 4, 4)
    cv = condition_video(video)
    assert torch.equal(cv[:, :, 0], video[:, :, 0]) and cv[:, :, 1:].eq(0).all()


def _randomise(model, std=0.05):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model


@pytest.mark.parametrize("image_dim", [None, 24])
def test_i2v_from_t2v_predicts_what_t2v_predicts_at_step_0(image_dim):
    torch.manual_seed(0)
    t2v = _randomise(wan_tiny(in_channels=16)).eval()
    i2v = expand_t2v(t2v, image_dim=image_dim).eval()
    assert i2v.config["in_channels"] == 36 and i2v.cond_channels == 20
    x, ctx = torch.randn(2, 16, 2, 4, 4), torch.randn(2, 5, 32)
    cond = torch.randn(2, 20, 2, 4, 4)
    image = None if image_dim is None else torch.randn(2, 7, image_dim)
    t = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        expected = t2v(x, t, ctx)
        assert expected.abs().max() > 0.05
        for c, im in ((cond, image), (torch.zeros_like(cond), None if image is None else 0 * image)):
            torch.testing.assert_close(i2v(x, t, ctx, cond=c, image=im), expected, rtol=1e-5, atol=1e-6)

    # and the new branches learn: one step on a loss that needs the condition moves them
    opt = torch.optim.SGD(i2v.parameters(), lr=0.1)
    i2v.train()
    loss = (i2v(x, t, ctx, cond=cond, image=image) - cond[:, 4:]).pow(2).mean()
    loss.backward()
    opt.step()
    assert i2v.patch_embedding.weight.grad[:, 16:].abs().max() > 0
    if image_dim is not None:
        assert i2v.blocks[0].cross_attn.add_v_proj.weight.grad.abs().max() > 0
    with torch.no_grad():
        moved = i2v(x, t, ctx, cond=cond, image=image) - i2v(x, t, ctx, cond=0 * cond, image=image)
    assert moved.abs().max() > 1e-4


@pytest.mark.parametrize("image_dim", [None, 24])
def test_packed_i2v_forward_equals_per_sample_forwards(image_dim):
    torch.manual_seed(0)
    model = _randomise(wan_tiny(in_channels=36, image_dim=image_dim), 0.1).eval()
    shapes = [(2, 4, 4), (1, 2, 6), (3, 2, 2)]
    samples = []
    for i, s in enumerate(shapes):
        sample = dict(latent=torch.randn(16, *s), context=torch.randn(3 + i, 32),
                      cond=torch.randn(20, *s), t=0.2 + 0.3 * i)
        if image_dim:
            sample["image"] = torch.randn(4 + i, image_dim)
        samples.append(sample)
    packed = pack_samples(samples, (1, 2, 2), 64)
    assert len(packed) == 1 and packed[0].num_samples == 3
    with torch.no_grad():
        outs = model.forward_packed(packed[0])
        for s, out in zip(samples, outs):
            image = s["image"][None] if image_dim else None
            ref = model(s["latent"][None], torch.tensor([s["t"]]), s["context"][None],
                        cond=s["cond"][None], image=image)[0]
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        # each sample sees its own condition: changing sample 1's moves only sample 1
        other = replace(packed[0], cond=packed[0].cond.clone())
        other.cond[packed[0].seg_ids == 1] += 1.0
        changed = model.forward_packed(other)
    assert torch.equal(changed[0], outs[0]) and torch.equal(changed[2], outs[2])
    assert not torch.allclose(changed[1], outs[1])


def test_missing_or_unexpected_conditioning_is_an_error():
    model = wan_tiny(in_channels=36, image_dim=24)
    x, t, ctx = torch.randn(1, 16, 1, 2, 2), torch.tensor([0.5]), torch.randn(1, 3, 32)
    with pytest.raises(ValueError, match="takes 20 conditioning channels.*cond=None"):
        model(x, t, ctx, image=torch.randn(1, 2, 24))
    with pytest.raises(ValueError, match="image_dim=24, got none"):
        model(x, t, ctx, cond=torch.randn(1, 20, 1, 2, 2))
    with pytest.raises(ValueError, match="takes 0 conditioning channels"):
        wan_tiny()(x, t, ctx, cond=torch.randn(1, 20, 1, 2, 2))
    with pytest.raises(ValueError, match="expand_t2v needs a text-to-video DiT"):
        expand_t2v(model)


def test_expand_t2v_cli_writes_an_i2v_dit_that_predicts_as_the_t2v_one(tmp_path):
    from vidgen.models.dit import WanDiT
    from vidgen.tools import convert_dit

    torch.manual_seed(0)
    t2v = _randomise(wan_tiny(in_channels=16)).eval()
    t2v.save_pretrained(tmp_path / "t2v")
    convert_dit.main(["--expand-t2v", str(tmp_path / "t2v"), "--out", str(tmp_path / "i2v"), "--image-dim", "24"])
    i2v = WanDiT.from_pretrained(tmp_path / "i2v").eval()
    assert (i2v.config["in_channels"], i2v.config["image_dim"]) == (36, 24)
    x, ctx, t = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 5, 32), torch.tensor([0.4])
    with torch.no_grad():
        torch.testing.assert_close(
            i2v(x, t, ctx, cond=torch.randn(1, 20, 2, 4, 4), image=torch.randn(1, 3, 24)),
            t2v(x, t, ctx), rtol=1e-5, atol=1e-6)
