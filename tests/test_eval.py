"""eval.py end to end on a tiny VAE: every report file, every metric, clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from vidgen.data.synthetic import make_synthetic_dataset
from vidgen.evaluate import evaluate
from vidgen.models.vae import WanVAE
from vidgen.utils.rundir import register_resolvers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    make_synthetic_dataset(tmp / "data", num_videos=2, size=32, frames=17, fps=8, val_videos=2, seed=1)
    vae = WanVAE(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
    vae.save_pretrained(tmp / "vae")
    return tmp


def _cfg(tmp, *extra):
    register_resolvers()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("eval", overrides=[
            f"ckpt={tmp / 'vae'}", f"data.shards={tmp / 'data' / 'val'}", f"out={tmp / 'report'}",
            "data.height=32", "data.width=32", "data.num_workers=0", "data.batch_size=2", *extra,
        ])


def test_vae_recon_report_has_every_metric(setup):
    out = evaluate(_cfg(setup, "metrics.random_backbones=true", "metrics.fvd_batch_size=2",
                        "tiling.tile=16", "tiling.overlap=8"))  # 32px frames go through tiles
    report = json.loads((out / "report.json").read_text())
    assert set(report["metrics"]) >= {"psnr", "ssim", "lpips", "fvd"}
    assert report["protocol"]["fvd"]["frames"] == 16 and report["protocol"]["num_videos"] == 2
    assert any("random" in w for w in report["warnings"])
    assert report["checkpoint"].endswith("vae") and "tiles of 16px" in report["protocol"]["tiling"]
    assert (out / "report.md").is_file()
    assert list(out.glob("grid_*.png")) and (out / "curves.png").is_file()


def test_missing_i3d_weights_is_a_clear_error(setup):
    with pytest.raises(FileNotFoundError, match="i3d"):
        evaluate(_cfg(setup, "metrics.lpips=false", "metrics.i3d_weights=/nope/i3d.pt"))


def test_fvd_needs_16_frames(setup):
    with pytest.raises(ValueError, match="data.num_frames=9"):
        evaluate(_cfg(setup, "metrics.lpips=false", "data.num_frames=9"))


def test_eval_cli_psnr_ssim_only(setup, tmp_path):
    cmd = [sys.executable, str(ROOT / "eval.py"), f"ckpt={setup / 'vae'}",
           f"data.shards={setup / 'data' / 'val'}", f"out={tmp_path / 'r'}", "data.height=32",
           "data.width=32", "data.num_workers=0", "metrics.lpips=false", "metrics.fvd=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(report["metrics"]) == {"psnr", "ssim"} and report["metrics"]["psnr"] > 0


def test_dit_gen_report(setup):
    from vidgen.models.dit.model import wan_tiny

    dit = wan_tiny(in_channels=4, out_channels=4, text_dim=384)
    dit.save_pretrained(setup / "dit")
    out = evaluate(_cfg(setup, "task=dit_gen", f"ckpt={setup / 'dit'}", f"vae={setup / 'vae'}",
                        "text_encoder=minilm", "metrics.lpips=false", "metrics.random_backbones=true",
                        "metrics.fvd_batch_size=2", "sampling.steps=2", "sampling.cfg_scale=1.0",
                        f"out={setup / 'gen'}"))
    report = json.loads((out / "report.json").read_text())
    assert set(report["metrics"]) == {"fvd"} and report["metrics"]["fvd"] >= 0
    assert report["protocol"]["task"] == "dit_gen" and report["protocol"]["sampling"]["steps"] == 2
    assert list(out.glob("*.png"))
