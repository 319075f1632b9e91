"""FVD: preprocessing protocol, streaming statistics, Frechet distance, the FVD class, and
the random test backbone (its features must move with the input, or no FVD test can fail)."""

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from vidgen.data.synthetic import render_video
from vidgen.metrics.fvd import FVD, FeatureStats, frechet_distance, preprocess_for_i3d
from vidgen.metrics.i3d import InceptionI3d


def _gaussian_samples(rng, n, d, shift=0.0):
    a = rng.standard_normal((d, d))
    return rng.standard_normal((n, d)) @ a + shift


def _scipy_frechet(mu1, s1, mu2, s2):
    """The textbook formula with scipy's general matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# --------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------


def test_frechet_distance_matches_scipy_reference():
    rng = np.random.default_rng(0)
    f1, f2 = _gaussian_samples(rng, 300, 12), _gaussian_samples(rng, 300, 12, shift=0.5)
    mu1, s1, mu2, s2 = f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours > 1.0
    assert ours == pytest.approx(_scipy_frechet(mu1, s1, mu2, s2), rel=1e-8)
    # torch inputs give the same value
    assert frechet_distance(*map(torch.from_numpy, (mu1, s1, mu2, s2))) == pytest.approx(
        ours, rel=1e-12
    )


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()  # 5 + 2
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(
        expected, rel=1e-12
    )


@pytest.mark.parametrize("n", [500, 20])  # 20 < D: singular covariances, as with few clips
def test_frechet_distance_of_identical_statistics_is_zero(n):
    rng = np.random.default_rng(1)
    f = _gaussian_samples(rng, n, 64) * 10
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    d = frechet_distance(mu, sigma, mu, sigma)
    assert 0.0 <= d < 1e-8 * np.trace(sigma)


def test_frechet_distance_rejects_bad_shapes_and_values():
    with pytest.raises(ValueError, match="one D"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2 has non-finite"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.full((2, 2), np.nan))


# --------------------------------------------------------------------------------------
# Streaming statistics
# --------------------------------------------------------------------------------------


def test_feature_stats_streaming_equals_batch():
    rng = np.random.default_rng(2)
    feats = _gaussian_samples(rng, 103, 7, shift=3.0)
    stats = FeatureStats(7)
    for chunk in np.array_split(feats, [10, 11, 50]):  # uneven chunks, including size 1
        stats.update(torch.from_numpy(chunk).float())
    mu, sigma = stats.mean_cov()
    f32 = feats.astype(np.float32).astype(np.float64)  # what the float32 updates carried
    assert stats.count == 103
    np.testing.assert_allclose(mu, f32.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f32, rowvar=False), rtol=1e-9, atol=1e-9)

    # merging two halves == one accumulator; all_reduce without a process group is a copy
    a, b = FeatureStats(7), FeatureStats(7)
    a.update(torch.from_numpy(feats[:40]))
    b.update(torch.from_numpy(feats[40:]))
    merged = a.merge(b).all_reduce()
    assert merged.count == 103 and merged is not a
    np.testing.assert_allclose(merged.mean_cov()[1], np.cov(feats, rowvar=False), rtol=1e-9)


def test_feature_stats_errors():
    stats = FeatureStats(4)
    with pytest.raises(ValueError, match=r"expects \[N, 4\]"):
        stats.update(torch.zeros(3, 5))
    stats.update(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        stats.mean_cov()
    with pytest.raises(ValueError, match="non-finite"):
        stats.update(torch.full((2, 4), float("nan")))


# --------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------


def test_preprocess_uses_first_16_frames_resized_to_224():
    # frame t has constant value t / 20 - 0.5, so the output tells which frames were used
    t_values = torch.arange(20).float() / 20 - 0.5
    video = t_values.view(1, 1, 20, 1, 1).expand(2, 3, 20, 40, 72).contiguous()
    out = preprocess_for_i3d(video)
    assert out.shape == (2, 3, 16, 224, 224) and out.dtype == torch.float32
    assert torch.allclose(out[0, 0, :, 100, 100], t_values[:16])
    # out-of-range model outputs are clamped to [-1, 1]
    assert preprocess_for_i3d(video * 10).abs().max() <= 1.0


def test_preprocess_rejects_short_or_non_rgb_clips():
    with pytest.raises(ValueError, match="clips of 16 frames .* got T=9"):
        preprocess_for_i3d(torch.zeros(1, 3, 9, 32, 32))
    with pytest.raises(ValueError, match=r"RGB videos \[B, 3, T, H, W\]"):
        preprocess_for_i3d(torch.zeros(1, 1, 16, 32, 32))


# --------------------------------------------------------------------------------------
# The FVD accumulator
# --------------------------------------------------------------------------------------


class PooledFeatures(nn.Module):
    """A cheap stand-in for I3D: per-frame channel means -> linear, [N,3,16,224,224] -> [N,8]."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 16, 8)

    def forward(self, x):
        return self.proj(x.mean(dim=(3, 4)).flatten(1))


def test_fvd_stream_identical_and_different_sets():
    torch.manual_seed(0)
    net = PooledFeatures()
    fvd = FVD(net, batch_size=3, min_clips=256, feature_dim=8)
    videos = torch.rand(12, 3, 17, 24, 32) * 2 - 1
    for chunk in videos.split(5):
        fvd.update_real(chunk)
        fvd.update_fake(chunk.clone())
    with pytest.warns(UserWarning, match="12 real and 12 fake clips"):
        value, protocol = fvd.compute()
    assert value == pytest.approx(0.0, abs=1e-8)
    assert protocol["frames"] == 16 and protocol["resolution"] == 224
    assert protocol["num_real"] == 12 and protocol["num_fake"] == 12
    assert protocol["feature"] == "custom:PooledFeatures[8]"  # not the reference network
    assert len(protocol["warnings"]) == 1 and fvd.warnings == protocol["warnings"]

    # A different set: the streamed value equals numpy/scipy on the features computed apart.
    fake = (videos * 0.5 + 0.3).clamp(-1, 1)
    fvd.reset()
    fvd.update_real(videos)
    fvd.update_fake(fake)
    with pytest.warns(UserWarning):
        value, _ = fvd.compute()
    with torch.no_grad():
        fr, ff = (net(preprocess_for_i3d(v)).double().numpy() for v in (videos, fake))
    expected = _scipy_frechet(
        fr.mean(0), np.cov(fr, rowvar=False), ff.mean(0), np.cov(ff, rowvar=False)
    )
    assert expected > 1e-3 and value == pytest.approx(expected, rel=1e-6)


def test_fvd_needs_two_clips_per_side():
    fvd = FVD(PooledFeatures(), feature_dim=8)
    fvd.update_real(torch.zeros(3, 3, 16, 16, 16))
    with pytest.raises(ValueError, match="needs >= 2 clips per side .* got 3 real and 0 fake"):
        fvd.compute()
    # eval.py's path: no value, the reason in the protocol, everything else still there
    fvd.update_fake(torch.zeros(1, 3, 16, 16, 16))
    value, protocol = fvd.compute(allow_missing=True)
    assert value is None and protocol["missing"].endswith("got 3 real and 1 fake")
    assert protocol["num_real"] == 3 and protocol["frames"] == 16


def test_fvd_protocol_states_the_method():
    fvd = FVD(InceptionI3d(seed=3), min_clips=2)
    fvd.real.update(torch.randn(3, 400, dtype=torch.float64))
    fvd.fake.update(torch.randn(3, 400, dtype=torch.float64))
    _, protocol = fvd.compute()
    assert protocol["feature"] == "i3d_logits_400"
    assert protocol["i3d_weights"].startswith("random:seed=3")
    assert "align_corners=False" in protocol["resize"] and "no crop" in protocol["resize"]
    assert protocol["value_range"] == [-1, 1] and protocol["frame_selection"] == "first 16"
    assert "i3d_pretrained_400.pt" in protocol["network"] and "N-1" in protocol["covariance"]
    # a stand-in network is not labelled as I3D
    _, custom = FVD(PooledFeatures(), feature_dim=8, min_clips=2).compute(allow_missing=True)
    assert custom["network"] == custom["feature_layer"] == "custom:PooledFeatures[8]"


# --------------------------------------------------------------------------------------
# The random test backbone (metrics.random_backbones=true)
# --------------------------------------------------------------------------------------
#
# A fixed set of 6 synthetic clips (coloured shapes moving over textures). The backbone runs
# at 16x64x64 here, straight on the clips: at 224x224 one clip costs ~4 s on one CPU thread,
# 64x64 ~0.25 s. The full 224x224 path runs in test_fvd_with_random_i3d_at_protocol_size.

NUM_CLIPS, CLIP_SIZE = 6, 64


def _synthetic_clips(n=NUM_CLIPS, size=CLIP_SIZE, frames=16, seed=7):
    """[n, 3, frames, size, size] in [-1, 1], the same on every run."""
    vids = [render_video(size, frames, np.random.default_rng([seed, i]))[0] for i in range(n)]
    v = torch.from_numpy(np.stack(vids)).float() / 127.5 - 1  # [n, T, H, W, 3]
    return v.permute(0, 4, 1, 2, 3).contiguous()


def _noisy(x, sigma, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def _blurred(x, sigma):
    """Separable Gaussian blur of every frame (replicate padding)."""
    r = int(3 * sigma + 0.5)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1) / sigma) ** 2)
    k = k / k.sum()
    b, c, t, h, w = x.shape
    f = x.transpose(1, 2).reshape(b * t * c, 1, h, w)
    f = F.conv2d(F.pad(f, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    f = F.conv2d(F.pad(f, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return f.view(b, t, c, h, w).transpose(1, 2)


@pytest.fixture(scope="module")
def backbone():
    """The test I3D exactly as eval.py builds it, the clips and their features."""
    i3d = InceptionI3d(seed=0)
    clips = _synthetic_clips()
    with torch.no_grad():
        feats = i3d(clips).double()
    return i3d, clips, feats


def _fvd_of(i3d, real_feats, videos, batch=NUM_CLIPS):
    """FVD of precomputed real features against the backbone's features of `videos`."""
    real, fake = FeatureStats(400), FeatureStats(400)
    real.update(real_feats)
    with torch.no_grad():
        for chunk in videos.split(batch):
            fake.update(i3d(chunk))
    return frechet_distance(*real.mean_cov(), *fake.mean_cov())


def test_random_i3d_features_vary_with_the_input(backbone):
    i3d, clips, feats = backbone
    assert feats.shape == (NUM_CLIPS, 400) and torch.isfinite(feats).all()
    # Second moment kept through the network: logits of rms ~1 (measured 1.00), neither
    # vanishing nor exploding.
    rms = feats.pow(2).mean().sqrt().item()
    assert 0.3 < rms < 3.0
    # Per-logit std across the 6 clips, averaged over the 400 logits: measured 0.21.
    # PyTorch's default init gives 3e-7 (the logits are their bias for any input).
    assert feats.std(dim=0).mean().item() > 0.05
    # and not one shared direction: the clips' centred features span 5 dimensions
    sv = torch.linalg.svdvals(feats - feats.mean(0))
    assert (sv[:5] > 1e-3 * sv[0]).all()
    # seeded: the same seed builds the same weights
    assert torch.equal(InceptionI3d(seed=0).logits.conv3d.weight, i3d.logits.conv3d.weight)


def test_fvd_of_identical_sets_is_zero(backbone):
    i3d, clips, feats = backbone
    # recomputed in other batches (eval-mode BatchNorm: per-clip features do not depend on them)
    d = _fvd_of(i3d, feats, clips.clone(), batch=4)
    # tight: the features' total variance is ~24 and the mildest distortion's FVD ~0.5
    assert d < 1e-9


def test_fvd_grows_with_noise(backbone):
    # measured 0.48, 24.1, 249 (seed 0 backbone, noise seed 1); default init: 9e-13 .. 3e-10
    i3d, clips, feats = backbone
    ladder = [_fvd_of(i3d, feats, _noisy(clips, s)) for s in (0.05, 0.2, 0.5)]
    assert ladder[0] > 0.05
    assert ladder[1] > 5 * ladder[0] and ladder[2] > 5 * ladder[1], ladder


def test_fvd_grows_with_blur(backbone):
    # measured 0.68, 4.9, 17.1
    i3d, clips, feats = backbone
    ladder = [_fvd_of(i3d, feats, _blurred(clips, s)) for s in (0.5, 1.0, 2.0)]
    assert ladder[0] > 0.05
    assert ladder[1] > 2 * ladder[0] and ladder[2] > 2 * ladder[1], ladder


def test_fvd_with_random_i3d_at_protocol_size():
    # The whole protocol: 16 frames resized to 224x224, the test I3D, streaming statistics.
    fvd = FVD(InceptionI3d(seed=0), batch_size=2, min_clips=2)
    clips = _synthetic_clips(n=2, size=32)
    fvd.update_real(clips)
    fvd.update_fake(_noisy(clips, 0.2))
    value, protocol = fvd.compute()
    assert protocol["feature"] == "i3d_logits_400" and protocol["warnings"] == []
    assert protocol["num_real"] == protocol["num_fake"] == 2
    # measured 12.4; PyTorch's default init gives < 1e-9
    assert value > 1.0


@pytest.mark.slow
def test_fvd_ladder_at_protocol_size():
    # As test_fvd_grows_with_noise, through the FVD class at 224x224 (~80 s on one thread).
    clips = _synthetic_clips(n=4, size=32)
    fvd = FVD(InceptionI3d(seed=0), batch_size=4, min_clips=2)
    fvd.update_real(clips)
    values = []
    for sigma in (0.0, 0.05, 0.2, 0.5):
        fvd.fake = FeatureStats(400)
        fvd.update_fake(_noisy(clips, sigma) if sigma else clips.clone())
        values.append(fvd.compute()[0])
    print("FVD ladder (noise sigma 0, 0.05, 0.2, 0.5):", " / ".join(f"{v:.3g}" for v in values))
    assert values[0] == pytest.approx(0.0, abs=1e-9)
    assert 0.05 < values[1] < values[2] < values[3], values
