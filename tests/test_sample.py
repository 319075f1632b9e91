"""Sampling: the generate() API and the `python -m vidgen.sample` CLI writing mp4s."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_latents import TINY_VAE, _one_thread, cached_text_encoder  # noqa: F401, I001

from vidgen.data.video import probe_video
from vidgen.models.dit.model import wan_tiny
from vidgen.models.vae import WanVAE
from vidgen.sample import PIPELINE_NAME, generate, read_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    dit = wan_tiny(in_channels=4, out_channels=4, text_dim=384).eval()
    with torch.no_grad():  # the untrained head is zero (velocity 0): give it some output
        dit.proj_out.weight.normal_(std=0.05)
    vae = WanVAE(**TINY_VAE).eval()
    return dit, vae, cached_text_encoder("minilm")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, models):
    """A run folder as training leaves it: dit/ with pipeline.json naming the VAE."""
    dit, vae, _ = models
    run = tmp_path_factory.mktemp("run")
    vae.save_pretrained(run / "vae")
    dit.save_pretrained(run / "dit")
    pipeline = dict(vae=str(run / "vae"), text_encoder="minilm", text_dim=384,
                    flow={"resolution_shift": True, "base_tokens": 256, "base_shift": 1.0,
                          "max_tokens": 32760, "max_shift": 5.0})
    (run / "dit" / PIPELINE_NAME).write_text(json.dumps(pipeline))
    return run


def test_generate_gives_videos_reproducible_per_sample(models):
    dit, vae, text = models
    kw = dict(num_frames=9, height=32, width=32, steps=3, cfg_scale=3.0)
    videos = generate(dit, vae, text, ["a red circle", "a blue square"], seed=5, **kw)
    assert videos.shape == (2, 3, 9, 32, 32) and videos.dtype == torch.float32
    assert videos.min() >= -1 and videos.max() <= 1 and videos.std() > 0
    alone = generate(dit, vae, text, ["a blue square"], seed=6, **kw)  # sample 1 used seed 5 + 1
    torch.testing.assert_close(alone[0], videos[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(videos[0], videos[1])
    heun = generate(dit, vae, text, ["a red circle"], seed=5, solver="heun", **kw)
    assert heun.shape == (1, 3, 9, 32, 32) and not torch.allclose(heun[0], videos[0])


def test_generate_errors_name_valid_values(models):
    dit, vae, text = models
    with pytest.raises(ValueError, match="valid lengths are 1\\+4k, nearest 9 or 13"):
        generate(dit, vae, text, ["a cat"], num_frames=10, height=32, width=32, steps=1)
    with pytest.raises(ValueError, match="multiples of 16/16 pixels"):
        generate(dit, vae, text, ["a cat"], num_frames=9, height=24, width=32, steps=1)
    with pytest.raises(ValueError, match="unknown solver 'rk4'; valid: euler, heun"):
        generate(dit, vae, text, ["a cat"], num_frames=9, height=32, width=32, steps=1, solver="rk4")
    other = wan_tiny(in_channels=4, out_channels=4, text_dim=32)
    with pytest.raises(ValueError, match="text_dim=32"):
        generate(other, vae, text, ["a cat"], num_frames=9, height=32, width=32, steps=1)


def test_sample_cli_writes_mp4s_of_the_requested_length(tmp_path, run_dir):
    assert read_pipeline(run_dir)["vae"] == str(run_dir / "vae")
    out = tmp_path / "samples"
    cmd = [sys.executable, "-m", "vidgen.sample", f"ckpt={run_dir}", "prompt=[a red circle,a cat]",
           "num_frames=9", "height=32", "width=32", "steps=2", "seed=3", f"out={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = [Path(p) for p in proc.stdout.split() if p.endswith(".mp4")]
    assert [p.name for p in paths] == ["000_seed3_a_red_circle.mp4", "001_seed4_a_cat.mp4"]
    for p in paths:
        info = probe_video(p)
        assert (info["num_frames"], info["height"], info["width"]) == (9, 32, 32)

    bad = subprocess.run(cmd[:5] + ["num_frames=8", f"out={out}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=env)
    assert bad.returncode != 0 and "nearest 5 or 9" in bad.stderr
