"""Sampling: the generate() API and the `python -m vidgen.sample` CLI writing mp4s."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_latents import TINY_VAE, _one_thread, cached_text_encoder, compose_tool  # noqa: F401, I001

from vidgen.data.video import decode_frames, probe_video
from vidgen.diffusion.generate import PIPELINE_NAME
from vidgen.diffusion.pipeline import generate, read_pipeline
from vidgen.models.dit.model import wan_tiny
from vidgen.models.vae import WanVAE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    dit = wan_tiny(in_channels=4, out_channels=4, text_dim=384).eval()
    with torch.no_grad():  # the untrained head is zero (velocity 0): give it some output
        dit.proj_out.weight.normal_(std=0.05)
    vae = WanVAE(**TINY_VAE).eval()
    return dit, vae, cached_text_encoder("minilm")


STATS = dict(mean=[0.1, -0.2, 0.3, 0.0], std=[0.5, 1.5, 2.0, 1.0])  # as latent_stats would set


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, models):
    """A run folder as training leaves it: dit/ with pipeline.json naming the VAE and its stats."""
    dit, vae, _ = models
    run = tmp_path_factory.mktemp("run")
    with_stats = copy.deepcopy(vae)
    with_stats.set_latent_stats(STATS["mean"], STATS["std"])
    with_stats.save_pretrained(run / "vae")
    dit.save_pretrained(run / "dit")
    pipeline = dict(vae=str(run / "vae"), text_encoder="minilm", text_dim=384,
                    latent_stats=dict(STATS, source="latents/train/latents_info.json"),
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
    for i, p in enumerate(paths):
        info = probe_video(p)
        assert (info["num_frames"], info["height"], info["width"]) == (9, 32, 32)
        sidecar = json.loads(p.with_suffix(".json").read_text())
        assert sidecar["prompt"] == ["a red circle", "a cat"][i] and sidecar["seed"] == 3 + i
        assert (sidecar["solver"], sidecar["steps"], sidecar["cfg_scale"]) == ("euler", 2, 5.0)
        assert sidecar["checkpoint"] == str(run_dir.resolve()) and sidecar["vae"] == str(run_dir / "vae")
        assert (sidecar["num_frames"], sidecar["height"], sidecar["width"]) == (9, 32, 32)
    # the sidecar is enough to draw the second video again, alone
    again = tmp_path / "again"
    sidecar = json.loads(paths[1].with_suffix(".json").read_text())
    proc = subprocess.run([*cmd[:4], f"prompt={sidecar['prompt']}", f"seed={sidecar['seed']}",
                           f"solver={sidecar['solver']}", f"steps={sidecar['steps']}",
                           f"cfg_scale={sidecar['cfg_scale']}", "num_frames=9", "height=32", "width=32",
                           f"out={again}"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (redrawn,) = again.glob("*.mp4")
    assert np.array_equal(decode_frames(redrawn.read_bytes(), list(range(9))),
                          decode_frames(paths[1].read_bytes(), list(range(9))))

    bad = subprocess.run(cmd[:5] + ["num_frames=8", f"out={out}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=env)
    assert bad.returncode != 0 and "nearest 5 or 9" in bad.stderr


# ---------------------------------------------------------------- latent statistics checks
@pytest.fixture
def sample_run(tmp_path, monkeypatch):
    """`python -m vidgen.sample` in-process: one prompt, 9x32x32, one step; returns the mp4s."""
    import vidgen.text
    from vidgen.sample import run

    monkeypatch.setattr(vidgen.text, "build_text_encoder", cached_text_encoder)

    def sample(*overrides):
        return run(compose_tool("sample", ["prompt=a cat", "num_frames=9", "height=32", "width=32",
                                           "steps=1", "device=cpu", f"out={tmp_path / 'out'}",
                                           *overrides]))

    return sample


def test_sample_refuses_a_vae_without_latent_stats(tmp_path, models, sample_run):
    dit, vae, _ = models
    vae.save_pretrained(tmp_path / "plain")  # mean 0 / std 1: latent_stats never ran on it
    dit.save_pretrained(tmp_path / "dit")  # no pipeline.json: no recorded statistics to compare
    args = [f"ckpt={tmp_path / 'dit'}", f"vae={tmp_path / 'plain'}", "text_encoder=minilm"]
    with pytest.raises(ValueError, match=r"has no latent statistics \(mean 0 / std 1\)") as err:
        sample_run(*args)
    assert f"`python -m vidgen.tools.latent_stats ckpt={tmp_path / 'plain'} data.shards=" in str(err.value)
    assert "or pass allow_identity_latent_stats=true" in str(err.value)
    assert len(sample_run(*args, "allow_identity_latent_stats=true")) == 1


def test_sample_refuses_a_vae_whose_stats_differ_from_the_dit_latents(tmp_path, run_dir, models, sample_run):
    _, vae, _ = models
    other = copy.deepcopy(vae)
    other.set_latent_stats(STATS["mean"], [0.5, 1.5, 2.0, 1.25])
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="other latent statistics than those the DiT's latents") as err:
        sample_run(f"ckpt={run_dir}", f"vae={tmp_path / 'other'}")
    msg = str(err.value)
    assert "max abs difference std 0.25;" in msg  # the means agree: only std is named
    assert f"({run_dir / 'vae'}: drop or change vae=)" in msg
    assert "or pass allow_latent_stats_mismatch=true" in msg
    vae.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="latent_stats never ran on it"):
        sample_run(f"ckpt={run_dir}", f"vae={tmp_path / 'plain'}")
    out = sample_run(f"ckpt={run_dir}", f"vae={tmp_path / 'other'}", "allow_latent_stats_mismatch=true")
    assert len(out) == 1


def test_recorded_stats_fall_back_to_the_latents_info(tmp_path):
    from vidgen.diffusion.pipeline import recorded_latent_stats

    info = {"vae_config": {"latents_mean": [1.0, 0.5], "latents_std": [2.0, 3.0]}}
    (tmp_path / "latents_info.json").write_text(json.dumps(info))
    stats, where = recorded_latent_stats({"latents": str(tmp_path)})  # an export without latent_stats
    assert stats == dict(mean=[1.0, 0.5], std=[2.0, 3.0]) and where == str(tmp_path / "latents_info.json")
    assert recorded_latent_stats({"latents": str(tmp_path / "gone")}) is None
    assert recorded_latent_stats({}) is None
