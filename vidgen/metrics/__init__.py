"""Evaluation metrics (PSNR, SSIM, LPIPS, FVD) and the report writer.

frames.py   per-frame PSNR / SSIM / LPIPS of video pairs -> [B, T]
video.py    VideoMetrics: streaming dataset averages and per-timestep curves
i3d.py      InceptionI3d (seeded random init for tests), load_i3d for `i3d_pretrained_400.pt`
fvd.py      FVD protocol: preprocessing, FeatureStats, frechet_distance, streaming FVD
report.py   write_report: report.json, report.md, PNG grids and curves
"""

from vidgen.metrics.frames import (
    MSE_FLOOR,
    PSNR_MAX,
    lpips_per_frame,
    psnr_per_frame,
    ssim_per_frame,
)
from vidgen.metrics.fvd import (
    FVD,
    FVD_FRAMES,
    FVD_MIN_CLIPS,
    FVD_RESOLUTION,
    FeatureStats,
    frechet_distance,
    i3d_features,
    preprocess_for_i3d,
)
from vidgen.metrics.i3d import InceptionI3d, load_i3d
from vidgen.metrics.report import write_report
from vidgen.metrics.video import VideoMetrics

__all__ = [
    "FVD",
    "FVD_FRAMES",
    "FVD_MIN_CLIPS",
    "FVD_RESOLUTION",
    "MSE_FLOOR",
    "PSNR_MAX",
    "FeatureStats",
    "InceptionI3d",
    "VideoMetrics",
    "frechet_distance",
    "i3d_features",
    "load_i3d",
    "lpips_per_frame",
    "preprocess_for_i3d",
    "psnr_per_frame",
    "ssim_per_frame",
    "write_report",
]
