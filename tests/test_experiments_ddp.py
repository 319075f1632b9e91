"""Every experiment users run, launched as they launch it: `train.py experiment=<name>
trainer=ddp` with 2 CPU processes (gloo), tiny widths and data given on the command line.

Each run also poisons one batch on rank 1 with NaN (tests/callbacks.py): the step must be
skipped on both ranks and counted, the run must go on to `trainer.max_steps` optimizer
steps, and both replicas must end with the same finite weights (and EMA shadows). Stage 3
runs with the GAN on from step 0, so the discriminator trains under DDP from the start.
Every checkpoint each run writes must load with `torch.load(weights_only=True)`.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from test_dit_train import TINY_DIT, i2v_setup, setup  # noqa: F401  (the latents fixtures)

from vidgen.models.vae import WanVAE
from vidgen.run import register_configs

ROOT = Path(__file__).resolve().parents[1]
TINY_VAE = dict(base_dim=8, z_dim=4, num_res_blocks=1)
# the demo VAE layout (4x spatial) and Wan's (8x spatial), as in the experiment configs
LAYOUTS = {"demo": dict(dim_mult=[1, 2, 2], temporal_downsample=[True, True]),
           "wan": dict(dim_mult=[1, 2, 4, 4], temporal_downsample=[False, True, True])}
MAX_STEPS = 3
POISONED = 1  # the second batch, on rank 1


def _launch(run_dir: Path, experiment: str, *overrides: str, timeout: int = 240):
    cmd = [
        sys.executable, str(ROOT / "train.py"), f"experiment={experiment}",
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
        f"trainer.max_steps={MAX_STEPS}", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", "trainer.limit_val_batches=1", f"paths.run_dir={run_dir}",
        "data.num_workers=0",
        "+callbacks.poison._target_=tests.callbacks.InjectNonFinite",
        f"+callbacks.poison.batches=[{POISONED}]", "+callbacks.poison.rank=1",
        "+callbacks.hashes._target_=tests.callbacks.WeightHashes",
        *overrides,
    ]
    env = {**os.environ, "VIDGEN_RUN_ID": f"ddp-{run_dir.name}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _check_run(proc, run_dir: Path, losses: set[str], export: str) -> list[dict]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    prints = [json.loads((run_dir / f"fingerprint_rank{r}.json").read_text()) for r in (0, 1)]
    assert prints[0]["sha256"] == prints[1]["sha256"], "DDP replicas diverged"
    for p in prints:
        assert p["finite"], "non-finite weights after a skipped step"
        # one poisoned batch: skipped on both ranks, so one batch more than max_steps
        assert p["nonfinite"] == dict.fromkeys(losses, 1), p["nonfinite"]
        assert p["steps_done"] == MAX_STEPS + 1
    assert (run_dir / export).is_file(), f"no export {export}"
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert ckpts, "no training checkpoint written"
    for ckpt in ckpts:  # every checkpoint a run writes is data: it loads weights-only
        torch.load(ckpt, map_location="cpu", weights_only=True)
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return rows


# --------------------------------------------------------------------------- VAE stages


@pytest.fixture(scope="module")
def vae_inits(tmp_path_factory):
    """Earlier-stage exports for each layout: the 2D model (stage 2 inflates it) and a 3D one."""
    root = tmp_path_factory.mktemp("vae_inits")
    out = {}
    for name, layout in LAYOUTS.items():
        for temporal in (False, True):
            torch.manual_seed(0)
            path = root / f"{name}_{'3d' if temporal else '2d'}"
            WanVAE(**TINY_VAE, **layout, temporal=temporal).save_pretrained(path)
            out[path.name] = path
    return out


VAE_COMMON = [f"model.vae.{k}={v}" for k, v in TINY_VAE.items()] + [
    "data.train.height=32", "data.train.width=32", "data.batch_size=2",
    "data.train.batches_per_epoch=2", "data.train.shuffle_buffer=8",
    "data.val.height=32", "data.val.width=32", "data.val.num_frames=5",
]
# experiment -> (init export, extra overrides)
VAE_CASES = {
    "demo/vae_stage1": (None, []),
    "demo/vae_stage2": ("demo_2d", []),
    "demo/vae_stage3": ("demo_3d", ["model.gan.start_step=0", "model.disc.base_channels=8"]),
    "vae/stage1": (None, ["model.loss.lpips_random_backbone=true"]),
    "vae/stage2": ("wan_2d", ["model.loss.lpips_random_backbone=true"]),
    "vae/stage3": ("wan_3d", ["model.loss.lpips_random_backbone=true", "model.gan.start_step=0",
                              "model.disc.base_channels=8", "data.train.buckets=[1x32x32,5x32x32,9x32x32]",
                              "data.train.bucket_weights=null"]),
}


@pytest.mark.parametrize("experiment", sorted(VAE_CASES))
def test_vae_experiment_under_ddp(tmp_path, synthetic_data, vae_inits, experiment):
    init, extra = VAE_CASES[experiment]
    run = tmp_path / experiment.replace("/", "_")
    proc = _launch(run, experiment, f"data.train.shards={synthetic_data}/train",
                   f"data.val.shards={synthetic_data}/val", *VAE_COMMON,
                   *([f"model.init_from={vae_inits[init]}"] if init else []), *extra)
    gan = "stage3" in experiment
    rows = _check_run(proc, run, {"g", "d"} if gan else {"g"}, "vae/config.json")
    assert max(float(r["train/nonfinite_g"]) for r in rows if r.get("train/nonfinite_g")) == 1
    if gan:
        assert [r for r in rows if r.get("train/d_loss")], "the discriminator trained"
    assert any(r.get("val/psnr") for r in rows), "validation ran under DDP"


# --------------------------------------------------------------------------- DiT stages


def _dit_overrides(setup):  # noqa: F811
    return [
        f"data.train.shards={setup}/train", f"data.val.shards={setup}/val",
        f"model.vae_path={setup}/vae", "data.train.buckets=[9x32x32]", "data.train.max_tokens=48",
        "data.train.batches_per_epoch=2", "data.train.shuffle_buffer=16", "data.train.pack_buffer=16",
        "model.val.num_samples=1", "model.val.steps=2", "model.size=tiny", "model.dit.text_dim=384",
        *TINY_DIT,
    ]


@pytest.fixture(scope="module")
def dit_inits(tmp_path_factory, setup):  # noqa: F811
    """A stage-1 DiT export per family (demo / full recipe) with the tiny overrides."""
    register_configs()
    root = tmp_path_factory.mktemp("dit_inits")
    out = {}
    for family, stage1 in (("demo", "demo/dit_stage1"), ("wan", "dit/stage1")):
        with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=[f"experiment={stage1}", *_dit_overrides(setup)])
        torch.manual_seed(0)
        instantiate(cfg.model).dit.save_pretrained(root / family)
        out[family] = root / family
    # a Wan2.1 checkpoint as users bring it: a diffusers transformer, converted (text_len 512)
    from diffusers import WanTransformer3DModel

    from vidgen.tools.convert_dit import from_diffusers

    torch.manual_seed(0)
    WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                          out_channels=4, text_dim=384, freq_dim=32, ffn_dim=64,
                          num_layers=2).save_pretrained(root / "diffusers")
    from_diffusers(str(root / "diffusers"), str(root / "converted"))
    out["converted"] = root / "converted"
    return out


DIT_CASES = {"demo/dit_stage1": None, "demo/dit_stage2": "demo", "dit/stage1": None, "dit/stage2": "wan",
             "dit/lora": "converted", "dit/finetune_wan": "converted", "demo/dit_lora": "demo"}


@pytest.mark.parametrize("experiment", sorted(DIT_CASES))
def test_dit_experiment_under_ddp(tmp_path, setup, dit_inits, experiment):  # noqa: F811
    init = DIT_CASES[experiment]
    run = tmp_path / experiment.replace("/", "_")
    overrides = _dit_overrides(setup) + (["model.dit.text_len=512"] if init == "converted" else [])
    if experiment == "demo/dit_lora":  # its brown / base mixture, here of the same latents twice
        overrides = [o for o in overrides if not o.startswith("data.train.shards=")] + [
            f"data.train.sources=[{{name: a, shards: {setup}/train, weight: 0.5}}, "
            f"{{name: b, shards: {setup}/train, weight: 0.5}}]", "data.train.shards=null"]
    proc = _launch(run, experiment, *overrides,
                   *([f"model.init_from={dit_inits[init]}"] if init else []))
    rows = _check_run(proc, run, {"loss"}, "lora/lora.json" if "lora" in experiment else "dit/config.json")
    assert max(float(r["train/nonfinite"]) for r in rows if r.get("train/nonfinite")) == 1
    assert any(r.get("val/loss") for r in rows), "validation ran under DDP"


# image-to-video: from the T2V export of its family, on I2V latents (tiny CLIP tokens for the
# full recipe, latent condition only for the demo, as each config says)
I2V_CASES = {"demo/dit_i2v": ("demo", "none", []),
             "dit/i2v": ("wan", "clip", ["model.dit.image_dim=16"])}


@pytest.mark.parametrize("experiment", sorted(I2V_CASES))
def test_i2v_experiment_under_ddp(tmp_path, setup, i2v_setup, dit_inits, experiment):  # noqa: F811
    init, flavour, extra = I2V_CASES[experiment]
    run = tmp_path / experiment.replace("/", "_")
    proc = _launch(run, experiment, *_dit_overrides(setup), "model.dit.in_channels=12",
                   f"data.train.shards={i2v_setup}/{flavour}/train", f"data.val.shards={i2v_setup}/{flavour}/val",
                   "data.train.image_dropout=0.5", f"model.init_from={dit_inits[init]}", *extra)
    rows = _check_run(proc, run, {"loss"}, "dit/config.json")
    assert max(float(r["train/nonfinite"]) for r in rows if r.get("train/nonfinite")) == 1
    assert any(r.get("val/loss") for r in rows), "validation ran under DDP"
    config = json.loads((run / "dit" / "config.json").read_text())
    assert config["in_channels"] == 12 and config.get("image_dim") == (16 if flavour == "clip" else None)
