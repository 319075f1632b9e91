"""The evaluation report folder: report.json, report.md, sample grids, metric curves.

report.json layout:
    {"metrics":   {"psnr": .., "ssim": .., "lpips": .., "fvd": .., "num_videos": ..},  # where computed
     "missing":   {"fvd": "needs >= 2 clips per side ..."},   # asked for, not computable: null above
     "curves":    {"psnr_t": [..], "ssim_t": [..], ...},      # only when there are curves
     "protocol":  {...}, "config": {...}, "checkpoint": "...",
     "warnings":  ["..."], "timestamp": "2025-01-01T00:00:00+00:00",
     "files":     {"markdown": "report.md", "curves": "curves.png", "grids": ["grid_x.png"]}}

Non-finite numbers (a NaN metric from a diverged model) are written as null, each with a
warning, because strict JSON has no NaN/inf.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

METRIC_LABELS = {  # key -> (label, better)
    "psnr": ("PSNR (dB)", "higher"),
    "ssim": ("SSIM", "higher"),
    "lpips": ("LPIPS (alex)", "lower"),
    "fvd": ("FVD", "lower"),
    "psnr_worst_frame": ("PSNR, worst frame (dB)", "higher"),
    "psnr_frame0": ("PSNR, frame 0: the conditioning frame (dB)", "higher"),
    "psnr_later_frames": ("PSNR, frames 1.. (dB)", "higher"),
    "ssim_frame0": ("SSIM, frame 0", "higher"),
    "ssim_later_frames": ("SSIM, frames 1..", "higher"),
    "caption_accuracy": ("Caption accuracy", "higher"),
    "caption_background": ("Caption: background colour", "higher"),
    "caption_shape": ("Caption: shape colour blob", "higher"),
    "caption_motion": ("Caption: motion direction", "higher"),
    "reference_caption_accuracy": ("Caption accuracy, real clips", "higher"),
}
CURVE_LABELS = {"psnr_t": "PSNR (dB)", "ssim_t": "SSIM", "lpips_t": "LPIPS"}


# --------------------------------------------------------------------------------------
# JSON conversion
# --------------------------------------------------------------------------------------


def _jsonable(obj, where: str, warnings: list[str]):
    """obj as plain JSON types; non-finite floats -> None (+ a warning naming `where`)."""
    if isinstance(obj, torch.Tensor | np.ndarray):
        obj = obj.tolist()
    elif isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        warnings.append(f"{where} is {obj}; written as null")
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}", warnings) for k, v in obj.items()}
    if isinstance(obj, Sequence):
        return [_jsonable(v, f"{where}[{i}]", warnings) for i, v in enumerate(obj)]
    raise TypeError(
        f"report: {where} is a {type(obj).__name__}, which has no JSON form; pass numbers, "
        "strings, lists or dicts (e.g. OmegaConf.to_container(cfg, resolve=True) for configs)"
    )


def _split_metrics(metrics: Mapping) -> tuple[dict, dict]:
    """Scalars (the figures) and sequences (per-timestep curves such as psnr_t)."""
    scalars, curves = {}, {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor | np.ndarray) and value.ndim == 0:
            value = value.item()
        if isinstance(value, int | float | np.number) and not isinstance(value, bool):
            scalars[key] = value
        elif isinstance(value, Sequence | torch.Tensor | np.ndarray) and not isinstance(value, str):
            curves[key] = value
        else:
            raise TypeError(
                f"report: metric {key!r} is {value!r}; expected a number or a per-timestep list"
            )
    return scalars, curves


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


def _to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[C, T, H, W] in [-1, 1] (C = 1 or 3) -> [T, H, W, 3] uint8."""
    video = video.detach().float().cpu().clamp(-1, 1)
    if video.shape[0] == 1:
        video = video.expand(3, -1, -1, -1)
    return ((video + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def write_grid(
    path: Path, real: torch.Tensor, other: torch.Tensor, other_label: str, max_frames: int = 16
) -> list[int]:
    """PNG with two rows (real / other) and one column per shown frame. Returns frame indices.

    real, other: [C, T, H, W] in [-1, 1], C = 1 or 3, same shape. Videos longer than
    `max_frames` show `max_frames` evenly spaced frames (the returned indices say which).
    """
    from PIL import Image, ImageDraw, ImageFont

    if real.dim() != 4 or real.shape != other.shape or real.shape[0] not in (1, 3):
        raise ValueError(
            f"grid {path.name}: expected real and other of one shape [C, T, H, W] with C 1 or 3, "
            f"got {tuple(real.shape)} and {tuple(other.shape)}"
        )
    t, h, w = real.shape[1:]
    idx = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int)).tolist()
    rows = [_to_uint8_frames(real[:, idx]), _to_uint8_frames(other[:, idx])]

    font = ImageFont.load_default()
    label_w, header_h, gap = 110, 20, 2
    canvas = Image.new("RGB", (label_w + len(idx) * (w + gap), header_h + 2 * (h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (frames, label) in enumerate(zip(rows, ("real", other_label))):
        y = header_h + r * (h + gap)
        draw.text((4, y + h // 2 - 6), label, fill="black", font=font)
        for c, frame in enumerate(frames):
            canvas.paste(Image.fromarray(frame), (label_w + c * (w + gap), y))
    for c, i in enumerate(idx):
        draw.text((label_w + c * (w + gap) + 2, 3), f"t={i}", fill="black", font=font)
    canvas.save(path)
    return idx


def write_curves(path: Path, curves: Mapping[str, Sequence[float]]) -> None:
    """PNG with one panel per curve (x: frame index), via matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # Figure + Agg canvas directly: no pyplot global state, no backend switch for the caller.
    fig = Figure(figsize=(4.5 * len(curves), 3.2))
    FigureCanvasAgg(fig)
    for i, (key, values) in enumerate(curves.items()):
        ax = fig.add_subplot(1, len(curves), i + 1)
        values = [np.nan if v is None else v for v in values]
        ax.plot(range(len(values)), values, marker="o", markersize=3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("frame t")
        ax.set_ylabel(CURVE_LABELS.get(key, key))
        ax.set_title(f"{CURVE_LABELS.get(key, key)} per timestep")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------


def _fmt(value) -> str:
    """A table cell: floats to 4 decimals, None as n/a, "|" escaped (it ends a cell)."""
    if isinstance(value, float):
        return f"{value:.4f}"
    return "n/a" if value is None else str(value).replace("|", "\\|")


def _flatten(d: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            items += _flatten(v, f"{prefix}{k}.")
        else:
            items.append((f"{prefix}{k}", v))
    return items


def _markdown(report: dict, grid_frames: dict[str, list[int]]) -> str:
    lines = [
        "# vidgen evaluation report",
        "",
        f"- Checkpoint: `{report['checkpoint']}`",
        f"- Written: {report['timestamp']}",
        "",
        "## Metrics",
        "",
        "| Metric | Value | Better |",
        "|---|---|---|",
    ]
    for key, value in report["metrics"].items():
        label, better = METRIC_LABELS.get(key, (key, ""))
        if key in report["missing"]:
            value = f"missing: {report['missing'][key]}"
        lines.append(f"| {label} | {_fmt(value)} | {better} |")
    lines += ["", "## Protocol", "", "| Field | Value |", "|---|---|"]
    lines += [
        f"| {k} | {_fmt(v)} |"
        for k, v in _flatten(report["protocol"])
        if not k.endswith("warnings")
    ]
    if report["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    files = report["files"]
    if files.get("curves"):
        lines += ["", "## Per-timestep curves", "", f"![curves]({files['curves']})"]
    if files.get("grids"):
        lines += ["", "## Samples", ""]
        for name, file in zip(grid_frames, files["grids"]):
            shown = ", ".join(map(str, grid_frames[name]))
            lines += [f"### {name}", "", f"![{name}]({file})", "", f"Frames shown: {shown}", ""]
    lines += ["", "## Config", "", "```json", json.dumps(report["config"], indent=2), "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def write_report(
    out_dir: str | os.PathLike,
    metrics: Mapping,
    protocol: Mapping,
    config: Mapping,
    checkpoint: str,
    curves: Mapping[str, Sequence[float]] | None = None,
    grids: Sequence[tuple[str, torch.Tensor, torch.Tensor]] | None = None,
    *,
    warnings: Sequence[str] | None = None,
    missing: Mapping[str, str] | None = None,
    other_label: str = "reconstruction",
    grid_max_frames: int = 16,
) -> dict:
    """Write the report folder and return the paths written.

    metrics: scalar figures ({"psnr", "ssim", "lpips", "fvd", "num_videos", ...}); sequence
        values in it (e.g. VideoMetrics.compute()'s "psnr_t") are treated as curves.
    protocol: how they were measured (e.g. {"fvd": FVD protocol dict, "clip_frames": 17}).
        "warnings" lists found at its top level or one level down are collected into the
        report's warnings, next to the `warnings` argument.
    config: the resolved run config as plain containers. checkpoint: its path or name.
    curves: per-timestep curves, e.g. {"psnr_t": [...], "ssim_t": [...]}.
    grids: (name, real [C, T, H, W], other [C, T, H, W]) in [-1, 1]; `other_label` names
        the second row ("reconstruction" or "generated").
    missing: metrics that were asked for but could not be computed, name -> reason
        (e.g. {"fvd": "needs >= 2 clips per side, got 1"}): written as null in "metrics",
        the reasons under "missing" and in the Markdown table.
    Returns {"json": Path, "markdown": Path, "curves": Path | None, "grids": [Path]}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = list(warnings or [])
    for key, value in protocol.items():
        if key == "warnings":
            notes += list(value)
        elif isinstance(value, Mapping) and "warnings" in value:
            notes += [f"{key}: {w}" for w in value["warnings"]]

    scalars, metric_curves = _split_metrics(metrics)
    missing = {str(k): str(v) for k, v in (missing or {}).items()}
    if not scalars and not missing:
        raise ValueError(
            f"write_report needs at least one scalar metric, got keys {sorted(metrics)}"
        )
    both = sorted(set(missing) & set(scalars))
    if both:
        raise ValueError(f"write_report: {both} are given both as values and as missing")
    scalars.update(dict.fromkeys(missing))  # None: null in report.json
    # Known figures first, in a fixed order, then anything else (num_videos, ...).
    ordered = {k: scalars[k] for k in METRIC_LABELS if k in scalars}
    ordered.update({k: v for k, v in scalars.items() if k not in ordered})
    all_curves = {**metric_curves, **(curves or {})}
    plotted = {
        k: v for k, v in all_curves.items() if k.endswith("_t") and k != "count_t" and len(v)
    }

    paths: dict = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "curves": None,
        "grids": [],
    }
    if plotted:
        paths["curves"] = out / "curves.png"
        write_curves(paths["curves"], {k: _jsonable(v, k, []) for k, v in plotted.items()})
    grid_frames: dict[str, list[int]] = {}
    for name, real, other in grids or []:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))
        if safe in grid_frames:
            raise ValueError(f"two grids share the name {name!r}; give each sample a unique name")
        path = out / f"grid_{safe}.png"
        grid_frames[safe] = write_grid(path, real, other, other_label, grid_max_frames)
        paths["grids"].append(path)

    report = {
        "metrics": _jsonable(ordered, "metrics", notes),
        "missing": missing,
        "curves": _jsonable(all_curves, "curves", notes) if all_curves else None,
        "protocol": _jsonable(protocol, "protocol", notes),
        "config": _jsonable(config, "config", notes),
        "checkpoint": str(checkpoint),
        "warnings": notes,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {
            "markdown": paths["markdown"].name,
            "curves": paths["curves"].name if paths["curves"] else None,
            "grids": [p.name for p in paths["grids"]],
        },
    }
    if report["curves"] is None:
        del report["curves"]
    paths["json"].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(_markdown(report, grid_frames))
    return paths
