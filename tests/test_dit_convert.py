"""diffusers WanTransformer3DModel <-> WanDiT: same outputs both ways."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vidgen.models.dit import WanDiT, pack_samples
from vidgen.tools import convert_dit

diffusers = pytest.importorskip("diffusers")
TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=8,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
)


def load_diffusers(path):
    """Load a diffusers dir the way diffusers reads it (config + strict state dict).

    ``WanTransformer3DModel.from_pretrained`` itself needs ``accelerate`` for its fp32-module
    handling, which this environment lacks; the config/weights contract is the same.
    """
    model = diffusers.WanTransformer3DModel.from_config(
        diffusers.WanTransformer3DModel.load_config(path)
    )
    model.load_state_dict(load_file(path / convert_dit.DIFFUSERS_WEIGHTS), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    torch.manual_seed(0)
    reference = diffusers.WanTransformer3DModel(**TINY).eval()
    reference.save_pretrained(root / "diffusers")
    convert_dit.main(["--from-diffusers", str(root / "diffusers"), "--out", str(root / "ours")])
    return root, reference, WanDiT.from_pretrained(root / "ours").eval()


def wan_padded(ctx: torch.Tensor) -> torch.Tensor:
    """Context as Wan / WanPipeline feed the model: zero-padded to 512 tokens."""
    return torch.nn.functional.pad(ctx, (0, 0, 0, convert_dit.WAN_TEXT_LEN - ctx.shape[1]))


def test_converted_model_matches_diffusers(converted):
    _, reference, ours = converted
    assert ours.config["text_len"] == convert_dit.WAN_TEXT_LEN
    g = torch.Generator().manual_seed(1)
    x, ctx, t = (
        torch.randn(2, 4, 3, 4, 6, generator=g),
        torch.randn(2, 5, 8, generator=g),
        torch.tensor([0.3, 0.8]),
    )
    with torch.no_grad():
        expected = reference(x, 1000 * t, wan_padded(ctx)).sample
        assert expected.abs().max() > 0.1
        # the real tokens in, Wan's padding added by the model itself
        torch.testing.assert_close(ours(x, t, ctx), expected, atol=1e-5, rtol=1e-5)
        # a masked shorter caption: its masked-out tokens are zeroed, then padded
        mask = torch.tensor([[True] * 2 + [False] * 3, [True] * 5])
        first = reference(x[:1], 1000 * t[:1], wan_padded(ctx[:1, :2])).sample[0]
        torch.testing.assert_close(ours(x, t, ctx, mask)[0], first, atol=1e-5, rtol=1e-5)
        # and packed, each sample with its own text length
        samples = [dict(latent=x[i], context=ctx[i, : 2 + 3 * i], t=float(t[i])) for i in range(2)]
        outs = ours.forward_packed(pack_samples(samples, (1, 2, 2), 64)[0])
        torch.testing.assert_close(outs[1], expected[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outs[0], first, atol=1e-5, rtol=1e-5)
        # the convention matters: unpadded, diffusers' model gives another output
        assert (reference(x, 1000 * t, ctx).sample - expected).abs().max() > 1e-2


def test_masked_text_convention_matches_diffusers_on_exact_tokens(converted):
    root, reference, _ = converted
    ours = WanDiT.from_pretrained(root / "ours", text_len=None).eval()
    assert "text_len" not in ours.config
    g = torch.Generator().manual_seed(2)
    x, ctx, t = torch.randn(1, 4, 3, 4, 6, generator=g), torch.randn(1, 5, 8, generator=g), torch.tensor([0.4])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, ctx), reference(x, 1000 * t, ctx).sample, atol=1e-5, rtol=1e-5)


def test_too_long_captions_are_an_error_naming_text_len(converted):
    _, _, ours = converted
    x, ctx = torch.randn(1, 4, 1, 4, 4), torch.randn(1, convert_dit.WAN_TEXT_LEN + 1, 8)
    with pytest.raises(ValueError, match="513 text tokens, more than this model's text_len=512"):
        ours(x, torch.tensor([0.5]), ctx)
    samples = [dict(latent=x[0], context=ctx[0], t=0.5)]
    with pytest.raises(ValueError, match="513 text tokens, more than the model's text_len=512"):
        ours.forward_packed(pack_samples(samples, (1, 2, 2), 64)[0])


def test_export_back_loads_in_diffusers_with_same_output(converted, tmp_path):
    root, reference, _ = converted
    convert_dit.main(["--to-diffusers", str(root / "ours"), "--out", str(tmp_path / "back")])
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["_class_name"] == "WanTransformer3DModel" and config["attention_head_dim"] == 12
    assert config[convert_dit.TEXT_LEN_KEY] == convert_dit.WAN_TEXT_LEN  # kept for the way back
    back = load_diffusers(tmp_path / "back")
    for key, value in reference.state_dict().items():  # renaming only: bit-exact
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)
    x, ctx, t = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 3, 8), torch.tensor([500.0])
    with torch.no_grad():
        torch.testing.assert_close(
            back(x, t, ctx).sample, reference(x, t, ctx).sample, rtol=0, atol=0
        )


def test_sharded_diffusers_checkpoints_convert(converted, tmp_path):
    root, _, ours = converted
    state = load_file(root / "diffusers" / convert_dit.DIFFUSERS_WEIGHTS)
    keys = sorted(state)
    shards = {
        "part-1.safetensors": keys[: len(keys) // 2],
        "part-2.safetensors": keys[len(keys) // 2 :],
    }
    src = tmp_path / "sharded"
    src.mkdir()
    (src / "config.json").write_text((root / "diffusers" / "config.json").read_text())
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, src / name)
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (src / convert_dit.DIFFUSERS_INDEX).write_text(json.dumps(index))
    model = convert_dit.from_diffusers(str(src), str(tmp_path / "out"))
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_unsupported_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="pos_embed_seq_len=514: first-last-frame"):
        convert_dit.config_from_diffusers({**TINY_I2V, "pos_embed_seq_len": 514})
    with pytest.raises(ValueError, match="qk_norm=False has no diffusers equivalent"):
        convert_dit.config_to_diffusers({"qk_norm": False})
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        convert_dit.from_diffusers(str(tmp_path / "nope"), str(tmp_path / "out"))


# Wan2.1 I2V layout: 16 noisy + 4 mask + 16 first-frame channels (here 4 + 4 + 4), CLIP tokens.
TINY_I2V = dict(TINY, in_channels=12, image_dim=20, added_kv_proj_dim=24)
TEXT_LEN = 512  # diffusers' I2V attention cuts [image tokens | text] at len - 512


@pytest.fixture(scope="module")
def converted_i2v(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_i2v")
    torch.manual_seed(0)
    reference = diffusers.WanTransformer3DModel(**TINY_I2V).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but make every branch matter
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference.save_pretrained(root / "diffusers")
    convert_dit.main(["--from-diffusers", str(root / "diffusers"), "--out", str(root / "ours")])
    return root, reference, WanDiT.from_pretrained(root / "ours").eval()


def i2v_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, 4, 3, 4, 6, generator=g),
        cond=torch.randn(batch, 8, 3, 4, 6, generator=g),
        ctx=torch.randn(batch, TEXT_LEN, 8, generator=g),
        image=torch.randn(batch, 5, 20, generator=g),
        t=torch.tensor([0.3, 0.8][:batch]),
    )


def test_converted_i2v_model_matches_diffusers_with_image_tokens(converted_i2v):
    _, reference, ours = converted_i2v
    assert ours.config["image_dim"] == 20 and ours.cond_channels == 8
    a = i2v_inputs()
    with torch.no_grad():
        expected = reference(
            torch.cat([a["x"], a["cond"]], 1), 1000 * a["t"], a["ctx"],
            encoder_hidden_states_image=a["image"],
        ).sample
        got = ours(a["x"], a["t"], a["ctx"], cond=a["cond"], image=a["image"])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # the image tokens change the output: the image branch is exercised, not bypassed
        other = ours(a["x"], a["t"], a["ctx"], cond=a["cond"], image=torch.zeros_like(a["image"]))
        assert (other - expected).abs().max() > 1e-3
        # packed, both samples at once, each with its own conditioning
        samples = [dict(latent=a["x"][i], context=a["ctx"][i], cond=a["cond"][i], image=a["image"][i],
                        t=float(a["t"][i])) for i in range(2)]
        outs = ours.forward_packed(pack_samples(samples, (1, 2, 2), 64)[0])
        for i in range(2):
            torch.testing.assert_close(outs[i], expected[i], atol=1e-5, rtol=1e-5)


def test_i2v_export_back_loads_in_diffusers_bit_exact(converted_i2v, tmp_path):
    root, reference, _ = converted_i2v
    convert_dit.main(["--to-diffusers", str(root / "ours"), "--out", str(tmp_path / "back")])
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["image_dim"], config["added_kv_proj_dim"], config["in_channels"]) == (20, 24, 12)
    back = load_diffusers(tmp_path / "back")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)


def test_masked_models_round_trip_and_warn_that_diffusers_pads(converted, tmp_path):
    root, _, _ = converted
    convert_dit.main(["--from-diffusers", str(root / "diffusers"), "--out", str(tmp_path / "masked"),
                      "--text-len", "none"])
    assert "text_len" not in WanDiT.from_pretrained(tmp_path / "masked").config
    with pytest.warns(UserWarning, match="exact tokens with a mask, which diffusers"):
        convert_dit.to_diffusers(str(tmp_path / "masked"), str(tmp_path / "back"))
    convert_dit.from_diffusers(str(tmp_path / "back"), str(tmp_path / "again"))
    assert "text_len" not in WanDiT.from_pretrained(tmp_path / "again").config  # not 512


# ---- sampling a converted model as Wan samples it: diffusers' own schedulers, padded text ----


def _captions(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 8, generator=g), torch.randn(6, 8, generator=g)], torch.randn(1, 8, generator=g)


def _diffusers_loop(reference, scheduler, texts, empty, shape, cfg, seed=0):
    """WanPipeline's denoising loop: padded prompts, CFG, ``scheduler.step`` on integer timesteps."""
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i))
                     for i in range(len(texts))])
    cond = torch.cat([wan_padded(t[None]) for t in texts])
    uncond = wan_padded(empty[None]).expand(len(texts), -1, -1)
    for timestep in scheduler.timesteps:
        ts = timestep.expand(len(texts))
        v_cond = reference(x, ts, cond).sample
        v_uncond = reference(x, ts, uncond).sample
        x = scheduler.step(v_uncond + cfg * (v_cond - v_uncond), timestep, x, return_dict=False)[0]
    return x


@pytest.fixture(scope="module")
def lively(tmp_path_factory):
    """A converted pair with every weight perturbed (diffusers zero-inits its output head)."""
    root = tmp_path_factory.mktemp("lively")
    torch.manual_seed(5)
    reference = diffusers.WanTransformer3DModel(**TINY).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference.save_pretrained(root / "diffusers")
    convert_dit.main(["--from-diffusers", str(root / "diffusers"), "--out", str(root / "ours")])
    return reference, WanDiT.from_pretrained(root / "ours").eval()


def test_generate_latents_euler_equals_the_padded_diffusers_flow_match_loop(lively):
    from vidgen.diffusion.generate import generate_latents
    from vidgen.diffusion.sampling import timesteps_schedule

    reference, ours = lively
    texts, empty = _captions()
    shape, steps, shift = (4, 3, 4, 6), 10, 3.0
    got = generate_latents(ours, texts, empty, shape, steps=steps, solver="euler", cfg_scale=5.0,
                           shift=shift, seed=0)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=timesteps_schedule(steps, 1.0)[:-1].numpy())  # the same sigmas
    with torch.no_grad():
        expected = _diffusers_loop(reference, scheduler, texts, empty, shape, cfg=5.0)
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # the masked convention is another model: far from Wan's loop
    masked = WanDiT(**{k: v for k, v in ours.config.items() if k != "text_len"})
    masked.load_state_dict(ours.state_dict())
    other = generate_latents(masked.eval(), texts, empty, shape, steps=steps, cfg_scale=5.0, shift=shift)
    assert (other - expected).abs().max() > 0.1


def test_unipc_solver_equals_diffusers_unipc_loop_as_wan_pipeline_runs_it(lively):
    from vidgen.diffusion.generate import generate_latents

    reference, ours = lively
    texts, empty = _captions(4)
    shape, steps, shift = (4, 3, 4, 6), 12, 3.0
    got = generate_latents(ours, texts, empty, shape, steps=steps, solver="unipc", cfg_scale=5.0,
                           shift=shift, seed=7)
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  num_train_timesteps=1000, flow_shift=shift)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        expected = _diffusers_loop(reference, scheduler, texts, empty, shape, cfg=5.0, seed=7)
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    euler = generate_latents(ours, texts, empty, shape, steps=steps, solver="euler", cfg_scale=5.0,
                             shift=shift, seed=7)
    assert (euler - expected).abs().max() > 1e-3  # a different solver: the test can tell them apart
