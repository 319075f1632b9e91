"""VideoMetrics: frame -> video -> dataset averaging, curves, and the cross-rank sum."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vidgen.metrics.frames import psnr_per_frame, ssim_per_frame
from vidgen.metrics.fvd import FeatureStats
from vidgen.metrics.video import VideoMetrics


def _pairs(seed=0):
    """Two batches of (real, recon) in [-1, 1] with different clip lengths (5 and 3 frames)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, t in ((2, 5), (3, 3)):
        real = torch.rand(b, 3, t, 16, 16, generator=g) * 2 - 1
        recon = real + 0.2 * torch.randn(real.shape, generator=g)  # exceeds [-1, 1]: clamped
        out.append((real, recon))
    return out


def _expected(pairs):
    """Per-video frame means and per-timestep values, computed directly."""
    video_means = {"psnr": [], "ssim": []}
    per_t = {"psnr": [[] for _ in range(5)], "ssim": [[] for _ in range(5)]}
    for real, recon in pairs:
        r01, c01 = (real + 1) / 2, (recon.clamp(-1, 1) + 1) / 2
        for name, fn in (("psnr", psnr_per_frame), ("ssim", ssim_per_frame)):
            vals = fn(r01, c01)  # [B, T]
            video_means[name] += vals.mean(dim=1).tolist()
            for t in range(vals.shape[1]):
                per_t[name][t] += vals[:, t].tolist()
    return video_means, per_t


def test_video_metrics_average_frames_then_videos():
    pairs = _pairs()
    m = VideoMetrics(psnr=True, ssim=True)
    for real, recon in pairs:
        m.update(real, recon)
    out = m.compute()
    video_means, per_t = _expected(pairs)
    assert out["num_videos"] == 5
    assert set(out) == {"psnr", "ssim", "psnr_t", "ssim_t", "num_videos", "count_t"}
    for name in ("psnr", "ssim"):
        assert out[name] == pytest.approx(np.mean(video_means[name]), rel=1e-12)
        assert out[f"{name}_t"] == pytest.approx([np.mean(v) for v in per_t[name]], rel=1e-12)
    assert out["count_t"] == [5, 5, 5, 2, 2]  # frames 3-4 exist only in the 5-frame clips
    assert m.compute() == out  # compute() does not consume the state


def test_video_metrics_lpips_only_and_perfect_recon():
    from vidgen.losses.lpips import build_lpips

    torch.manual_seed(0)
    m = VideoMetrics(psnr=True, ssim=False, lpips_model=build_lpips(random_backbone=True))
    real = torch.rand(2, 3, 2, 32, 32) * 2 - 1
    m.update(real, real.clone())
    out = m.compute()
    assert set(out) == {"psnr", "lpips", "psnr_t", "lpips_t", "num_videos", "count_t"}
    assert out["psnr"] == pytest.approx(100.0)  # the documented MSE floor
    assert out["lpips"] == pytest.approx(0.0, abs=1e-6)


def test_video_metrics_errors():
    with pytest.raises(ValueError, match="at least one of"):
        VideoMetrics(psnr=False, ssim=False)
    m = VideoMetrics()
    with pytest.raises(ValueError, match="before any update"):
        m.compute()
    with pytest.raises(ValueError, match="one shape"):
        m.update(torch.zeros(1, 3, 2, 16, 16), torch.zeros(1, 3, 3, 16, 16))


# --------------------------------------------------------------------------------------
# Two gloo ranks: the all-reduced result equals one process seeing all the data.
# --------------------------------------------------------------------------------------


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        pairs = _pairs()
        m = VideoMetrics()
        # rank 0 gets the 5-frame batch, rank 1 the 3-frame one: curve lengths differ by rank
        m.update(*pairs[rank])
        feats = torch.from_numpy(np.random.default_rng(3).standard_normal((10, 4)))
        stats = FeatureStats(4)
        stats.update(feats[:4] if rank == 0 else feats[4:])
        reduced = stats.all_reduce()
        torch.save(
            {"video": m.compute(), "count": reduced.count, "mean_cov": reduced.mean_cov()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_metrics_sync_across_two_ranks(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = VideoMetrics()
    for real, recon in _pairs():
        single.update(real, recon)
    expected = single.compute()
    feats = np.random.default_rng(3).standard_normal((10, 4))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["video"]["num_videos"] == 5 and got["video"]["count_t"] == expected["count_t"]
        for key in ("psnr", "ssim", "psnr_t", "ssim_t"):
            assert got["video"][key] == pytest.approx(expected[key], rel=1e-12)
        assert got["count"] == 10
        np.testing.assert_allclose(got["mean_cov"][0], feats.mean(0), rtol=1e-12)
        np.testing.assert_allclose(got["mean_cov"][1], np.cov(feats, rowvar=False), rtol=1e-10)
