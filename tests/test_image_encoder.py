"""CLIP image encoder for I2V: a tiny random CLIPVisionModel saved locally, penultimate layer, preprocessing."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from vidgen.image_encoder import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_ENCODER_NONE,
    CLIPImageEncoder,
    build_image_encoder,
)


def make_tiny_clip(path, seed: int = 0):
    """A tiny random CLIPVisionModel directory (16-d, 17 tokens at 32px); other tests use it."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(seed)
    CLIPVisionModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip_vision"))


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir):
    return build_image_encoder(str(tiny_clip_dir))


def _reference(model, x01, mean, std):
    """hidden_states[-2] of the model on an already image_size x image_size [0, 1] batch."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(pixel_values=(x01 - m) / s, output_hidden_states=True)
    return out.hidden_states[-2], out.last_hidden_state


def test_attributes_and_frozen(encoder):
    assert isinstance(encoder, CLIPImageEncoder)
    assert (encoder.dim, encoder.image_size, encoder.num_tokens) == (16, 32, 17)
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert encoder.to("cpu") is encoder


def test_encode_is_penultimate_layer_of_normalised_image(encoder):
    torch.manual_seed(1)
    images = torch.rand(2, 3, 48, 40) * 2 - 1
    tokens = encoder.encode(images)
    assert tokens.shape == (2, 17, 16) and tokens.dtype == torch.float32
    assert torch.isfinite(tokens).all()

    # input already 32x32: no resize, so the reference is exact
    small = torch.rand(2, 3, 32, 32) * 2 - 1
    ref, last = _reference(encoder.model, (small + 1) / 2, CLIP_MEAN, CLIP_STD)
    torch.testing.assert_close(encoder(small), ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref, last, atol=1e-3)  # the test can tell the layers apart

    # 48x40: short side 40 -> 32 (long 48 -> 38), bicubic antialias, center crop rows 3..35
    resized = F.interpolate(
        (images + 1) / 2, size=(38, 32), mode="bicubic", align_corners=False, antialias=True
    ).clamp(0, 1)
    ref, _ = _reference(encoder.model, resized[..., 3:35, :], CLIP_MEAN, CLIP_STD)
    torch.testing.assert_close(tokens, ref, atol=1e-5, rtol=1e-5)


def test_preprocessor_config_mean_std_are_used(tiny_clip_dir, encoder, tmp_path):
    path = tmp_path / "clip_custom"
    shutil.copytree(tiny_clip_dir, path)
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.3, 0.35]
    (path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": mean, "image_std": std, "crop_size": 32})
    )
    custom = CLIPImageEncoder(path)
    assert custom.mean == tuple(mean) and custom.std == tuple(std)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    out = custom.encode(images)
    assert not torch.allclose(out, encoder.encode(images), atol=1e-4)
    ref, _ = _reference(custom.model, (images + 1) / 2, mean, std)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_missing_dir_raises_file_not_found(tmp_path):
    missing = tmp_path / "no_such_clip"
    with pytest.raises(FileNotFoundError, match="no_such_clip"):
        CLIPImageEncoder(missing)
    with pytest.raises(FileNotFoundError, match="no_such_clip"):
        build_image_encoder(str(missing))
    missing.mkdir()  # exists but has no config.json
    with pytest.raises(FileNotFoundError, match="config.json"):
        CLIPImageEncoder(missing)


def test_non_clip_config_raises_value_error(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="bert"):
        CLIPImageEncoder(tmp_path)


def test_build_none():
    assert build_image_encoder(None) is None
    assert build_image_encoder("none") is None
    assert build_image_encoder("") is None
    assert "none" in IMAGE_ENCODER_NONE


@pytest.mark.parametrize(
    "bad", [torch.zeros(3, 32, 32), torch.zeros(2, 1, 32, 32), torch.zeros(2, 3, 32), [1, 2]]
)
def test_wrong_input_shape_raises(encoder, bad):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        encoder.encode(bad)
