"""DiT training end to end through `vidgen.run.train` on tiny latents (CPU)."""

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from test_latents import _one_thread, cached_text_encoder, compose_tool, encode, make_tiny_vae  # noqa: F401, I001

from vidgen.data.latents import EMPTY_NAME, INFO_NAME, encode_sample
from vidgen.models.dit import load_dit
from vidgen.models.vae import WanVAE
from vidgen.run import register_configs, train
from vidgen.utils.checkpoint import load_checkpoint_file

ROOT = Path(__file__).resolve().parents[1]
TINY_DIT = ["model.dit.dim=32", "model.dit.ffn_dim=64", "model.dit.num_heads=2",
            "model.dit.num_layers=2", "model.dit.freq_dim=32", "model.dit.in_channels=4",
            "model.dit.out_channels=4"]


@pytest.fixture(autouse=True)
def _one_text_encoder(monkeypatch):
    import vidgen.text

    monkeypatch.setattr(vidgen.text, "build_text_encoder", cached_text_encoder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synthetic_data):
    """A tiny VAE with latent stats and its latents of the synthetic clips at 5x32x32 and 9x32x32."""
    from vidgen.tools import latent_stats

    root = tmp_path_factory.mktemp("dit")
    vae = make_tiny_vae(root / "vae")
    latent_stats.run(compose_tool("latent_stats", [
        f"ckpt={vae}", f"data.shards={synthetic_data}/train", "data.num_frames=9",
        "data.height=32", "data.width=32", "data.num_workers=0", "data.max_videos=8", "chunked=false"]))
    for split in ("train", "val"):
        import vidgen.text

        original, vidgen.text.build_text_encoder = vidgen.text.build_text_encoder, cached_text_encoder
        try:
            encode(vae, synthetic_data / split, root / split, "every_bucket=true",
                   "data.buckets=[5x32x32,9x32x32]", "chunked=false", "data.batch_size=8")
        finally:
            vidgen.text.build_text_encoder = original
    return root


@pytest.fixture(scope="module")
def i2v_setup(setup, synthetic_data):
    """I2V latents of the same clips at 9x32x32 with setup's VAE: <root>/clip/{train,val} with a
    tiny random CLIP's tokens (16-d, 17 per frame; the encoder in <root>/clip_encoder) and
    <root>/none/{train,val} with the latent condition only."""
    from test_image_encoder import make_tiny_clip

    import vidgen.text

    root = setup / "i2v"
    clip = make_tiny_clip(root / "clip_encoder")
    original, vidgen.text.build_text_encoder = vidgen.text.build_text_encoder, cached_text_encoder
    try:
        for flavour, encoder in (("clip", clip), ("none", "none")):
            for split in ("train", "val"):
                encode(setup / "vae", synthetic_data / split, root / flavour / split, "data.buckets=[9x32x32]",
                       "chunked=false", "data.batch_size=8", "i2v=true", f"image_encoder={encoder}")
    finally:
        vidgen.text.build_text_encoder = original
    return root


def _cfg(run_dir, setup, experiment="demo/dit_stage1", *extra):
    register_configs()
    overrides = [
        f"experiment={experiment}", f"paths.run_dir={run_dir}",
        f"data.train.shards={setup}/train", f"data.val.shards={setup}/val",
        f"model.vae_path={setup}/vae", "data.num_workers=0", "data.train.shuffle_buffer=16",
        "data.train.pack_buffer=16", "data.train.buckets=[9x32x32]", "data.train.max_tokens=48",
        "data.train.batches_per_epoch=10", "model.val.num_samples=2", "model.val.steps=2",
        "trainer.enable_progress_bar=false",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1", *TINY_DIT, *extra,
    ]
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)


def _rows(run_dir):
    with open(Path(run_dir) / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _series(run_dir, key):
    return [float(r[key]) for r in _rows(run_dir) if r.get(key)]


def _mean(xs):
    return sum(xs) / len(xs)


def test_trains_on_latents_logs_and_exports(tmp_path, setup):
    run = tmp_path / "s1"
    metrics = train(_cfg(run, setup, "demo/dit_stage1", "trainer.max_steps=30", "optim.lr=3e-3",
                         "optim.warmup_steps=2"))
    losses = _series(run, "train/loss")
    assert len(losses) == 30 and _mean(losses[-8:]) < 0.85 * _mean(losses[:8]), losses
    eff = _series(run, "train/packing_efficiency")
    assert eff and all(0 < e <= 1 for e in eff) and _series(run, "train/max_tokens")[0] == 48
    assert "val/loss" in metrics and "val/loss_t0.50" in metrics
    grids = sorted((run / "samples").glob("val_samples_*.png"))
    assert grids and grids[-1].with_suffix(".txt").read_text().startswith("0: ")
    pipeline = json.loads((run / "dit" / "pipeline.json").read_text())
    assert pipeline["vae"] == str(setup / "vae") and pipeline["text_encoder"] == "minilm"
    assert pipeline["flow"]["resolution_shift"] is True and pipeline["ema"] is True
    dit = load_dit(run)
    ckpt = load_checkpoint_file(run / "checkpoints" / "last.ckpt")
    ema = ckpt["vidgen"]["ema"]["shadow"]
    for k, v in dit.state_dict().items():  # the export holds the EMA weights
        torch.testing.assert_close(v, ema[k], rtol=0, atol=0)
    from_ckpt = load_dit(run / "checkpoints" / "last.ckpt")
    for k, v in from_ckpt.state_dict().items():
        torch.testing.assert_close(v, ema[k], rtol=0, atol=0)


def test_stage2_starts_from_stage1(tmp_path, setup):
    s1 = tmp_path / "s1"
    train(_cfg(s1, setup, "demo/dit_stage1", "trainer.max_steps=2", "trainer.limit_val_batches=0"))
    cfg = _cfg(tmp_path / "s2", setup, "demo/dit_stage2", f"model.init_from={s1}")
    module = instantiate(cfg.model)
    for k, v in load_dit(s1).state_dict().items():
        torch.testing.assert_close(module.dit.state_dict()[k], v, rtol=0, atol=0)
    metrics = train(_cfg(tmp_path / "s2", setup, "demo/dit_stage2", f"model.init_from={s1}",
                         "trainer.max_steps=2", "data.train.max_tokens=96"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    with pytest.raises(InstantiationException, match="model.init_from"):
        train(_cfg(tmp_path / "s3", setup, "demo/dit_stage2", "trainer.max_steps=1"))
    with pytest.raises(InstantiationException, match="differs from this model's config"):
        instantiate(_cfg(tmp_path / "s4", setup, "demo/dit_stage2", f"model.init_from={s1}",
                         "model.dit.num_layers=3").model)


def test_resumed_run_equals_uninterrupted_run(tmp_path, setup):
    common = ["trainer.limit_val_batches=0", "data.train.batches_per_epoch=3",
              "model.ema.warmup_steps=0", "data.train.cfg_dropout=0.3"]
    full, part = tmp_path / "full", tmp_path / "part"
    train(_cfg(full, setup, "demo/dit_stage1", "trainer.max_steps=6", *common))
    train(_cfg(part, setup, "demo/dit_stage1", "trainer.max_steps=3", *common))
    train(_cfg(part, setup, "demo/dit_stage1", "trainer.max_steps=6", "ckpt_path=last", *common))
    a = load_checkpoint_file(full / "checkpoints" / "last.ckpt")
    b = load_checkpoint_file(part / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6 and b["vidgen"]["steps_done"] == 6
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(v, b["state_dict"][k], rtol=0, atol=0, msg=f"{k} differs after resume")
    for k, v in a["vidgen"]["ema"]["shadow"].items():
        torch.testing.assert_close(v, b["vidgen"]["ema"]["shadow"][k], rtol=0, atol=0)
    assert _series(full, "train/loss")[3:] == _series(part, "train/loss")  # the csv restarts


def test_schedule_switches_buckets_and_budget_during_training(tmp_path, setup):
    run = tmp_path / "sched"
    train(_cfg(run, setup, "demo/dit_stage1", "trainer.max_steps=6", "trainer.limit_val_batches=0",
               "data.train.buckets=[5x32x32]", "data.train.max_tokens=16",
               "data.train.schedule=[{step: 3, buckets: [9x32x32], max_tokens: 36}]"))
    assert _series(run, "train/max_tokens") == [16.0] * 3 + [36.0] * 3
    assert _series(run, "train/stage") == [0.0] * 3 + [1.0] * 3


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, setup):
    """Latents full of NaN: every step is skipped (weights stay finite) until the guard stops."""
    import webdataset as wds

    bad = tmp_path / "nan"
    bad.mkdir()
    for name in (INFO_NAME, EMPTY_NAME):
        (bad / name).write_bytes((setup / "train" / name).read_bytes())
    with wds.TarWriter(str(bad / "shard-000000.tar"), encoder=False) as sink:
        for i in range(4):
            latent = torch.full((4, 3, 4, 4), float("nan"))
            sink.write({"__key__": f"k{i}", "safetensors": encode_sample(latent, torch.zeros(2, 384)),
                        "txt": b"nan", "json": json.dumps({"bucket": "9x32x32"}).encode()})
    cfg = _cfg(tmp_path / "run", setup, "demo/dit_stage1", f"data.train.shards={bad}",
               "trainer.limit_val_batches=0", "trainer.max_steps=10", "model.max_consecutive_nonfinite=2")
    with pytest.raises(RuntimeError, match=r"non-finite .* model.max_consecutive_nonfinite=2"):
        train(cfg)


def _video_cfg(run_dir, setup, data, *extra):
    """model=dit on raw video shards: the module encodes each batch with the frozen VAE."""
    register_configs()
    overrides = [
        "model=dit", "data=video", f"paths.run_dir={run_dir}", f"model.vae_path={setup}/vae",
        f"data.train.shards={data}/train", f"data.val.shards={data}/val", "data.train.num_frames=9",
        "data.train.height=32", "data.train.width=32", "data.batch_size=4", "data.num_workers=0",
        "data.train.batches_per_epoch=3", "data.train.shuffle_buffer=8", "model.val.steps=2",
        "trainer.enable_progress_bar=false",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1", *TINY_DIT, *extra,
    ]
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_on_the_fly_video_mode_encodes_and_packs(tmp_path, setup, synthetic_data):
    run = tmp_path / "video"
    metrics = train(_video_cfg(run, setup, synthetic_data, "model.max_tokens=24", "trainer.max_steps=3"))
    eff = _series(run, "train/packing_efficiency")
    assert len(eff) == 3 and all(e == 1.0 for e in eff)  # 4 clips of 12 tokens in 2 sequences of 24
    assert _series(run, "train/samples") == [4.0] * 3
    assert "val/loss" in metrics
    pipeline = json.loads((run / "dit" / "pipeline.json").read_text())
    assert pipeline["vae"] == str(setup / "vae") and pipeline["text_encoder"] == "minilm"
    with pytest.raises(ValueError, match="model.vae_path"):
        train(_video_cfg(tmp_path / "novae", setup, synthetic_data, "model.vae_path=null",
                         "trainer.max_steps=1"))


def test_model_and_latent_mismatch_is_a_clear_error(tmp_path, setup):
    with pytest.raises(ValueError, match=r"model.dit.out_channels=16 .* latent channels 4"):
        train(_cfg(tmp_path / "r", setup, "demo/dit_stage1", "model.dit.in_channels=16",
                   "model.dit.out_channels=16", "trainer.max_steps=1"))
    # an image-to-video DiT on text-to-video latents
    with pytest.raises(ValueError, match=r"in_channels=12 \(image-to-video\).*no first-frame condition"):
        train(_cfg(tmp_path / "r2", setup, "demo/dit_stage1", "model.dit.in_channels=12",
                   "trainer.max_steps=1"))


def test_vae_stats_were_applied(setup):
    vae = WanVAE.from_pretrained(setup / "vae")
    assert not torch.equal(vae.latents_std, torch.ones(4))


def _final_state(run_dir):
    return load_checkpoint_file(Path(run_dir) / "checkpoints" / "last.ckpt")["state_dict"]


def test_activation_checkpointing_trains_identically(tmp_path, setup):
    common = ["trainer.max_steps=2", "trainer.limit_val_batches=0", "data.train.batches_per_epoch=2"]
    train(_cfg(tmp_path / "plain", setup, "demo/dit_stage1", *common))
    train(_cfg(tmp_path / "ckpt", setup, "demo/dit_stage1", "model.activation_checkpointing=true", *common))
    a, b = _final_state(tmp_path / "plain"), _final_state(tmp_path / "ckpt")
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tmp_path, setup):
    common = ["trainer.max_steps=2", "trainer.limit_val_batches=0", "data.train.batches_per_epoch=2"]
    train(_cfg(tmp_path / "eager", setup, "demo/dit_stage1", *common))
    train(_cfg(tmp_path / "compiled", setup, "demo/dit_stage1", "model.compile=true", *common))
    a, b = _final_state(tmp_path / "eager"), _final_state(tmp_path / "compiled")
    assert a.keys() == b.keys()  # per-block compile keeps parameter names (checkpoints load either way)
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-3, atol=1e-4, msg=k)


def test_golden_loss_curve_of_the_tiny_dit(tmp_path, setup):
    """DiT stage 1, 20 steps, against the recorded curve."""
    from golden import check_golden

    train(_cfg(tmp_path / "run", setup, "demo/dit_stage1", "trainer.max_steps=20", "seed=0",
               "data.train.batches_per_epoch=20"))
    losses = _series(tmp_path / "run", "train/loss")
    assert len(losses) == 20
    check_golden("dit_tiny_stage1", losses)
