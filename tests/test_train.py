"""End-to-end training through train.py's code path on tiny models and data (CPU)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from vidgen.run import register_configs, train
from vidgen.utils.checkpoint import load_checkpoint_file

ROOT = Path(__file__).resolve().parents[1]
# the demo layout (4x spatial, 4x temporal) at a smaller width
TINY_VAE = ["model.vae.base_dim=8", "model.vae.z_dim=4", "model.vae.num_res_blocks=1"]


def _cfg(tmp, data, experiment, *extra):
    register_configs()
    overrides = [
        f"experiment={experiment}",
        f"paths.run_dir={tmp}",
        f"data.train.shards={data}/train",
        f"data.val.shards={data}/val",
        "data.train.height=32", "data.train.width=32",
        "data.num_workers=0", "data.batch_size=4", "data.train.shuffle_buffer=8",
        "trainer.enable_progress_bar=false", "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        *TINY_VAE, *extra,
    ]
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)


def _losses(run_dir):
    with open(Path(run_dir) / "csv" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def _mean(xs):
    return sum(xs) / len(xs)


def test_stage1_then_stage2_reduce_the_loss(tmp_path, synthetic_data):
    s1 = tmp_path / "s1"
    train(_cfg(s1, synthetic_data, "demo/vae_stage1", "trainer.max_steps=16",
               "data.train.batches_per_epoch=8", "optim.lr=3e-3", "optim.warmup_steps=2"))
    losses = _losses(s1)
    assert _mean(losses[-4:]) < 0.9 * _mean(losses[:4]), losses
    assert (s1 / "vae" / "model.safetensors").is_file() and (s1 / "config.yaml").is_file()
    assert (s1 / "checkpoints" / "last.ckpt").is_file()
    assert list((s1 / "samples").glob("*.png")), "validation grids are written"

    s2 = tmp_path / "s2"
    metrics = train(_cfg(s2, synthetic_data, "demo/vae_stage2", f"model.init_from={s1}",
                         "trainer.max_steps=12", "data.train.batches_per_epoch=6",
                         "data.val.num_frames=5", "optim.lr=1e-3", "optim.warmup_steps=2"))
    losses = _losses(s2)
    assert _mean(losses[-3:]) < 0.93 * _mean(losses[:3]), losses  # measured 0.87
    assert "val/psnr" in metrics
    from vidgen.models.vae import WanVAE

    vae = WanVAE.from_pretrained(s2 / "vae")
    assert vae.config["temporal"] is True
    # the export holds the EMA weights, not the raw ones
    _, ckpt = _weights(s2)
    shadow = ckpt["vidgen"]["ema"]["shadow"]
    exported = vae.state_dict()
    assert shadow and all(torch.equal(exported[k], v) for k, v in shadow.items())
    raw = {k.removeprefix("vae."): v for k, v in ckpt["state_dict"].items() if k.startswith("vae.")}
    assert any(not torch.equal(exported[k], raw[k]) for k in shadow), "EMA differs from the raw weights"


def test_stage2_without_init_from_is_an_error(tmp_path, synthetic_data):
    with pytest.raises(Exception, match="model.init_from"):  # hydra wraps it
        train(_cfg(tmp_path, synthetic_data, "demo/vae_stage2", "trainer.max_steps=1"))


def _weights(run_dir):
    ckpt = load_checkpoint_file(Path(run_dir) / "checkpoints" / "last.ckpt")
    return ckpt["state_dict"], ckpt


def test_resumed_run_equals_uninterrupted_run(tmp_path, synthetic_data):
    common = ["trainer.limit_val_batches=0", "data.train.batches_per_epoch=4",
              "model.ema.decay=0.9", "model.ema.warmup_steps=0"]
    full = tmp_path / "full"
    train(_cfg(full, synthetic_data, "demo/vae_stage2", "model.require_init_from=false",
               "trainer.max_steps=8", "data.val.num_frames=5", *common))
    part = tmp_path / "part"
    train(_cfg(part, synthetic_data, "demo/vae_stage2", "model.require_init_from=false",
               "trainer.max_steps=4", "data.val.num_frames=5", *common))
    train(_cfg(part, synthetic_data, "demo/vae_stage2", "model.require_init_from=false",
               "trainer.max_steps=8", "data.val.num_frames=5", "ckpt_path=last", *common))
    (a, ca), (b, cb) = _weights(full), _weights(part)
    assert ca["global_step"] == cb["global_step"] == 8
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")
    for k, v in ca["vidgen"]["ema"]["shadow"].items():
        torch.testing.assert_close(v, cb["vidgen"]["ema"]["shadow"][k], rtol=0, atol=0)


def test_ckpt_path_last_without_checkpoint_is_an_error(tmp_path, synthetic_data):
    with pytest.raises(FileNotFoundError, match="ckpt_path=last"):
        train(_cfg(tmp_path / "none", synthetic_data, "demo/vae_stage1", "ckpt_path=last",
                   "paths.task_dir=" + str(tmp_path / "empty")))


def test_ddp_two_cpu_processes(tmp_path, synthetic_data):
    """2 gloo ranks via train.py in a subprocess: different data per rank, equal weights."""
    run = tmp_path / "ddp"
    cmd = [
        sys.executable, str(ROOT / "train.py"), "experiment=demo/vae_stage1",
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.precision=32-true", "trainer.max_steps=3", "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
        f"paths.run_dir={run}", f"data.train.shards={synthetic_data}/train",
        f"data.val.shards={synthetic_data}/val", "data.train.height=32", "data.train.width=32",
        "data.num_workers=0", "data.batch_size=2", "data.train.batches_per_epoch=3",
        "model.audit_data=true",
        *TINY_VAE,
    ]
    env = {**os.environ, "VIDGEN_RUN_ID": "ddp-test", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    _, ckpt = _weights(run)
    audit = ckpt["vidgen"]["audit"]  # gathered from both ranks at save time
    seen = audit["keys"]
    assert len(seen) == 2 and len(seen[0]) == len(seen[1]) == 3 * 2
    # resampled shards: each rank draws its own reproducible stream (overlap is allowed)
    assert seen[0] != seen[1], "ranks must read different data"
    h0, h1 = audit["weights_sha256"]
    assert h0 == h1, "DDP replicas diverged"


def test_stage3_gan_run_and_exact_resume(tmp_path, synthetic_data):
    """Stage 3 (G + D, LeCam, EMA, buckets) runs; a resumed run matches an uninterrupted one."""
    s2 = tmp_path / "s2"
    train(_cfg(s2, synthetic_data, "demo/vae_stage2", "model.require_init_from=false",
               "trainer.max_steps=2", "data.train.batches_per_epoch=2", "data.val.num_frames=5"))
    common = [f"model.init_from={s2}", "model.gan.start_step=1", "model.disc.base_channels=8",
              "data.train.buckets=[5x32x32,5x32x48]", "data.train.bucket_weights=null",
              "data.train.batches_per_epoch=3",
              "data.val.num_frames=5", "trainer.limit_val_batches=0"]
    full = tmp_path / "full"
    train(_cfg(full, synthetic_data, "demo/vae_stage3", "trainer.max_steps=6", *common))
    part = tmp_path / "part"
    train(_cfg(part, synthetic_data, "demo/vae_stage3", "trainer.max_steps=3", *common))
    train(_cfg(part, synthetic_data, "demo/vae_stage3", "trainer.max_steps=6", "ckpt_path=last",
               *common))
    (a, ca), (b, cb) = _weights(full), _weights(part)
    assert ca["global_step"] == cb["global_step"] == 6, "global_step counts batches"
    assert any(k.startswith("disc.") for k in a) and "lecam.ema_real" in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")
    with open(full / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/d_loss") for r in rows), "the discriminator trained"


def test_golden_loss_curve_of_the_tiny_vae(tmp_path, synthetic_data):
    """VAE stage 1 then stage 2 (inflated), 10 steps each, against the recorded curves."""
    from golden import check_golden

    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    common = ("data.train.batches_per_epoch=10", "optim.warmup_steps=2", "seed=0", "trainer.max_steps=10")
    train(_cfg(s1, synthetic_data, "demo/vae_stage1", *common))
    train(_cfg(s2, synthetic_data, "demo/vae_stage2", *common, f"model.init_from={s1}"))
    losses = _losses(s1) + _losses(s2)
    assert len(losses) == 20
    check_golden("vae_tiny_stage1_stage2", losses)
