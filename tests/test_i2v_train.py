"""Image-to-video end to end: encode_latents i2v=true, the latent loader, training from a T2V
DiT through train.py's entry point, the on-the-fly condition, and sampling from a png."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_dit_train import TINY_DIT, _cfg, _video_cfg, i2v_setup, setup  # noqa: F401
from test_latents import compose_tool, encode, read_tar

from vidgen.data.latents import INFO_NAME, LatentDataModule, decode_sample
from vidgen.data.pipeline import build_video_dataset
from vidgen.i2v import encode_condition_latent
from vidgen.image_encoder import build_image_encoder
from vidgen.models.dit import load_dit
from vidgen.models.vae import WanVAE
from vidgen.run import train

I2V_DIT = ["model.dit.in_channels=12"]  # 4 noisy + 4 mask + 4 first-frame latent (tiny VAE)


def _val_batches(synthetic_data):
    return build_video_dataset(synthetic_data / "val", num_frames=9, height=32, width=32, batch_size=4,
                               resampled=False, deterministic=True, rank=0, world_size=1)


def test_encode_latents_stores_the_first_frame_condition(i2v_setup, setup, synthetic_data):  # noqa: F811
    vae = WanVAE.from_pretrained(setup / "vae").eval()
    clip = build_image_encoder(str(i2v_setup / "clip_encoder"))
    info = json.loads((i2v_setup / "clip" / "val" / INFO_NAME).read_text())
    assert info["i2v"] == dict(temporal=4, image_encoder=str(i2v_setup / "clip_encoder"), image_dim=16)
    assert json.loads((i2v_setup / "none" / "val" / INFO_NAME).read_text())["i2v"]["image_dim"] is None
    stored = read_tar(i2v_setup / "clip" / "val" / "shard-000000.tar")
    without = read_tar(i2v_setup / "none" / "val" / "shard-000000.tar")
    n = 0
    for batch in _val_batches(synthetic_data):
        cond = encode_condition_latent(vae, batch["video"], chunked=False)
        tokens = clip.encode(batch["video"][:, :, 0])
        for i, key in enumerate(batch["key"]):
            t = decode_sample(stored[key]["safetensors"])
            torch.testing.assert_close(t["cond"], cond[i], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(t["image"], tokens[i], rtol=2e-3, atol=2e-3)  # stored float16
            assert not torch.allclose(t["cond"], t["latent"])  # zero frames after frame 0, not the clip
            assert sorted(decode_sample(without[key]["safetensors"])) == ["cond", "latent", "text"]
            n += 1
    assert n == 4
    # a T2V encode into an I2V folder is a different dataset: refused, not mixed
    with pytest.raises(ValueError, match="different settings .*i2v"):
        encode(setup / "vae", synthetic_data / "val", i2v_setup / "clip" / "val", "data.buckets=[9x32x32]")
    with pytest.raises(ValueError, match="image_encoder=.* needs i2v=true"):
        encode(setup / "vae", synthetic_data / "val", i2v_setup / "x", f"image_encoder={i2v_setup}")


def _first_batch(shards, **train):
    dm = LatentDataModule(train=dict(shards=str(shards), max_tokens=48, batches_per_epoch=2,
                                     shuffle_buffer=4, pack_buffer=4, **train), patch_size=(1, 2, 2))
    return next(iter(dm.train_dataset(rank=0, world_size=1)))["packed"]


def test_latent_loader_adds_the_mask_and_drops_the_image_for_guidance(i2v_setup):  # noqa: F811
    p = _first_batch(i2v_setup / "clip" / "train", cfg_dropout=0.0)
    assert p.num_samples == 4 and p.image.shape == (4 * 17, 16)
    assert p.cu_seqlens_img.tolist() == [0, 17, 34, 51, 68]
    for cond in p.unpack(p.cond):
        assert cond.shape == (8, 3, 4, 4)
        assert cond[:4, 0].eq(1).all() and cond[:4, 1:].eq(0).all()  # Wan's mask layout
        assert cond[4:].abs().max() > 0.1 and cond[4:, 1:].abs().max() > 0  # latent of frame, zeros
    dropped = _first_batch(i2v_setup / "clip" / "train", cfg_dropout=0.0, image_dropout=1.0)
    assert dropped.cond.eq(0).all() and dropped.image.eq(0).all()
    assert all(m["image_dropped"] for m in dropped.meta) and not dropped.context.eq(0).all()
    half = _first_batch(i2v_setup / "clip" / "train", cfg_dropout=0.0, image_dropout=0.5)
    assert half.cond.shape == p.cond.shape  # the same packing; some samples dropped (seeded)
    none = _first_batch(i2v_setup / "none" / "train")
    assert none.cond is not None and none.image is None


def test_image_dropout_needs_i2v_latents(setup):  # noqa: F811
    with pytest.raises(ValueError, match="image_dropout=0.1 but these latents carry no image"):
        _first_batch(setup / "train", image_dropout=0.1)


@pytest.fixture(scope="module")
def t2v_run(tmp_path_factory, setup):  # noqa: F811
    run = tmp_path_factory.mktemp("t2v") / "s1"
    train(_cfg(run, setup, "demo/dit_stage1", "trainer.max_steps=2", "trainer.limit_val_batches=0"))
    return run


def _i2v_cfg(run, setup, i2v_setup, flavour, *extra):  # noqa: F811
    return _cfg(run, setup, "demo/dit_i2v", f"data.train.shards={i2v_setup}/{flavour}/train",
                f"data.val.shards={i2v_setup}/{flavour}/val", *I2V_DIT, *extra)


def _png(path, rgb):
    Image.fromarray(np.full((32, 32, 3), rgb, dtype=np.uint8)).save(path)
    return path


def test_i2v_trains_from_t2v_exports_and_samples_from_a_png(tmp_path, setup, i2v_setup, t2v_run):  # noqa: F811
    from hydra.utils import instantiate

    from vidgen.diffusion.pipeline import generate
    from vidgen.sample import run as sample_run
    from vidgen.text import build_text_encoder

    cfg = _i2v_cfg(tmp_path / "i2v", setup, i2v_setup, "clip", "model.dit.image_dim=16",
                   f"model.init_from={t2v_run}", "trainer.max_steps=3",
                   "data.train.batches_per_epoch=3")
    module = instantiate(cfg.model)  # expanded from the T2V DiT: the same predictions at step 0
    t2v = load_dit(t2v_run).eval()
    x, t, ctx = torch.randn(2, 4, 3, 4, 4), torch.tensor([0.3, 0.7]), torch.randn(2, 5, 384)
    with torch.no_grad():
        torch.testing.assert_close(
            module.dit.eval()(x, t, ctx, cond=torch.randn(2, 8, 3, 4, 4), image=torch.randn(2, 17, 16)),
            t2v(x, t, ctx), rtol=1e-5, atol=1e-6)
    metrics = train(cfg)
    assert "val/loss" in metrics and torch.isfinite(torch.tensor(metrics["train/loss"]))
    run = tmp_path / "i2v"
    pipeline = json.loads((run / "dit" / "pipeline.json").read_text())
    assert pipeline["i2v"] == dict(image_encoder=str(i2v_setup / "clip_encoder"), cond_channels=8, image_dim=16)
    dit = load_dit(run).eval()
    assert dit.config["in_channels"] == 12 and dit.config["image_dim"] == 16
    assert sorted((run / "samples").glob("val_samples_*.png")), "validation sampled with the condition"

    # the CLI: png in, mp4 + sidecar out
    red = _png(tmp_path / "red.png", (220, 30, 30))
    sample = compose_tool("sample", [f"ckpt={run}", f"image={red}", "prompt=a red circle", "num_frames=9",
                                     "height=32", "width=32", "steps=2", "image_cfg_scale=1.5",
                                     f"out={tmp_path / 'samples'}"])
    paths = sample_run(sample)
    assert len(paths) == 1 and os.path.getsize(paths[0]) > 0
    sidecar = json.loads(open(paths[0].replace(".mp4", ".json")).read())
    assert sidecar["image"] == str(red) and sidecar["image_cfg_scale"] == 1.5

    # the image is what conditions the video: another first frame, another video
    vae = WanVAE.from_pretrained(setup / "vae").eval()
    text = build_text_encoder("minilm")
    clip = build_image_encoder(pipeline["i2v"]["image_encoder"])
    images = torch.stack([torch.full((3, 32, 32), v) for v in (-0.8, 0.8)])
    with torch.no_grad():
        a, b = generate(dit, vae, text, ["a", "a"], 9, 32, 32, steps=2, cfg_scale=3.0, images=images,
                        image_encoder=clip, image_cfg_scale=2.0)
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="image-to-video: pass image="):
        generate(dit, vae, text, ["a"], 9, 32, 32, steps=1)
    with pytest.raises(ValueError, match="takes image tokens of width 16; image encoder: none"):
        generate(dit, vae, text, ["a"], 9, 32, 32, steps=1, images=images[:1])


def test_i2v_without_image_encoder_trains(tmp_path, setup, i2v_setup, t2v_run):  # noqa: F811
    metrics = train(_i2v_cfg(tmp_path / "none", setup, i2v_setup, "none", f"model.init_from={t2v_run}",
                             "trainer.max_steps=2", "trainer.limit_val_batches=0"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    # latents with image tokens for a DiT without an image branch: named, with the fix
    with pytest.raises(Exception, match="model.dit.image_dim=None but .* width 16"):
        train(_i2v_cfg(tmp_path / "bad", setup, i2v_setup, "clip", "trainer.max_steps=1",
                       f"model.init_from={t2v_run}"))


def test_on_the_fly_condition_equals_the_stored_one(tmp_path, setup, i2v_setup, synthetic_data):  # noqa: F811
    from hydra.utils import instantiate

    cfg = _video_cfg(tmp_path / "otf", setup, synthetic_data, *I2V_DIT, "model.dit.image_dim=16",
                     f"model.image_encoder={i2v_setup / 'clip_encoder'}", "model.image_dropout=0.5",
                     "trainer.max_steps=2")
    module = instantiate(cfg.model)
    stored = read_tar(i2v_setup / "clip" / "val" / "shard-000000.tar")
    batch = next(iter(_val_batches(synthetic_data)))
    (p,) = module._packs(batch, train=False)
    conds, bounds = p.unpack(p.cond), p.cu_seqlens_img.tolist()
    for i, key in enumerate(batch["key"]):
        t = decode_sample(stored[key]["safetensors"])
        torch.testing.assert_close(conds[i][4:], t["cond"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p.image[bounds[i]: bounds[i + 1]], t["image"], rtol=2e-3, atol=2e-3)
    metrics = train(cfg)  # and it trains, with image dropout, in that mode
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_first_frames_tool_extracts_and_scores(tmp_path, synthetic_data):
    from vidgen.data.video import write_mp4
    from vidgen.tools.first_frames import extract, first_frame_psnr

    paths = extract(str(synthetic_data / "val"), 2, 9, 32, 32, tmp_path / "frames")
    batch = next(iter(_val_batches(synthetic_data)))
    first = ((batch["video"][0, :, 0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(paths[0])), first)  # frame 0 as eval.py reads it
    args = (tmp_path / "frames" / "sample_args.txt").read_text().splitlines()
    assert args[0] == f"prompt=[{batch['caption'][0]},{batch['caption'][1]}]" and str(paths[1]) in args[1]
    samples = tmp_path / "samples"
    samples.mkdir()
    other = np.asarray(Image.open(paths[1]))
    for name, frame0 in (("same", first), ("other", other)):
        write_mp4(np.stack([frame0] * 5), samples / f"{name}.mp4", fps=8)
        (samples / f"{name}.json").write_text(json.dumps({"image": str(paths[0])}))
    scores = dict(first_frame_psnr(samples))
    assert scores["same.mp4"] > 30 > scores["other.mp4"] + 5  # codec loss only vs another clip
