"""First frames of held-out clips for image-to-video sampling, and how faithfully samples keep them.

    # frame 0 of the first 4 clips (as eval.py reads them: centred clip, resized) + captions
    python -m vidgen.tools.first_frames extract --shards data/synthetic/val --num 4 \
        --frames 9 --height 64 --width 64 --out outputs/demo/i2v_frames
    # -> 000.png ... 003.png, captions.txt, and sample_args.txt: the vidgen.sample arguments
    #    'prompt=[...]' and 'image=[...]', one per line, for `xargs -d '\n' -a sample_args.txt`
    python -m vidgen.tools.first_frames psnr --samples outputs/demo/samples_i2v
    # -> per sample mp4: PSNR of its frame 0 against the image its sidecar .json names

The PSNR is of the decoded mp4 (what a viewer sees, after the video codec), on [0, 1].
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vidgen.data.pipeline import build_video_dataset
from vidgen.data.video import decode_frames
from vidgen.metrics.frames import psnr_per_frame


def extract(shards: str, num: int, frames: int, height: int, width: int, out: Path) -> list[Path]:
    """Write frame 0 of the first ``num`` clips as PNGs, their captions and sample arguments."""
    dataset = build_video_dataset(shards, mode="video", num_frames=frames, height=height, width=width,
                                  batch_size=1, resampled=False, deterministic=True, rank=0, world_size=1)
    out.mkdir(parents=True, exist_ok=True)
    paths, captions = [], []
    for batch in dataset:
        if len(paths) == num:
            break
        frame = ((batch["video"][0, :, 0].clamp(-1, 1) + 1) * 127.5).round().byte()
        path = out / f"{len(paths):03d}.png"
        Image.fromarray(frame.permute(1, 2, 0).numpy()).save(path)
        paths.append(path.resolve())
        captions.append(str(batch["caption"][0]))
    if len(paths) < num:
        raise ValueError(f"{shards} holds {len(paths)} clips of {frames} frames, fewer than --num {num}")
    bad = [c for c in captions if "," in c or "]" in c]
    if bad:
        raise ValueError(f"captions with ',' or ']' do not fit a Hydra list: {bad[:2]}")
    (out / "captions.txt").write_text("".join(c + "\n" for c in captions))
    (out / "sample_args.txt").write_text(
        f"prompt=[{','.join(captions)}]\nimage=[{','.join(str(p) for p in paths)}]\n"
    )
    return paths


def first_frame_psnr(samples: Path) -> list[tuple[str, float]]:
    """(mp4 name, PSNR in dB of its frame 0 against its conditioning image) per sample."""
    rows = []
    for mp4 in sorted(samples.glob("*.mp4")):
        sidecar = json.loads(mp4.with_suffix(".json").read_text())
        if "image" not in sidecar:
            raise ValueError(f"{mp4.with_suffix('.json')} names no image: not an image-to-video sample")
        frame = decode_frames(mp4.read_bytes(), [0])[0]
        image = np.asarray(Image.open(sidecar["image"]).convert("RGB"))
        if image.shape != frame.shape:
            raise ValueError(f"{mp4.name}: frame {frame.shape} vs image {image.shape}")
        as01 = [torch.from_numpy(a.copy()).permute(2, 0, 1)[None, :, None].double() / 255 for a in (frame, image)]
        rows.append((mp4.name, float(psnr_per_frame(*as01)[0, 0])))
    if not rows:
        raise ValueError(f"no .mp4 samples in {samples}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", help="write first frames, captions and sample arguments")
    ex.add_argument("--shards", required=True)
    ex.add_argument("--num", type=int, default=4)
    ex.add_argument("--frames", type=int, default=9, help="clip length read (the frame 0 is its first)")
    ex.add_argument("--height", type=int, default=64)
    ex.add_argument("--width", type=int, default=64)
    ex.add_argument("--out", type=Path, required=True)
    ps = sub.add_parser("psnr", help="first-frame PSNR of image-to-video samples")
    ps.add_argument("--samples", type=Path, required=True)
    ps.add_argument("--report", type=Path, default=None,
                    help="an eval.py task=dit_i2v folder: also print its frame-0 / later-frame PSNR")
    ps.add_argument("--baseline", type=Path, default=None,
                    help="another dit_i2v report folder printed the same way (e.g. the DiT at step 0)")
    args = parser.parse_args(argv)
    if args.command == "extract":
        for p in extract(args.shards, args.num, args.frames, args.height, args.width, args.out):
            print(p)
        return
    rows = first_frame_psnr(args.samples)
    for name, value in rows:
        print(f"first-frame PSNR {value:6.2f} dB  {name}")
    print(f"first-frame PSNR against the conditioning frame: mean {np.mean([v for _, v in rows]):.2f} dB "
          f"over {len(rows)} samples")
    for label, folder in (("", args.report), ("baseline ", args.baseline)):
        if folder is None:
            continue
        report = json.loads((folder / "report.json").read_text())
        m, n = report["metrics"], report["protocol"]["num_videos"]
        print(f"{label}{folder}/report.md: over {n} held-out clips, PSNR against the reference "
              f"frame 0 {m['psnr_frame0']:.2f} dB, later frames {m['psnr_later_frames']:.2f} dB, "
              f"SSIM frame 0 {m['ssim_frame0']:.3f}")

if __name__ == "__main__":
    main()
