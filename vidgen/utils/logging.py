"""Video grids for humans (saved as PNG in the run folder and sent to the active loggers),
and the running data counters the training modules log."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def video_grid(rows: list[torch.Tensor], max_frames: int = 8) -> np.ndarray:
    """Tile videos into one image: one row per video, one column per frame.

    rows: videos [C, T, H, W] in [-1, 1] (same C, H, W). Frames are subsampled evenly to at
    most `max_frames` columns. Returns uint8 [rows*H, cols*W, 3].
    """
    imgs = []
    for v in rows:
        v = v.detach().float().cpu().clamp(-1, 1)
        if v.shape[0] == 1:
            v = v.expand(3, *v.shape[1:])
        idx = torch.linspace(0, v.shape[1] - 1, min(max_frames, v.shape[1])).round().long()
        frames = v[:, idx]  # [C, t, H, W]
        imgs.append(torch.cat(list(frames.unbind(1)), dim=2))  # [C, H, t*W]
    width = max(i.shape[2] for i in imgs)
    imgs = [torch.nn.functional.pad(i, (0, width - i.shape[2]), value=-1) for i in imgs]
    grid = torch.cat(imgs, dim=1)  # [C, rows*H, W']
    return ((grid.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()


def log_video_grid(trainer, name: str, real: torch.Tensor, other: torch.Tensor, step: int) -> Path:
    """Save `real` over `other` (each [B, C, T, H, W]) as a PNG and log it.

    The PNG lands in `<run_dir>/samples/`; TensorBoard and W&B loggers also receive it.
    """
    rows = [v for pair in zip(real, other) for v in pair]  # real_0, other_0, real_1, ...
    grid = video_grid(rows)
    out = Path(trainer.default_root_dir) / "samples" / f"{name.replace('/', '_')}_{step:07d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out)
    for logger in trainer.loggers:
        kind = type(logger).__name__
        if kind == "TensorBoardLogger":
            logger.experiment.add_image(name, grid, step, dataformats="HWC")
        elif kind == "WandbLogger":
            logger.log_image(key=name, images=[grid], step=step)
    return out


def add_data_counts(totals: dict[str, int], batch: dict) -> dict[str, float]:
    """Add a batch's loader counters (``batch["counts"]``: e.g. ``probed_meta``,
    ``source/<name>/samples``) into ``totals``; -> the ``data/<counter>`` values to log."""
    for key, n in (batch.get("counts") or {}).items():
        totals[key] = totals.get(key, 0) + int(n)
    return {f"data/{key}": float(n) for key, n in totals.items()}
