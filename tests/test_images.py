"""Images in the same pipeline as videos: img2dataset-layout shards (`{key}.jpg` + `.txt` +
`.json` with width/height), `make_shards` over folders and lists of images, decoding in the
workers into 1-frame buckets, corrupt / hostile / too-small images skipped and counted, and
images in the stages that use them: VAE stage 1, VAE stage 3 mixed with clips,
`encode_latents` (one latent frame) and the DiT trained on packs of image and clip latents."""

import csv
import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from test_data_pipeline import clip_frames, collect
from test_dit_train import _cfg as dit_cfg
from test_dit_train import _one_text_encoder, setup  # noqa: F401  (fixtures)
from test_latents import encode
from test_train import _cfg as vae_cfg

from vidgen.data.latents import LatentDataModule
from vidgen.data.make_shards import make_shards
from vidgen.data.pipeline import build_video_dataset
from vidgen.data.video import decode_image, resize_crop
from vidgen.run import train


def picture(height, width, seed):
    return clip_frames(1, height, width, seed)[0]  # uint8 [H, W, 3]


def encoded(frame, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, fmt, **kw)
    return buf.getvalue()


def png_claiming(width, height) -> bytes:
    """A hostile PNG: a 1x1 image whose header claims ``width x height`` (CRC fixed up)."""
    import struct
    import zlib

    data = bytearray(encoded(np.zeros((1, 1, 3), np.uint8), "PNG"))
    ihdr = 8  # after the signature: length (4), b"IHDR" (4), width, height, ...
    assert data[ihdr + 4:ihdr + 8] == b"IHDR"
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4:ihdr + 8 + 13]))
    data[ihdr + 8 + 13:ihdr + 8 + 17] = struct.pack(">I", crc)
    return bytes(data)


def write_img2dataset_shard(path, images, start=0):
    """A shard as img2dataset's WebDatasetSampleWriter writes it: `jpg` (whatever the
    encode format), `txt`, `json` (indent=4) with url, key, status, caption, width, height,
    original_width, original_height, exif, sha256; failed downloads are not in the tar."""
    with wds.TarWriter(str(path)) as tar:
        for i, (data, caption, (h, w)) in enumerate(images, start=start):
            key = f"{i:09d}"
            meta = {"url": f"https://example.com/{i}.jpg", "caption": caption, "key": key, "status": "success",
                    "error_message": None, "width": w, "height": h, "original_width": 2 * w,
                    "original_height": 2 * h, "exif": "{}", "sha256": "0" * 64}
            tar.write({"__key__": key, "jpg": data, "txt": caption, "json": json.dumps(meta, indent=4)})
    return path


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    """images/00000.tar and 00001.tar: 12 JPEGs each of 40x48 (h x w), captioned."""
    out = tmp_path_factory.mktemp("images")
    for s in range(2):
        images = [(encoded(picture(40, 48, 100 * s + i)), f"a picture {s}-{i}", (40, 48)) for i in range(12)]
        write_img2dataset_shard(out / f"{s:05d}.tar", images, start=12 * s)
    return out


def _read(shards, **kw):
    kw = dict(dict(resampled=False, num_frames=1, height=32, width=32, batch_size=4), **kw)
    return collect(build_video_dataset(str(shards), **kw))


def test_img2dataset_shards_decode_into_1_frame_buckets(image_shards):
    batches, keys, skipped = _read(image_shards)
    assert len(keys) == 24 and not any(skipped.values())
    first = batches[0]
    assert first["video"].shape == (4, 3, 1, 32, 32) and first["bucket"] == "1x32x32"
    assert first["meta"][0]["image"] is True and first["meta"][0]["frame_indices"] == [0]
    # the reference: PIL's decode and the same resize-crop
    raw = next(iter(wds.WebDataset(str(image_shards / "00000.tar"), shardshuffle=False)))
    expected = resize_crop(np.array(Image.open(io.BytesIO(raw["jpg"])).convert("RGB"))[None], 32, 32)
    torch.testing.assert_close(first["video"][0], expected, rtol=0, atol=0)


def test_formats_modes_aspect_buckets_and_image_mode(tmp_path):
    frame = picture(36, 72, 0)  # 2:1
    images = [(encoded(frame, "PNG"), "png", (36, 72)), (encoded(frame, "WEBP", quality=90), "webp", (36, 72)),
              (encoded(np.ascontiguousarray(frame[:, :, 0]), "PNG"), "grey", (36, 72)),
              (encoded(frame, "JPEG"), "jpeg", (36, 72))]
    shard = write_img2dataset_shard(tmp_path / "mixed.tar", images)
    # aspect-ratio buckets: every 2:1 image lands in the 2:1 bucket
    batches, keys, skipped = _read(shard, buckets=["1x32x32", "1x32x64", "9x32x64"], batch_size=1)
    assert len(keys) == 4 and {b["bucket"] for b in batches} == {"1x32x64"}
    assert batches[2]["video"].shape == (1, 3, 1, 32, 64)  # grey became RGB
    assert torch.equal(batches[2]["video"][0, 0], batches[2]["video"][0, 1])
    # image mode (VAE stage 1) takes images and single video frames alike
    batches, keys, _ = _read(shard, mode="image", num_frames=17, height=32, width=32, batch_size=2)
    assert len(keys) == 4 and batches[0]["video"].shape == (2, 3, 1, 32, 32)


def test_bad_images_are_skipped_and_counted(tmp_path, caplog):
    good = encoded(picture(40, 48, 1))
    bomb = png_claiming(15000, 15000)  # 225 Mpx > 2x PIL's MAX_IMAGE_PIXELS: refused unread
    images = [(good[: len(good) // 2], "truncated", (40, 48)), (b"\x89PNG not really" * 30, "garbage", (40, 48)),
              (bomb, "bomb", (15000, 15000)), (encoded(picture(20, 24, 2)), "small", (20, 24)),
              (good, "fine", (40, 48))]
    shard = write_img2dataset_shard(tmp_path / "bad.tar", images)
    _, keys, skipped = _read(shard, batch_size=1)
    assert keys == ["000000004"]
    assert skipped["decode_error"] == 3 and skipped["too_small"] == 1, skipped
    assert "DecompressionBombError" in caplog.text and "images are not upscaled" in caplog.text
    # an image in a stream without any 1-frame bucket is counted, naming what would fit
    caplog.clear()
    _, keys, _ = _read(shard, num_frames=5, batch_size=1)
    assert keys == [] and caplog.text.count("(too_short): an image fits only 1-frame buckets") == 5


def jpeg_claiming(width, height) -> bytes:
    """A hostile JPEG: a 16x16 image whose frame header (SOF0) claims ``width x height``."""
    import struct

    data = bytearray(encoded(np.zeros((16, 16, 3), np.uint8)))
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height, width
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_jpegs_decode_as_pil_decodes_them_and_bad_ones_raise():
    """The libjpeg-turbo (simplejpeg) path gives PIL's pixels for the JPEG kinds users bring;
    CMYK goes through PIL; truncated and hostile JPEGs raise what the pipeline counts."""
    frame = picture(40, 48, 3)
    grey, cmyk = (Image.fromarray(frame).convert(mode) for mode in ("L", "CMYK"))
    cases = [encoded(frame), encoded(frame, subsampling=0, quality=95), encoded(frame, progressive=True),
             _save(grey), _save(cmyk)]
    for data in cases:
        want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        got = decode_image(data)
        assert got.shape == (1, 40, 48, 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got[0], want)
    with pytest.raises(OSError, match="undecodable JPEG: Premature end of JPEG"):
        decode_image(cases[0][:-20])  # entropy-coded data cut short
    with pytest.raises(OSError, match="undecodable JPEG"):
        decode_image(b"\xff\xd8 not a jpeg" * 20)
    with pytest.raises(Image.DecompressionBombError, match="15000x15000 JPEG"):
        decode_image(jpeg_claiming(15000, 15000))


def _save(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG")
    return buf.getvalue()


def test_image_size_is_probed_when_the_json_lacks_it(tmp_path):
    with wds.TarWriter(str(tmp_path / "bare.tar")) as tar:
        for i in range(3):
            tar.write({"__key__": f"k{i}", "png": encoded(picture(40, 48, i), "PNG"), "txt": f"picture {i}"})
    batches, keys, skipped = _read(tmp_path / "bare.tar", batch_size=3)
    assert keys == ["k0", "k1", "k2"] and batches[0]["counts"]["probed_meta"] == 3
    assert (batches[0]["meta"][0]["height"], batches[0]["meta"][0]["width"]) == (40, 48)


def test_make_shards_takes_folders_and_lists_of_images(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(picture(40, 48, 0)).save(src / "a.jpg", quality=95)
    Image.fromarray(picture(50, 30, 1)).save(src / "b.png")
    Image.fromarray(picture(40, 40, 2)).save(src / "c.bmp")  # stored as PNG
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    for name in ("a", "b", "c", "broken"):
        (src / f"{name}.txt").write_text(f"caption {name}")
    Image.fromarray(picture(40, 48, 3)).save(src / "nocap.webp")
    summary = make_shards(src, tmp_path / "out", progress=False, min_frames=17)  # min_frames: videos only
    assert summary["written"] == summary["images"] == 3
    assert summary["skipped"] == {"no_caption": 1, "unreadable": 1, "too_short": 0}
    raw = list(wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False))
    assert [sorted(k for k in r if not k.startswith("__")) for r in raw] == [
        ["jpg", "json", "txt"], ["json", "png", "txt"], ["json", "png", "txt"]]
    assert raw[0]["jpg"] == (src / "a.jpg").read_bytes()  # stored byte for byte
    assert json.loads(raw[1]["json"])["height"] == 50
    with open(tmp_path / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerow(["src/a.jpg", "from a list"])
    summary = make_shards(tmp_path / "list.csv", tmp_path / "out2", progress=False, reencode=True, max_side=24)
    (r,) = list(wds.WebDataset(str(tmp_path / "out2" / "shard-000000.tar"), shardshuffle=False))
    assert decode_image(r["jpg"]).shape == (1, 20, 24, 3) and json.loads(r["json"])["source_width"] == 48
    _, keys, _ = _read(tmp_path / "out", batch_size=1, height=24, width=24)
    assert len(keys) == 3


def test_vae_stage1_on_images_and_stage3_on_a_mixture_of_images_and_clips(tmp_path, image_shards, synthetic_data):
    s1 = tmp_path / "s1"
    metrics = train(vae_cfg(s1, synthetic_data, "demo/vae_stage1", f"data.train.shards={image_shards}",
                            "trainer.max_steps=3", "data.train.batches_per_epoch=3"))
    assert metrics["data/bucket_share/1x32x32"] == 1.0
    mixture = (f"[{{name: clips, shards: '{synthetic_data}/train', weight: 0.7}},"
               f" {{name: images, shards: '{image_shards}', weight: 0.3}}]")
    s3 = tmp_path / "s3"
    metrics = train(vae_cfg(s3, synthetic_data, "demo/vae_stage3", f"model.init_from={s1}",
                            "model.require_init_from=false", "data.train.shards=null",
                            f"data.train.sources={mixture}", "data.train.buckets=[5x32x32,1x32x32]",
                            "data.train.bucket_weights=null", "data.val.num_frames=5", "model.gan.start_step=0",
                            "trainer.max_steps=6", "data.train.batches_per_epoch=6", "data.batch_size=2"))
    assert metrics["data/source/clips/samples"] + metrics["data/source/images/samples"] == 12
    assert metrics["data/source/images/samples"] >= 1 and torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_images_become_one_latent_frame_and_train_the_dit_with_clips(tmp_path, image_shards, setup):  # noqa: F811
    from test_latents import cached_text_encoder

    import vidgen.text

    original, vidgen.text.build_text_encoder = vidgen.text.build_text_encoder, cached_text_encoder
    try:
        encode(setup / "vae", image_shards, tmp_path / "img_latents", "data.buckets=[1x32x32]",
               "data.num_frames=1", "chunked=false")
    finally:
        vidgen.text.build_text_encoder = original
    dm = LatentDataModule(train=dict(shards=str(tmp_path / "img_latents"), max_tokens=40, resampled=False),
                          patch_size=(1, 2, 2))
    packs = [b["packed"] for b in dm.train_dataset(rank=0, world_size=1).iterate()]
    assert sum(p.num_samples for p in packs) == 24 and {tuple(g) for p in packs for g in p.grids} == {(1, 2, 2)}  # 1 latent frame, 32 px / 8 / patch 2
    mixed = LatentDataModule(train=dict(
        sources=[dict(name="clips", shards=str(setup / "train"), weight=0.7),
                 dict(name="images", shards=str(tmp_path / "img_latents"), weight=0.3)],
        max_tokens=64, buckets=["5x32x32", "1x32x32"], batches_per_epoch=6), patch_size=(1, 2, 2))
    frames = [sorted({g[0] for g in b["packed"].grids}) for b in mixed.train_dataset(rank=0, world_size=1).iterate()]
    assert [1, 2] in frames, frames  # images (1 latent frame) and 5-frame clips (2) in one pack
    mixture = (f"[{{name: clips, shards: '{setup}/train', weight: 0.7}},"
               f" {{name: images, shards: '{tmp_path}/img_latents', weight: 0.3}}]")
    metrics = train(dit_cfg(tmp_path / "dit", setup, "demo/dit_stage1", "data.train.shards=null",
                            f"data.train.sources={mixture}", "data.train.max_tokens=64", "data.train.buckets=[5x32x32,1x32x32]",
                            "trainer.max_steps=4", "trainer.limit_val_batches=0"))
    assert metrics["data/source/images/samples"] >= 1 and metrics["data/source/clips/samples"] >= 1
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
