"""The end of `make demo`: one table of its figures and one picture to look at.

    python -m vidgen.tools.demo_report --demo outputs/demo --shards data/synthetic/val
    python -m vidgen.tools.demo_report --demo outputs/demo --lora     # the end of `make demo-lora`

Reads what the demo wrote under ``--demo``:

- ``stage_times.txt``: ``<stage> <unix seconds>`` lines, the first ``start`` (the Makefile
  appends one as each stage ends), for the wall time per stage;
- the evaluation reports ``eval_vae_stage2/``, ``eval/`` (the final VAE) and ``eval_dit/``;
- ``vae_stage3/`` (the final VAE) and ``samples/*.mp4`` with their sidecar ``.json``.

Writes ``summary.md`` (the table, also printed) and ``contact_sheet.png``: held-out clips
over their reconstructions by the final VAE, then the DiT samples, each under its caption
and the verdict of the caption check (vidgen.metrics.caption).

``--lora`` writes ``dit_lora/summary.md`` instead: the caption accuracy of the demo DiT with
and without its LoRA (``LORA_REPORTS``) on held-out brown captions and on the base palette's,
and ``stage_times_lora.txt``'s wall times.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from vidgen.data.pipeline import build_video_dataset
from vidgen.data.video import decode_frames, probe_video
from vidgen.metrics.caption import PARTS, check_clip
from vidgen.models.vae import load_vae

VAE_REPORTS = (("VAE stage 2", "eval_vae_stage2"), ("VAE stage 3", "eval"))
DIT_REPORT = "eval_dit"
# (row, brown-caption report, base-palette report) of `make demo-lora`
LORA_REPORTS = (("demo DiT", "eval_lora_brown_base", DIT_REPORT),
                ("demo DiT + LoRA", "eval_lora_brown", "eval_lora_palette"))


def stage_times(path: Path) -> list[tuple[str, float]]:
    """(stage, seconds) from ``<stage> <unix seconds>`` lines, each after the one before."""
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if not rows or rows[0][0] != "start":
        raise ValueError(f"{path} must begin with a 'start <unix seconds>' line, got {rows[:1]}")
    stamps = [(name, float(t)) for name, t in rows]
    return [(name, t - stamps[i][1]) for i, (name, t) in enumerate(stamps[1:])]


def _metrics(folder: Path) -> dict:
    path = folder / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"no evaluation report {path}: run the demo's eval.py steps first")
    return json.loads(path.read_text())["metrics"]


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _caption_cell(m: dict) -> str:
    """'<all> (<background> / <shape> / <motion>)' of a report's caption metrics."""
    parts = " / ".join(_pct(m.get(f"caption_{p}")) for p in PARTS)
    return f"{_pct(m.get('caption_accuracy'))} ({parts})"


def summary_table(demo: Path) -> str:
    """The demo's figures as Markdown: VAE, DiT, wall time per stage."""
    lines = ["| Model | PSNR (dB) | worst frame PSNR (dB) | SSIM | caption accuracy "
             "(background / shape / motion) | real clips |", "|---|---|---|---|---|---|"]
    for label, folder in VAE_REPORTS:
        m = _metrics(demo / folder)
        lines.append(
            f"| {label} | {m['psnr']:.2f} | {m['psnr_worst_frame']:.2f} (frame {m['psnr_worst_frame_index']}) "
            f"| {m['ssim']:.3f} | {_caption_cell(m)} "
            f"| {_pct(m.get('reference_caption_accuracy'))} |"
        )
    m = _metrics(demo / DIT_REPORT)
    lines.append(f"| DiT samples ({m['caption_clips']} held-out captions) | | | | {_caption_cell(m)} | |")
    return "\n".join(lines + _time_rows(demo / "stage_times.txt")) + "\n"


def _time_rows(path: Path) -> list[str]:
    if not path.is_file():
        return []
    times = stage_times(path)
    rows = ["", "| Stage | wall time |", "|---|---|"]
    rows += [f"| {name} | {sec / 60:.1f} min |" for name, sec in times]
    return rows + [f"| total | {sum(s for _, s in times) / 60:.1f} min |"]


def lora_table(demo: Path) -> str:
    """`make demo-lora`'s figures: caption accuracy with and without the LoRA, wall times."""
    lines = ["| DiT | held-out brown captions (background / shape / motion) | base-palette captions |",
             "|---|---|---|"]
    for label, brown, palette in LORA_REPORTS:
        b, p = _metrics(demo / brown), _metrics(demo / palette)
        lines.append(f"| {label} | {_caption_cell(b)} of {b['caption_clips']} | "
                     f"{_caption_cell(p)} of {p['caption_clips']} |")
    return "\n".join(lines + _time_rows(demo / "stage_times_lora.txt")) + "\n"


# --------------------------------------------------------------------------------------
# Contact sheet
# --------------------------------------------------------------------------------------


def _frames_uint8(video: torch.Tensor, idx: list[int]) -> list[np.ndarray]:
    """[3, T, H, W] in [-1, 1] -> the frames at idx as uint8 [H, W, 3]."""
    v = ((video[:, idx].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(v.permute(1, 2, 3, 0).numpy())


def _verdict(video: torch.Tensor, caption: str) -> str:
    v = check_clip(video, caption)
    if v is None:
        return "caption not of the synthetic form"
    return "  ".join(f"{p} {'ok' if v[p] else 'FAIL'}" for p in PARTS)


def contact_sheet(path: Path, blocks: list[tuple[str, list[tuple[str, torch.Tensor]]]],
                  frames: int = 6, scale: int = 2) -> None:
    """PNG of captioned blocks; each block is (title, [(row label, [3, T, H, W] in [-1, 1])])."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    label_w, line_h, gap = 120, 14, 2
    h, w = (max(r[1].shape[-2] for _, rows in blocks for r in rows) * scale,
            max(r[1].shape[-1] for _, rows in blocks for r in rows) * scale)
    height = sum(2 * line_h + len(rows) * (h + gap) + 6 for _, rows in blocks)
    canvas = Image.new("RGB", (label_w + frames * (w + gap), height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for title, rows in blocks:
        for k, text in enumerate(title.split("\n")[:2]):
            draw.text((4, y + 1 + k * line_h), text, fill="black", font=font)
        y += 2 * line_h
        for label, video in rows:
            t = video.shape[1]
            idx = np.unique(np.linspace(0, t - 1, min(t, frames)).round().astype(int)).tolist()
            draw.text((4, y + h // 2 - 6), label, fill="black", font=font)
            for c, frame in enumerate(_frames_uint8(video, idx)):
                img = Image.fromarray(frame).resize((w, h), Image.NEAREST)
                canvas.paste(img, (label_w + c * (w + gap), y))
            y += h + gap
        y += 6
    canvas.save(path)


@torch.no_grad()
def build_contact_sheet(demo: Path, shards: str, clips: int, out: Path) -> None:
    vae = load_vae(demo / "vae_stage3").eval()
    blocks = []
    dataset = build_video_dataset(shards, mode="video", num_frames=17, height=64, width=64,
                                  batch_size=clips, resampled=False, deterministic=True)
    batch = next(iter(dataset))
    mu, _ = vae.encode(batch["video"])
    recon = vae.decode(mu).clamp(-1, 1)
    for real, rec, caption in zip(batch["video"], recon, batch["caption"]):
        blocks.append((f"held-out: {caption}\nreconstruction: {_verdict(rec, caption)}",
                       [("real", real), ("VAE recon", rec)]))
    for mp4 in sorted((demo / "samples").glob("*.mp4")):
        sidecar = json.loads(mp4.with_suffix(".json").read_text())
        count = probe_video(mp4)["num_frames"]
        frames = decode_frames(mp4.read_bytes(), list(range(count)))  # [T, H, W, 3] uint8
        video = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1
        blocks.append((f"DiT sample (seed {sidecar['seed']}, {sidecar['steps']} {sidecar['solver']} steps, "
                       f"cfg {sidecar['cfg_scale']}): {sidecar['prompt']}\n{_verdict(video, sidecar['prompt'])}",
                       [("DiT", video)]))
    contact_sheet(out, blocks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vidgen.tools.demo_report", description=__doc__.split("\n")[0])
    parser.add_argument("--demo", default="outputs/demo", help="the demo's output folder")
    parser.add_argument("--shards", default="data/synthetic/val", help="the held-out shards")
    parser.add_argument("--clips", type=int, default=4, help="held-out clips on the contact sheet")
    parser.add_argument("--lora", action="store_true", help="the table of `make demo-lora` instead")
    args = parser.parse_args(argv)
    demo = Path(args.demo)
    if args.lora:
        table = lora_table(demo)
        (demo / "dit_lora" / "summary.md").write_text(table)
        print(table)
        return
    table = summary_table(demo)
    (demo / "summary.md").write_text(table)
    build_contact_sheet(demo, args.shards, args.clips, demo / "contact_sheet.png")
    print(table)
    print(f"contact sheet: {demo / 'contact_sheet.png'}; table: {demo / 'summary.md'}")


if __name__ == "__main__":
    main()
