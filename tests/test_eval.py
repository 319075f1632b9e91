"""eval.py end to end on a tiny VAE: every report file, every metric checked against an
independent computation (scikit-image PSNR / SSIM, a closed-form FVD), clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import vidgen.metrics.fvd as fvd_module
from vidgen.data.synthetic import make_synthetic_dataset
from vidgen.evaluate import _loader, evaluate
from vidgen.metrics.frames import MSE_FLOOR
from vidgen.models.vae import WanVAE
from vidgen.run import register_configs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    make_synthetic_dataset(tmp / "data", num_videos=2, size=32, frames=17, fps=8, val_videos=2, seed=1)
    vae = WanVAE(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
    vae.save_pretrained(tmp / "vae")
    return tmp


def _cfg(tmp, *extra):
    register_configs()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("eval", overrides=[
            f"ckpt={tmp / 'vae'}", f"data.shards={tmp / 'data' / 'val'}", f"out={tmp / 'report'}",
            "data.height=32", "data.width=32", "data.num_workers=0", "data.batch_size=2", *extra,
        ])


@pytest.fixture
def i3d_calls(monkeypatch):
    """Every (videos, I3D features) pair FVD computes inside evaluate(), in call order."""
    calls = []
    original = fvd_module.i3d_features

    def recording(i3d, video, batch_size=8):
        feats = original(i3d, video, batch_size)
        calls.append((video.detach().cpu().clone(), feats.detach().cpu().clone()))
        return feats

    monkeypatch.setattr(fvd_module, "i3d_features", recording)
    return calls


def _real_and_fake(calls):
    """evaluate() calls update_real then update_fake per batch: (videos, feats) per side."""
    return [tuple(torch.cat(x) for x in zip(*calls[side::2])) for side in (0, 1)]


def _skimage_psnr_ssim(real, other):
    """PSNR / SSIM of [B, 3, T, H, W] videos in [-1, 1] by scikit-image on [0, 1] frames,
    averaged over frames, then over videos."""
    real01, other01 = (((v.double() + 1) / 2).numpy() for v in (real, other))
    psnr, ssim = [], []
    for a, b in zip(real01, other01):
        frames = range(a.shape[1])
        psnr.append(np.mean([peak_signal_noise_ratio(a[:, t], b[:, t], data_range=1) for t in frames]))
        ssim.append(np.mean([
            structural_similarity(a[:, t], b[:, t], gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, data_range=1, channel_axis=0)
            for t in frames
        ]))
    return float(np.mean(psnr)), float(np.mean(ssim))


def _fvd_of_two_clips(real, fake):
    """FVD of 2 feature vectors a side [2, D], in closed form: the unbiased covariance of two
    samples is u u^T with u = (f0 - f1) / sqrt(2), and tr((S_r^1/2 S_f S_r^1/2)^1/2) = |u_r.u_f|."""
    real, fake = real.double().numpy(), fake.double().numpy()
    u, v = (real[0] - real[1]) / np.sqrt(2), (fake[0] - fake[1]) / np.sqrt(2)
    return float(((real.mean(0) - fake.mean(0)) ** 2).sum() + u @ u + v @ v - 2 * abs(u @ v))


def test_vae_recon_report_has_every_metric(setup, i3d_calls):
    out = evaluate(_cfg(setup, "metrics.random_backbones=true", "metrics.fvd_batch_size=2",
                        "tiling.tile=16", "tiling.overlap=8"))  # 32px frames go through tiles
    report = json.loads((out / "report.json").read_text())
    caption_keys = {f"{p}caption_{k}" for p in ("", "reference_")
                    for k in ("accuracy", "background", "shape", "motion", "clips", "unparsed")}
    assert set(report["metrics"]) == {"psnr", "ssim", "lpips", "fvd", "psnr_worst_frame",
                                      "psnr_worst_frame_index"} | caption_keys
    assert report["missing"] == {}
    # the real clips show their captions; the untrained VAE's blur keeps no shape
    assert report["metrics"]["reference_caption_accuracy"] == 1.0
    assert report["metrics"]["caption_shape"] == 0.0 and report["metrics"]["caption_clips"] == 2
    worst = min(report["curves"]["psnr_t"])
    assert report["metrics"]["psnr_worst_frame"] == worst
    assert report["curves"]["psnr_t"][report["metrics"]["psnr_worst_frame_index"]] == worst
    (real, f_real), (recon, f_recon) = _real_and_fake(i3d_calls)
    assert real.shape == recon.shape == (2, 3, 17, 32, 32)
    # PSNR / SSIM of exactly the clips FVD saw, by scikit-image
    psnr, ssim = _skimage_psnr_ssim(real, recon)
    assert report["metrics"]["psnr"] == pytest.approx(psnr, rel=1e-9)
    assert report["metrics"]["ssim"] == pytest.approx(ssim, abs=1e-8)
    # FVD: the Frechet distance of the I3D features, and those features move with the input
    # (measured FVD 21.0 for this untrained VAE; < 1e-9 with PyTorch's default-init I3D)
    assert report["metrics"]["fvd"] == pytest.approx(_fvd_of_two_clips(f_real, f_recon), rel=1e-6)
    assert report["metrics"]["fvd"] > 1.0 and f_real.std(dim=0).mean() > 0.01
    assert report["protocol"]["fvd"]["i3d_weights"].startswith("random:seed=0")
    assert report["protocol"]["fvd"]["frames"] == 16 and report["protocol"]["num_videos"] == 2
    assert any("random" in w for w in report["warnings"])
    assert report["checkpoint"].endswith("vae") and "tiles of 16px" in report["protocol"]["tiling"]
    assert (out / "report.md").is_file()
    assert list(out.glob("grid_*.png")) and (out / "curves.png").is_file()


def test_fvd_of_one_clip_is_reported_missing(setup, i3d_calls):
    # One clip a side has no covariance: the report is still written, FVD null with the reason.
    out = evaluate(_cfg(setup, "metrics.lpips=false", "metrics.random_backbones=true",
                        "data.max_videos=1", f"out={setup / 'one'}"))
    report = json.loads((out / "report.json").read_text())
    reason = ("needs >= 2 clips per side for a covariance (>= 256 for a reliable value), "
              "got 1 real and 1 fake")
    assert report["metrics"]["fvd"] is None and report["missing"] == {"fvd": reason}
    assert report["protocol"]["fvd"]["num_real"] == 1
    (real, _), (recon, _) = _real_and_fake(i3d_calls)
    psnr, ssim = _skimage_psnr_ssim(real, recon)
    assert report["metrics"]["psnr"] == pytest.approx(psnr, rel=1e-9)
    assert report["metrics"]["ssim"] == pytest.approx(ssim, abs=1e-8)
    assert f"| FVD | missing: {reason} | lower |" in (out / "report.md").read_text()


def test_missing_i3d_weights_is_a_clear_error(setup):
    with pytest.raises(FileNotFoundError, match="i3d"):
        evaluate(_cfg(setup, "metrics.lpips=false", "metrics.i3d_weights=/nope/i3d.pt"))


def test_fvd_needs_16_frames(setup):
    with pytest.raises(ValueError, match="data.num_frames=9"):
        evaluate(_cfg(setup, "metrics.lpips=false", "data.num_frames=9"))


def test_eval_cli_psnr_ssim_only(setup, tmp_path):
    cmd = [sys.executable, str(ROOT / "eval.py"), f"ckpt={setup / 'vae'}",
           f"data.shards={setup / 'data' / 'val'}", f"out={tmp_path / 'r'}", "data.height=32",
           "data.width=32", "data.num_workers=0", "metrics.lpips=false", "metrics.fvd=false",
           "metrics.caption=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(report["metrics"]) == {"psnr", "ssim", "psnr_worst_frame", "psnr_worst_frame_index"}
    # the same clips and reconstructions here, scored by scikit-image
    from vidgen.models.vae import load_vae

    vae = load_vae(setup / "vae").eval()
    real, recon = [], []
    with torch.no_grad():
        for batch in _loader(_cfg(setup)):
            real.append(batch["video"])
            recon.append(vae.decode(vae.encode(batch["video"])[0]).clamp(-1, 1))
    psnr, ssim = _skimage_psnr_ssim(torch.cat(real), torch.cat(recon))
    # rel 1e-5: the subprocess may sum in another thread order
    assert report["metrics"]["psnr"] == pytest.approx(psnr, rel=1e-5)
    assert report["metrics"]["ssim"] == pytest.approx(ssim, rel=1e-5)


def test_dit_gen_report(setup, i3d_calls):
    from vidgen.models.dit.model import wan_tiny

    dit = wan_tiny(in_channels=4, out_channels=4, text_dim=384)
    dit.save_pretrained(setup / "dit")
    out = evaluate(_cfg(setup, "task=dit_gen", f"ckpt={setup / 'dit'}", f"vae={setup / 'vae'}",
                        "text_encoder=minilm", "metrics.lpips=false", "metrics.random_backbones=true",
                        "metrics.fvd_batch_size=2", "sampling.steps=2", "sampling.cfg_scale=1.0",
                        "allow_identity_latent_stats=true", f"out={setup / 'gen'}"))
    report = json.loads((out / "report.json").read_text())
    assert set(report["metrics"]) == {"fvd"} | {f"caption_{k}" for k in (
        "accuracy", "background", "shape", "motion", "clips", "unparsed")}
    assert report["missing"] == {}
    assert report["metrics"]["caption_clips"] == 2 and report["metrics"]["caption_accuracy"] == 0.0
    (_, f_real), (fake, f_fake) = _real_and_fake(i3d_calls)
    assert fake.shape == (2, 3, 17, 32, 32)
    # measured 11.7 for the untrained DiT's samples; < 1e-9 with a default-init I3D
    assert report["metrics"]["fvd"] == pytest.approx(_fvd_of_two_clips(f_real, f_fake), rel=1e-6)
    assert report["metrics"]["fvd"] > 1.0
    assert report["protocol"]["task"] == "dit_gen" and report["protocol"]["sampling"]["steps"] == 2
    assert list(out.glob("*.png"))


def test_dit_gen_caption_accuracy_without_fvd(setup, monkeypatch):
    # dit_gen scores what generate() returns; here it returns the reference clips themselves
    # (all pass), then the clips of the batch rolled by one (other captions: all fail)
    import vidgen.evaluate as evaluate_module
    from vidgen.models.dit.model import wan_tiny

    wan_tiny(in_channels=4, out_channels=4, text_dim=384).save_pretrained(setup / "dit_c")
    clips = torch.cat([b["video"] for b in _loader(_cfg(setup))])
    for shift, expected in ((0, 1.0), (1, 0.0)):
        monkeypatch.setattr(evaluate_module, "generate", lambda *a, s=shift, **k: clips.roll(s, 0))
        out = evaluate(_cfg(setup, "task=dit_gen", f"ckpt={setup / 'dit_c'}", f"vae={setup / 'vae'}",
                            "text_encoder=minilm", "metrics.lpips=false", "metrics.fvd=false",
                            "allow_identity_latent_stats=true", f"out={setup / f'gen_c{shift}'}"))
        metrics = json.loads((out / "report.json").read_text())["metrics"]
        assert "fvd" not in metrics and metrics["caption_accuracy"] == expected
    with pytest.raises(ValueError, match="metrics.fvd=true or metrics.caption=true"):
        evaluate(_cfg(setup, "task=dit_gen", f"ckpt={setup / 'dit_c'}", "metrics.fvd=false",
                      "metrics.caption=false"))


def test_demo_report_table_and_contact_sheet(setup, tmp_path, capsys):
    # The demo's last step on a demo folder laid out as `make demo` leaves it (tiny models).
    import shutil

    from PIL import Image

    from vidgen.data.video import write_mp4
    from vidgen.models.dit.model import wan_tiny
    from vidgen.tools import demo_report

    demo = tmp_path / "demo"
    shutil.copytree(setup / "vae", demo / "vae_stage3" / "vae")
    common = ("metrics.lpips=false", "metrics.fvd=false", "data.height=64", "data.width=64")
    for folder in ("eval", "eval_vae_stage2"):
        evaluate(_cfg(setup, *common, f"out={demo / folder}"))
    wan_tiny(in_channels=4, out_channels=4, text_dim=384).save_pretrained(setup / "dit_r")
    evaluate(_cfg(setup, "task=dit_gen", f"ckpt={setup / 'dit_r'}", f"vae={setup / 'vae'}", *common,
                  "text_encoder=minilm", "sampling.steps=1", "sampling.cfg_scale=1.0", "data.num_frames=9",
                  "allow_identity_latent_stats=true", f"out={demo / 'eval_dit'}"))
    # one "sample": a real held-out clip (its caption passes), with its sidecar
    batch = next(iter(_loader(_cfg(setup, "data.height=64", "data.width=64"))))
    (demo / "samples").mkdir()
    write_mp4(((batch["video"][0] + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy(),
              demo / "samples" / "000_seed0_x.mp4", fps=8)
    (demo / "samples" / "000_seed0_x.json").write_text(json.dumps(
        {"prompt": batch["caption"][0], "seed": 0, "steps": 30, "solver": "euler", "cfg_scale": 5.0}))
    (demo / "stage_times.txt").write_text("start 1000\nvae_stage1 1090\nvae_stage2 1210\n")

    demo_report.main(["--demo", str(demo), "--shards", str(setup / "data" / "val"), "--clips", "2"])
    table = (demo / "summary.md").read_text()
    assert table in capsys.readouterr().out
    stage2 = json.loads((demo / "eval_vae_stage2" / "report.json").read_text())["metrics"]
    assert f"| VAE stage 2 | {stage2['psnr']:.2f} | {stage2['psnr_worst_frame']:.2f}" in table
    pct = {k: f"{100 * stage2[k]:.0f}%" for k in ("caption_accuracy", "caption_background",
                                                    "caption_shape", "caption_motion")}
    assert (f"| {pct['caption_accuracy']} ({pct['caption_background']} / {pct['caption_shape']} / "
            f"{pct['caption_motion']}) | 100% |") in table.splitlines()[2]  # real clips pass
    assert stage2["caption_accuracy"] < 0.5  # the untrained VAE loses the captions
    assert "| DiT samples (2 held-out captions) |" in table
    assert "| vae_stage1 | 1.5 min |" in table and "| vae_stage2 | 2.0 min |" in table
    assert "| total | 3.5 min |" in table
    sheet = Image.open(demo / "contact_sheet.png")
    # 2 held-out blocks of 2 rows and 1 sample block of 1 row, 128px frames, 6 of them a row
    assert sheet.size == (120 + 6 * 130, 3 * 28 + 5 * 130 + 3 * 6)
    with pytest.raises(ValueError, match="must begin with a 'start"):
        (demo / "stage_times.txt").write_text("vae_stage1 1090\n")
        demo_report.stage_times(demo / "stage_times.txt")


def test_dit_i2v_report_scores_frame0_and_time_against_the_reference(setup, monkeypatch):
    # dit_i2v scores what generate() returns against each reference clip: here the clip with
    # frame 0 kept and the later frames replaced by those of the other clip; checked against
    # scikit-image frame by frame. generate() must get each clip's own first frame.
    import vidgen.evaluate as evaluate_module
    from vidgen.models.dit.model import wan_tiny

    wan_tiny(in_channels=12, out_channels=4, text_dim=384).save_pretrained(setup / "dit_i2v")
    clips = torch.cat([b["video"] for b in _loader(_cfg(setup))])
    fake = clips.roll(1, 0).clone()
    fake[:, :, 0] = clips[:, :, 0]
    given = []

    def fake_generate(*args, images=None, **kwargs):
        given.append(images.clone())
        return fake

    monkeypatch.setattr(evaluate_module, "generate", fake_generate)
    out = evaluate(_cfg(setup, "task=dit_i2v", f"ckpt={setup / 'dit_i2v'}", f"vae={setup / 'vae'}",
                        "text_encoder=minilm", "metrics.lpips=false", "metrics.fvd=false",
                        "allow_identity_latent_stats=true", f"out={setup / 'i2v'}"))
    report = json.loads((out / "report.json").read_text())
    torch.testing.assert_close(torch.cat(given), clips[:, :, 0])
    m = report["metrics"]
    assert m["psnr_frame0"] == pytest.approx(-10 * np.log10(MSE_FLOOR))  # identical: the floor
    later = [_skimage_psnr_ssim(clips[:, :, t: t + 1], fake[:, :, t: t + 1]) for t in range(1, 17)]
    assert m["psnr_later_frames"] == pytest.approx(np.mean([p for p, _ in later]), rel=1e-5)
    assert m["ssim_later_frames"] == pytest.approx(np.mean([s for _, s in later]), rel=1e-5)
    assert m["psnr_later_frames"] < 40 < m["psnr_frame0"]
    assert m["ssim_frame0"] == pytest.approx(1.0, abs=1e-6)
    assert len(report["curves"]["psnr_t"]) == 17
    assert report["protocol"]["task"] == "dit_i2v" and "frame 0" in report["protocol"]["condition"]
    with pytest.raises(ValueError, match="task=dit_gen but .* image-to-video DiT: use task=dit_i2v"):
        evaluate(_cfg(setup, "task=dit_gen", f"ckpt={setup / 'dit_i2v'}", f"vae={setup / 'vae'}",
                      "text_encoder=minilm", "allow_identity_latent_stats=true"))


def test_dit_i2v_report_end_to_end_with_image_tokens(setup, i3d_calls, tmp_path):
    """An untrained I2V DiT with a tiny random CLIP image encoder: every figure is reported."""
    from test_image_encoder import make_tiny_clip

    from vidgen.models.dit import expand_t2v
    from vidgen.models.dit.model import wan_tiny

    clip = make_tiny_clip(tmp_path / "clip")
    expand_t2v(wan_tiny(in_channels=4, out_channels=4, text_dim=384), image_dim=16).save_pretrained(
        setup / "dit_i2v_img")
    out = evaluate(_cfg(setup, "task=dit_i2v", f"ckpt={setup / 'dit_i2v_img'}", f"vae={setup / 'vae'}",
                        "text_encoder=minilm", f"image_encoder={clip}", "metrics.lpips=false",
                        "metrics.random_backbones=true", "metrics.fvd_batch_size=2", "sampling.steps=2",
                        "sampling.cfg_scale=2.0", "sampling.image_cfg_scale=1.5",
                        "allow_identity_latent_stats=true", f"out={setup / 'i2v_img'}"))
    report = json.loads((out / "report.json").read_text())
    assert {"psnr", "ssim", "psnr_frame0", "ssim_frame0", "psnr_later_frames", "fvd"} <= set(report["metrics"])
    assert report["protocol"]["image_encoder"] == str(clip)
    assert report["protocol"]["sampling"]["image_cfg_scale"] == 1.5
