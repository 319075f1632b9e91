"""InceptionI3d: reference state-dict layout, forward shapes, strict loading."""

import pytest
import torch

from vidgen.metrics.i3d import InceptionI3d, load_i3d, same_pad


@pytest.fixture(scope="module")
def i3d():
    return InceptionI3d()


def test_state_dict_matches_reference_layout(i3d):
    sd = i3d.state_dict()
    # Keys and shapes of piergiaj/pytorch-i3d's InceptionI3d(400), the layout of
    # i3d_pretrained_400.pt: 57 conv+BN units (3 stem + 9 blocks x 6) at 6 entries each,
    # plus the logits conv's weight and bias.
    assert len(sd) == 57 * 6 + 2
    expected = {
        "Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7),
        "Conv3d_1a_7x7.bn.running_mean": (64,),
        "Conv3d_1a_7x7.bn.num_batches_tracked": (),
        "Conv3d_2b_1x1.conv3d.weight": (64, 64, 1, 1, 1),
        "Conv3d_2c_3x3.conv3d.weight": (192, 64, 3, 3, 3),
        "Mixed_3b.b0.conv3d.weight": (64, 192, 1, 1, 1),
        "Mixed_3b.b1b.conv3d.weight": (128, 96, 3, 3, 3),
        "Mixed_3b.b3b.bn.running_var": (32,),
        "Mixed_4f.b2b.conv3d.weight": (128, 32, 3, 3, 3),
        "Mixed_5c.b0.conv3d.weight": (384, 832, 1, 1, 1),
        "Mixed_5c.b3b.bn.bias": (128,),
        "logits.conv3d.weight": (400, 1024, 1, 1, 1),
        "logits.conv3d.bias": (400,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    blocks = [
        "Mixed_3b",
        "Mixed_3c",
        "Mixed_4b",
        "Mixed_4c",
        "Mixed_4d",
        "Mixed_4e",
        "Mixed_4f",
        "Mixed_5b",
        "Mixed_5c",
    ]
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "logits", *blocks}
    assert not any(k.startswith("Mixed_3b.b3a") for k in sd)  # the pool branch has no weights
    assert sum(p.numel() for p in i3d.parameters()) == 12_697_264


def test_forward_small_input_gives_400_logits(i3d):
    # The protocol input is [N, 3, 16, 224, 224]; 64x64 keeps the test cheap (the final pool
    # window is clamped to the smaller feature map).
    x = torch.rand(2, 3, 16, 64, 64) * 2 - 1
    with torch.no_grad():
        y = i3d(x)
    assert y.shape == (2, 400) and torch.isfinite(y).all()
    with torch.no_grad():  # batch elements are independent (eval-mode BatchNorm)
        assert torch.allclose(i3d(x[1:]), y[1:], atol=1e-4)


def test_random_init_is_seeded_and_informative(i3d):
    # The test backbone of metrics.random_backbones: He-normal convs, identity BatchNorm,
    # a unit-variance logits layer, from a private generator: the global RNG plays no part.
    torch.manual_seed(123)
    again = InceptionI3d(seed=0)
    other = InceptionI3d(seed=1)
    for key, value in i3d.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert not torch.equal(other.Mixed_4b.b1b.conv3d.weight, i3d.Mixed_4b.b1b.conv3d.weight)
    assert i3d.weights.startswith("random:seed=0") and other.weights.startswith("random:seed=1")
    w = i3d.Mixed_5c.b0.conv3d.weight  # fan_in 832: std sqrt(2 / 832) = 0.049
    assert w.std().item() == pytest.approx((2 / 832) ** 0.5, rel=0.02)
    assert torch.equal(i3d.Mixed_5c.b0.bn.running_var, torch.ones(384))
    assert i3d.logits.conv3d.weight.std().item() == pytest.approx(1024**-0.5, rel=0.02)
    assert torch.equal(i3d.logits.conv3d.bias, torch.zeros(400))
    # Logits move with the input: a clip at half contrast (test_metrics_fvd.py has the
    # spread over synthetic clips and the FVD consequences).
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 16, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        y = i3d(torch.cat([x, 0.5 * x]))
    assert (y[0] - y[1]).abs().mean().item() > 0.1 * y.abs().mean().item()


def test_forward_stays_in_eval_mode(i3d):
    torch.nn.Sequential(i3d).train()  # e.g. a parent module entering training
    assert not i3d.training and not i3d.Mixed_3b.b0.bn.training


def test_forward_rejects_wrong_shape(i3d):
    with pytest.raises(ValueError, match=r"expects \[N, 3, T, H, W\]"):
        i3d(torch.zeros(1, 16, 3, 64, 64))


def test_same_padding_follows_tensorflow():
    x = torch.zeros(1, 1, 16, 224, 224)
    # 7x7x7 stride 2: TF pads 2 front / 3 back in T (16 -> 8) and 2 / 3 in H, W (224 -> 112).
    assert same_pad(x, (7, 7, 7), (2, 2, 2)).shape[2:] == (16 + 5, 224 + 5, 224 + 5)
    # 3x3 stride 2 on an odd size 7: ceil(7/2)=4 outputs need (4-1)*2+3-7 = 2 pad.
    assert same_pad(torch.zeros(1, 1, 1, 7, 7), (1, 3, 3), (1, 2, 2)).shape[2:] == (1, 9, 9)


def test_load_i3d_missing_file_names_path(tmp_path):
    path = tmp_path / "nowhere" / "i3d_pretrained_400.pt"
    with pytest.raises(FileNotFoundError, match="i3d_pretrained_400.pt") as err:
        load_i3d(path)
    assert str(path) in str(err.value) and "no fallback" in str(err.value)


def test_load_i3d_roundtrip_and_strictness(tmp_path, i3d):
    sd = {k: v.clone() for k, v in i3d.state_dict().items()}
    sd["logits.conv3d.bias"].normal_()
    # Files saved by older torch lack the BatchNorm counters; they still load.
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "i3d.pt")
    loaded = load_i3d(tmp_path / "i3d.pt")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.logits.conv3d.bias, sd["logits.conv3d.bias"])
    assert loaded.weights == str(tmp_path / "i3d.pt")

    bad = dict(sd)
    bad["module.extra"] = bad.pop("Mixed_5c.b0.conv3d.weight")
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"1 missing keys \['Mixed_5c.b0.conv3d.weight'\]"):
        load_i3d(tmp_path / "bad.pt")

    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module, not a state dict
    with pytest.raises(ValueError, match="plain state dict"):
        load_i3d(tmp_path / "module.pt")
