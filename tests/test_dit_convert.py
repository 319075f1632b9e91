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


def test_converted_model_matches_diffusers(converted):
    _, reference, ours = converted
    g = torch.Generator().manual_seed(1)
    x, ctx, t = (
        torch.randn(2, 4, 3, 4, 6, generator=g),
        torch.randn(2, 5, 8, generator=g),
        torch.tensor([0.3, 0.8]),
    )
    with torch.no_grad():
        expected = reference(x, 1000 * t, ctx).sample
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(ours(x, t, ctx), expected, atol=1e-5, rtol=1e-5)
        # and packed, for one sample at a time of a packed pair
        samples = [dict(latent=x[i], context=ctx[i, : 2 + 3 * i], t=float(t[i])) for i in range(2)]
        outs = ours.forward_packed(pack_samples(samples, (1, 2, 2), 64)[0])
        torch.testing.assert_close(outs[1], expected[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            outs[0], reference(x[:1], 1000 * t[:1], ctx[:1, :2]).sample[0], atol=1e-5, rtol=1e-5
        )


def test_export_back_loads_in_diffusers_with_same_output(converted, tmp_path):
    root, reference, _ = converted
    convert_dit.main(["--to-diffusers", str(root / "ours"), "--out", str(tmp_path / "back")])
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["_class_name"] == "WanTransformer3DModel" and config["attention_head_dim"] == 12
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
