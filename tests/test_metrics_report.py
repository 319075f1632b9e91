"""write_report: the files it writes and the structure of report.json."""

import json

import pytest
import torch
from PIL import Image

from vidgen.metrics.report import write_report


def _inputs():
    torch.manual_seed(0)
    real = torch.rand(3, 20, 16, 24) * 2 - 1  # [C, T, H, W]: 20 frames, grid shows 16
    metrics = {
        "psnr": 31.5,
        "ssim": 0.91,
        "lpips": 0.08,
        "num_videos": 4,
        "psnr_t": [32.0, 31.0, 31.5],
        "ssim_t": [0.9, 0.92, 0.91],
        "count_t": [4, 4, 4],
    }
    protocol = {
        "clip_frames": 17,
        "resolution": [16, 24],
        "fvd": {
            "frames": 16,
            "resolution": 224,
            "num_real": 4,
            "num_fake": 4,
            "feature": "i3d_logits_400",
            "warnings": ["FVD from 4 clips"],
        },
    }
    config = {"model": {"name": "vae", "z_dim": 16}, "paths": ["a", "b"]}
    grids = [("sample 0", real, real * 0.9), ("gray/1", real[:1, :4], real[:1, :4])]
    return metrics, protocol, config, grids


def test_write_report_writes_all_files(tmp_path):
    metrics, protocol, config, grids = _inputs()
    metrics["fvd"] = 123.4
    paths = write_report(
        tmp_path / "report",
        metrics,
        protocol,
        config,
        "runs/x/last.ckpt",
        curves=None,
        grids=grids,
        warnings=["an extra note"],
    )
    for key in ("json", "markdown", "curves"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
    assert [p.name for p in paths["grids"]] == ["grid_sample_0.png", "grid_gray_1.png"]

    report = json.loads(paths["json"].read_text())
    assert {
        "metrics",
        "curves",
        "protocol",
        "config",
        "checkpoint",
        "warnings",
        "timestamp",
        "files",
    } <= set(report)
    assert report["metrics"] == {
        "psnr": 31.5,
        "ssim": 0.91,
        "lpips": 0.08,
        "fvd": 123.4,
        "num_videos": 4,
    }
    assert list(report["metrics"])[:4] == ["psnr", "ssim", "lpips", "fvd"]
    assert report["curves"]["psnr_t"] == [32.0, 31.0, 31.5]
    assert report["protocol"]["fvd"]["frames"] == 16 and report["config"] == config
    assert report["checkpoint"] == "runs/x/last.ckpt"
    assert report["warnings"] == ["an extra note", "fvd: FVD from 4 clips"]
    assert report["files"]["grids"] == ["grid_sample_0.png", "grid_gray_1.png"]

    md = paths["markdown"].read_text()
    for text in (
        "| PSNR (dB) | 31.5000 | higher |",
        "| FVD | 123.4000 | lower |",
        "fvd.feature",
        "FVD from 4 clips",
        "![curves](curves.png)",
        "grid_sample_0.png",
        "runs/x/last.ckpt",
    ):
        assert text in md, text

    # 16 evenly spaced frames of 20 (24 px wide + 2 px gaps) after the 110 px label column,
    # two rows of 16 px (+ gaps) under a 20 px header
    with Image.open(paths["grids"][0]) as im:
        assert im.size == (110 + 16 * 26, 20 + 2 * 18)
    with Image.open(paths["curves"]) as im:
        assert im.size[0] > im.size[1] > 100


def test_write_report_without_curves_or_grids_and_with_nan(tmp_path):
    paths = write_report(tmp_path, {"fvd": float("nan"), "num_videos": 2}, {}, {}, "ckpt")
    assert paths["curves"] is None and paths["grids"] == []
    report = json.loads(paths["json"].read_text())  # strict JSON: NaN became null
    assert report["metrics"] == {"fvd": None, "num_videos": 2}
    assert "curves" not in report and report["warnings"] == ["metrics.fvd is nan; written as null"]
    assert report["missing"] == {}


def test_write_report_marks_missing_metrics(tmp_path):
    paths = write_report(
        tmp_path,
        {"psnr": 30.0, "ssim": 0.9, "num_videos": 1},
        {"fvd": {"frechet": "|mu_r - mu_f|^2 + ...", "missing": "needs >= 2 clips per side"}},
        {},
        "ckpt",
        missing={"fvd": "needs >= 2 clips per side, got 1 real and 1 fake"},
    )
    report = json.loads(paths["json"].read_text())
    assert report["metrics"] == {"psnr": 30.0, "ssim": 0.9, "fvd": None, "num_videos": 1}
    assert report["missing"] == {"fvd": "needs >= 2 clips per side, got 1 real and 1 fake"}
    md = paths["markdown"].read_text()
    assert "| FVD | missing: needs >= 2 clips per side, got 1 real and 1 fake | lower |" in md
    assert "| fvd.frechet | \\|mu_r - mu_f\\|^2 + ... |" in md  # "|" inside a cell is escaped
    # a report of one missing figure is still a report (dit_gen with a single clip)
    only = write_report(tmp_path / "gen", {}, {}, {}, "ckpt", missing={"fvd": "no clips"})
    assert json.loads(only["json"].read_text())["metrics"] == {"fvd": None}
    with pytest.raises(ValueError, match="both as values and as missing"):
        write_report(tmp_path, {"fvd": 1.0}, {}, {}, "ckpt", missing={"fvd": "x"})


def test_write_report_rejects_unusable_inputs(tmp_path):
    real = torch.zeros(3, 2, 8, 8)
    with pytest.raises(ValueError, match="at least one scalar metric"):
        write_report(tmp_path, {}, {}, {}, "ckpt")
    with pytest.raises(TypeError, match="metric 'psnr'"):
        write_report(tmp_path, {"psnr": "high"}, {}, {}, "ckpt")
    with pytest.raises(TypeError, match="config.obj is a object"):
        write_report(tmp_path, {"psnr": 1.0}, {}, {"obj": object()}, "ckpt")
    with pytest.raises(ValueError, match="same shape|one shape"):
        write_report(tmp_path, {"psnr": 1.0}, {}, {}, "ckpt", grids=[("a", real, real[:, :1])])
    with pytest.raises(ValueError, match="unique name"):
        write_report(
            tmp_path, {"psnr": 1.0}, {}, {}, "ckpt", grids=[("a", real, real), ("a", real, real)]
        )
