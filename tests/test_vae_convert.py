"""diffusers AutoencoderKLWan <-> WanVAE: same outputs both ways, latent statistics carried."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vidgen.models.vae import WanVAE
from vidgen.tools import convert_vae

diffusers = pytest.importorskip("diffusers")

TOL = dict(rtol=1e-5, atol=2e-5)
MEAN, STD = [0.5, -0.25, 0.125, 1.0], [1.5, 0.75, 2.0, 0.5]
TINY = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    latents_mean=MEAN,
    latents_std=STD,
)
# The released Wan2.1 vae/config.json (Wan-AI/Wan2.1-T2V-1.3B-Diffusers), written by 0.33.0.dev0
WAN21 = {
    "_class_name": "AutoencoderKLWan",
    "_diffusers_version": "0.33.0.dev0",
    "attn_scales": [],
    "base_dim": 96,
    "dim_mult": [1, 2, 4, 4],
    "dropout": 0.0,
    "latents_mean": [0.0] * 16,
    "latents_std": [1.0] * 16,
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
    "z_dim": 16,
}


def load_diffusers(path):
    """Load a diffusers folder as diffusers reads it: config + strict state dict.

    (`AutoencoderKLWan.from_pretrained` wants `accelerate` unless low_cpu_mem_usage=False;
    the folder contract is the same.)
    """
    model = diffusers.AutoencoderKLWan.from_config(diffusers.AutoencoderKLWan.load_config(path))
    model.load_state_dict(load_file(path / convert_vae.DIFFUSERS_WEIGHTS), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(root, diffusers reference, our import of it)."""
    root = tmp_path_factory.mktemp("convert_vae")
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKLWan(**TINY).eval()
    with torch.no_grad():  # move off the default init so a mixed-up tensor would show
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference.save_pretrained(root / "diffusers")
    convert_vae.main(["--from-diffusers", str(root / "diffusers"), "--out", str(root / "ours")])
    return root, reference, WanVAE.from_pretrained(root / "ours").eval()


def assert_same_outputs(ours: WanVAE, theirs, frames: int = 5) -> None:
    x = torch.rand(1, 3, frames, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior = theirs.encode(x).latent_dist
        mu, logvar = ours.encode(x)
        torch.testing.assert_close(mu, posterior.mean, **TOL)
        torch.testing.assert_close(logvar, posterior.logvar, **TOL)
        reference = theirs.decode(posterior.mean).sample
        torch.testing.assert_close(ours.decode(posterior.mean), reference, **TOL)
    assert (reference.abs() < 1).float().mean() > 0.5  # not a comparison of clamped values


def test_imported_model_matches_diffusers(converted):
    _, reference, ours = converted
    assert ours.config["temporal_downsample"] == [False, True, True]
    torch.testing.assert_close(ours.latents_mean, torch.tensor(MEAN))
    torch.testing.assert_close(ours.latents_std, torch.tensor(STD))
    assert_same_outputs(ours, reference)
    # both sides normalise latents the same way: z = (mu - mean) / std
    mu = torch.randn(1, 4, 2, 2, 2)
    mean = torch.tensor(reference.config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(reference.config.latents_std).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(ours.normalize(mu), (mu - mean) / std)


def test_export_loads_in_diffusers_bit_exact(converted, tmp_path):
    root, reference, ours = converted
    convert_vae.main(["--to-diffusers", str(root / "ours"), "--out", str(tmp_path / "back")])
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLWan" and config["_diffusers_version"]
    assert config["temperal_downsample"] == [False, True, True] and "temporal" not in config
    assert config["latents_mean"] == MEAN and config["latents_std"] == STD
    assert (config["scale_factor_spatial"], config["scale_factor_temporal"]) == (8, 4)
    back = load_diffusers(tmp_path / "back")
    assert back.config.latents_mean == MEAN and back.config.latents_std == STD
    for key, value in reference.state_dict().items():  # copied, never transformed: bit-exact
        assert torch.equal(back.state_dict()[key], value), key
    assert_same_outputs(ours, back, frames=9)


def test_export_of_our_own_model_matches_diffusers(tmp_path):
    torch.manual_seed(2)
    ours = WanVAE(
        base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(True, True)
    ).eval()
    ours.set_latent_stats([0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0])
    ours.save_pretrained(tmp_path / "ours")
    convert_vae.to_diffusers(tmp_path / "ours", tmp_path / "diffusers")
    theirs = load_diffusers(tmp_path / "diffusers")
    assert theirs.config.latents_mean == [0.1, 0.2, 0.3, 0.4]  # shortest float32 decimals
    assert theirs.config.scale_factor_spatial == 4
    assert_same_outputs(ours, theirs)


def test_export_from_a_lightning_ckpt_prefers_ema(tmp_path):
    torch.manual_seed(3)
    ours = WanVAE(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
    state = ours.state_dict()
    ema = {k: v + 1.0 for k, v in state.items() if not k.startswith("latents_")}
    ckpt = {
        "hyper_parameters": {"vae": ours.config},
        "state_dict": {f"vae.{k}": v for k, v in state.items()},
        "vidgen": {"ema": {"shadow": ema}},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    convert_vae.main(["--to-diffusers", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "e")])
    convert_vae.main(
        ["--to-diffusers", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "r"), "--no-ema"]
    )
    key = "decoder.conv_out.weight"
    assert torch.equal(load_file(tmp_path / "e" / convert_vae.DIFFUSERS_WEIGHTS)[key], ema[key])
    assert torch.equal(load_file(tmp_path / "r" / convert_vae.DIFFUSERS_WEIGHTS)[key], state[key])


def test_sharded_diffusers_folder_imports_the_same(converted, tmp_path):
    root, _, ours = converted
    state = load_file(root / "diffusers" / convert_vae.DIFFUSERS_WEIGHTS)
    keys = sorted(state)
    shards = {"part-1.safetensors": keys[::2], "part-2.safetensors": keys[1::2]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, sharded / name)
    weight_map = {k: name for name, names in shards.items() for k in names}
    (sharded / convert_vae.DIFFUSERS_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "config.json").write_text((root / "diffusers" / "config.json").read_text())
    again = convert_vae.from_diffusers(sharded, tmp_path / "ours")
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_encoder_attention_imports_key_for_key_but_does_not_export(tmp_path):
    # diffusers builds encoder attention for attn_scales but cannot run it (its encoder passes
    # the attention block a cache argument it does not take), so only the weights can be
    # compared: a strict load proves every tensor found its place
    torch.manual_seed(4)
    reference = diffusers.AutoencoderKLWan(**{**TINY, "attn_scales": [0.5]})
    reference.save_pretrained(tmp_path / "diffusers")
    ours = convert_vae.from_diffusers(tmp_path / "diffusers", tmp_path / "ours")
    assert ours.config["attn_scales"] == [0.5]
    qkv = [k for k in ours.state_dict() if k.startswith("encoder.") and k.endswith("to_qkv.weight")]
    assert len(qkv) == 2  # the mid block's and the one at scale 0.5
    for key, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    with pytest.raises(ValueError, match=r"attn_scales=\[0.5\].*cannot run them"):
        convert_vae.to_diffusers(tmp_path / "ours", tmp_path / "back")


def test_released_wan21_config_maps_to_the_wan21_architecture():
    kwargs = convert_vae.config_from_diffusers(WAN21)
    assert kwargs["base_dim"] == 96 and kwargs["z_dim"] == 16 and kwargs["temporal"]
    assert kwargs["dim_mult"] == [1, 2, 4, 4]
    assert kwargs["temporal_downsample"] == [False, True, True]
    with torch.device("meta"):
        model = WanVAE(**{k: v for k, v in kwargs.items() if not k.startswith("latents_")})
    assert (model.spatial_compression, model.temporal_compression) == (8, 4)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"is_residual": True, "patch_size": 2}, "Wan 2.2"),
        ({"decoder_base_dim": 256}, "decoder_base_dim=256"),
        ({"out_channels": 12}, "in_channels=3 != out_channels=12"),
        ({"_class_name": "AutoencoderKL"}, "expected 'AutoencoderKLWan'"),
        ({"clip_output": True}, r"unknown to this converter.*known keys"),
        ({"latents_mean": [0.0] * 48}, "48 values but z_dim=16"),
        ({"scale_factor_spatial": 16}, "contradicts the architecture, which compresses by 8"),
        ({"temperal_downsample": None}, r"lacks \['temperal_downsample'\]"),
    ],
)
def test_unrepresentable_diffusers_configs_are_refused(change, match):
    config = {**WAN21, **change}
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        convert_vae.config_from_diffusers(config)


def test_unrepresentable_exports_are_refused(tmp_path):
    image_vae = WanVAE(
        base_dim=8,
        z_dim=4,
        dim_mult=(1, 2),
        num_res_blocks=1,
        temporal_downsample=(False,),
        temporal=False,
    )
    with pytest.raises(ValueError, match="2D image VAE.*no diffusers equivalent"):
        convert_vae.config_to_diffusers(image_vae.config)
    two_x = WanVAE(
        base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(False, True)
    )
    with pytest.raises(ValueError, match="compresses time by 2"):
        convert_vae.config_to_diffusers(two_x.config)
    with pytest.raises(FileNotFoundError, match="neither diffusion_pytorch_model.safetensors"):
        (tmp_path / "config.json").write_text(json.dumps(WAN21))
        convert_vae.from_diffusers(tmp_path, tmp_path / "out")


def test_weights_that_do_not_fit_the_config_are_refused(converted, tmp_path):
    root, _, _ = converted
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((root / "diffusers" / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_res_blocks": 2}))
    weights = (root / "diffusers" / convert_vae.DIFFUSERS_WEIGHTS).read_bytes()
    (bad / convert_vae.DIFFUSERS_WEIGHTS).write_bytes(weights)
    with pytest.raises(ValueError, match=r"(?s)do not fit its config.json.*Missing key"):
        convert_vae.from_diffusers(bad, tmp_path / "out")
