"""FVD: preprocessing protocol, streaming statistics, Frechet distance, the FVD class."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

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
    fvd = FVD(PooledFeatures(), batch_size=3, min_clips=256, feature_dim=8)
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

    fvd.reset()
    fvd.update_real(videos)
    fvd.update_fake((videos * 0.5 + 0.3).clamp(-1, 1))
    with pytest.warns(UserWarning):
        value, _ = fvd.compute()
    assert value > 0.0


def test_fvd_needs_two_clips_per_side():
    fvd = FVD(PooledFeatures(), feature_dim=8)
    fvd.update_real(torch.zeros(3, 3, 16, 16, 16))
    with pytest.raises(ValueError, match="at least 2 fake clips .* got 0"):
        fvd.compute()


def test_fvd_with_inception_i3d_on_identical_videos():
    # Real I3D architecture (random weights) through the full 16x224x224 protocol.
    torch.manual_seed(0)
    fvd = FVD(InceptionI3d(), batch_size=2, min_clips=2)
    videos = torch.rand(2, 3, 16, 32, 32) * 2 - 1
    fvd.update_real(videos)
    fvd.update_fake(videos)
    value, protocol = fvd.compute()
    assert protocol["feature"] == "i3d_logits_400" and protocol["warnings"] == []
    assert value == pytest.approx(0.0, abs=1e-6)
