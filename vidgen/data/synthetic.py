"""Procedural captioned videos for tests, demos and smoke runs.

Each video is one solid-coloured shape (circle, square, triangle, diamond) moving in a
straight line across a smooth textured background (sinusoidal stripes, a soft
checkerboard, or a gradient), captioned with what is on screen::

    "a red circle moving left to right on a blue striped background"

Content is deliberately low-frequency (1-pixel soft edges, textures with periods of
half the frame or more) so that a tiny VAE can reconstruct it well.

Videos are real H.264 mp4 written through the shard writer into
``<out>/train/shard-*.tar`` and ``<out>/val/shard-*.tar``. Video ``i`` of a split is
drawn from ``default_rng([seed, split_id, i])``: the same seed gives byte-identical
shards, and the validation split never shares a random stream with training.

    python -m vidgen.data.synthetic --out data/synth --num-videos 512 --size 64 --frames 17 --val-videos 64
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from vidgen.data.shards import VideoShardWriter, make_key
from vidgen.data.video import encode_mp4, probe_video

COLOURS = {
    "red": (220, 45, 45),
    "green": (45, 175, 70),
    "blue": (45, 80, 220),
    "yellow": (235, 210, 50),
    "cyan": (50, 200, 215),
    "magenta": (210, 55, 190),
    "orange": (240, 140, 35),
    "purple": (130, 65, 190),
    "white": (240, 240, 240),
}
# Shape colours the generator draws only when asked (``shape_colours``): concepts the default
# data never shows, for fine-tuning (``make demo-lora`` teaches the demo DiT brown shapes).
EXTRA_COLOURS = {"brown": (150, 90, 40)}
ALL_COLOURS = {**COLOURS, **EXTRA_COLOURS}
SHAPES = ("circle", "square", "triangle", "diamond")
# (caption phrase, unit direction in image coordinates: x right, y down)
_D = 1 / np.sqrt(2)
MOTIONS = {
    "left to right": (1.0, 0.0),
    "right to left": (-1.0, 0.0),
    "top to bottom": (0.0, 1.0),
    "bottom to top": (0.0, -1.0),
    "from top left to bottom right": (_D, _D),
    "from bottom right to top left": (-_D, -_D),
    "from top right to bottom left": (-_D, _D),
    "from bottom left to top right": (_D, -_D),
}
BACKGROUNDS = ("striped", "checkered", "gradient")
# The shape's size as a fraction of the frame side (drawn uniformly), and how far the
# background texture darkens its colour at its darkest (1 = flat, no texture). At
# (0.12, 0.18) the demo VAE (4x spatial, trained at 32px) lost the shape in half the
# held-out clips (README: the demo's table of what was tried).
SHAPE_SIZE = (0.2, 0.26)
TEXTURE_DARK = 0.55
SPLITS = {"train": 0, "val": 1}


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def _background(kind: str, colour: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth texture ``[H, W, 3]`` (float, 0..255) blending ``colour`` and a darker tone."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    # One to two periods per frame: coarse enough for an 8x-downsampling VAE.
    period = size * rng.uniform(0.5, 1.0)
    if kind == "striped":
        angle = rng.choice([0.0, np.pi / 2, np.pi / 4, -np.pi / 4])
        u = x * np.cos(angle) + y * np.sin(angle)
        s = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
    elif kind == "checkered":
        px, py = rng.uniform(0, 2 * np.pi, size=2)
        s = 0.5 + 0.5 * np.sin(2 * np.pi * x / period + px) * np.sin(2 * np.pi * y / period + py)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        u = (x - size / 2) * np.cos(angle) + (y - size / 2) * np.sin(angle)
        s = np.clip(u / size + 0.5, 0.0, 1.0)
    else:
        raise ValueError(f"unknown background {kind!r}; choose from {BACKGROUNDS}")
    dark = colour * TEXTURE_DARK
    return colour * (1 - s[..., None]) + dark * s[..., None]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _shape_sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) to a shape of size ``r`` at the origin."""
    if shape == "circle":
        return np.sqrt(dx**2 + dy**2) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - 1.2 * r) / np.sqrt(2)
    if shape == "triangle":
        # Pointing up: the max over the three edge half-planes, inradius h.
        h = 0.6 * r
        c, s = np.sqrt(3) / 2, 0.5
        return np.maximum.reduce([dy, c * dx - s * dy, -c * dx - s * dy]) - h
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def check_shape_colours(shape_colours) -> list[str]:
    """The shape colours to draw from (None: the default palette ``COLOURS``); unknown names
    are an error naming the valid ones."""
    names = list(COLOURS) if shape_colours is None else [str(c) for c in shape_colours]
    unknown = [c for c in names if c not in ALL_COLOURS]
    if unknown or not names:
        raise ValueError(f"shape colours {unknown or names}: valid are {', '.join(ALL_COLOURS)}")
    return names


def render_video(
    size: int, frames: int, rng: np.random.Generator, shape_colours=None
) -> tuple[np.ndarray, dict]:
    """One random scene; its shape colour drawn from ``shape_colours`` (None: ``COLOURS``), its
    background colour always from ``COLOURS``.

    Returns:
        (uint8 frames ``[frames, size, size, 3]``, dict with the caption and its parts)
    """
    shape = str(rng.choice(SHAPES))
    colour_name = str(rng.choice(check_shape_colours(shape_colours)))
    bg_colour_name = str(rng.choice([c for c in COLOURS if c not in (colour_name, "white")]))
    motion = str(rng.choice(list(MOTIONS)))
    background = str(rng.choice(BACKGROUNDS))

    bg = _background(background, np.array(COLOURS[bg_colour_name], np.float32), size, rng)

    # A straight path of length `travel` that keeps the whole shape inside the frame.
    r = size * rng.uniform(*SHAPE_SIZE)
    direction = np.array(MOTIONS[motion])
    travel = size * rng.uniform(0.3, 0.5)
    travel = min(travel, 0.99 * (size - 2 * r - 2) / np.abs(direction).max())  # large shapes travel less
    half = np.abs(direction) * travel / 2
    lo, hi = r + 1 + half, size - r - 1 - half
    mid = rng.uniform(lo, hi)
    t = np.linspace(0.0, 1.0, frames)[:, None]
    centres = mid - direction * travel / 2 + t * direction * travel  # [T, 2] as (x, y)

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx = x[None] - centres[:, 0, None, None]
    dy = y[None] - centres[:, 1, None, None]
    # 1-pixel antialiased edge: coverage goes 1 -> 0 as the distance goes -0.5 -> 0.5.
    alpha = np.clip(0.5 - _shape_sdf(shape, dx, dy, r), 0.0, 1.0)[..., None]
    fg = np.array(ALL_COLOURS[colour_name], np.float32)
    video = bg[None] * (1 - alpha) + fg * alpha

    caption = (
        f"{_article(colour_name)} {colour_name} {shape} moving {motion} "
        f"on {_article(bg_colour_name)} {bg_colour_name} {background} background"
    )
    info = dict(
        caption=caption, shape=shape, colour=colour_name, motion=motion,
        background=background, background_colour=bg_colour_name,
    )
    return np.clip(np.round(video), 0, 255).astype(np.uint8), info


# --------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------


def _write_split(out_dir: Path, split: str, count: int, size: int, frames: int, fps: float,
                 seed: int, shard_size: int, shape_colours=None) -> list[str]:
    with VideoShardWriter(out_dir / split, max_samples=shard_size) as writer:
        for i in range(count):
            rng = np.random.default_rng([seed, SPLITS[split], i])
            video, info = render_video(size, frames, rng, shape_colours)
            # One keyframe per second keeps random clip starts cheap to seek to. MB-tree
            # rate control is off because with it this libx264 build gives run-to-run
            # different bitstreams for identical input (seen at 32-64 px); without it the
            # output is byte-identical, which the determinism promise needs.
            mp4 = encode_mp4(video, fps, crf=18, keyint=max(1, round(fps)), x264_params="mbtree=0")
            meta = dict(probe_video(mp4), source="synthetic", split=split, index=i, seed=seed, **info)
            del meta["caption"]
            writer.write(make_key(i, split), mp4, info["caption"], meta)
    return writer.shards


def make_synthetic_dataset(
    out: str | os.PathLike,
    num_videos: int,
    size: int = 64,
    frames: int = 17,
    fps: float = 8,
    val_videos: int = 0,
    seed: int = 0,
    shard_size: int = 100,
    overwrite: bool = False,
    shape_colours=None,
) -> dict:
    """Write ``num_videos`` training and ``val_videos`` validation videos as shards
    (``shape_colours``: the shape colours drawn, None: ``COLOURS``).

    Returns:
        ``{"train": [shard paths], "val": [shard paths]}`` (``val`` empty when
        ``val_videos == 0``); the parameters are also written to ``<out>/info.json``.
    """
    if num_videos < 1 or val_videos < 0:
        raise ValueError(f"need num_videos >= 1 and val_videos >= 0, got {num_videos}, {val_videos}")
    if size < 16 or size % 2:
        raise ValueError(f"size must be even and >= 16 (H.264 yuv420p), got {size}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    check_shape_colours(shape_colours)
    out = Path(out)
    existing = sorted(out.glob("*/shard-*.tar"))
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds shards ({existing[0]}, ...); pass overwrite=True / --overwrite")
    for path in existing:
        path.unlink()

    shards = {
        "train": _write_split(out, "train", num_videos, size, frames, fps, seed, shard_size, shape_colours),
        "val": _write_split(out, "val", val_videos, size, frames, fps, seed, shard_size, shape_colours)
        if val_videos else [],
    }
    params = dict(num_videos=num_videos, val_videos=val_videos, size=size, frames=frames, fps=fps, seed=seed)
    if shape_colours is not None:
        params["shape_colours"] = list(shape_colours)
    (out / "info.json").write_text(json.dumps(dict(params, shards=shards), indent=2))
    return shards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vidgen.data.synthetic",
        description="Write procedurally generated captioned videos as WebDataset shards.",
    )
    parser.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    parser.add_argument("--num-videos", type=int, required=True, help="training videos")
    parser.add_argument("--size", type=int, default=64, help="frame height = width (even)")
    parser.add_argument("--frames", type=int, default=17, help="frames per video")
    parser.add_argument("--fps", type=float, default=8)
    parser.add_argument("--val-videos", type=int, default=0, help="held-out videos (distinct seeds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=100, help="videos per shard")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards in --out")
    parser.add_argument("--shape-colours", nargs="+", default=None, metavar="COLOUR",
                        help=f"shape colours to draw (default: {' '.join(COLOURS)}; also: {' '.join(EXTRA_COLOURS)})")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        shards = make_synthetic_dataset(
            args.out, args.num_videos, args.size, args.frames, args.fps,
            args.val_videos, args.seed, args.shard_size, args.overwrite, args.shape_colours,
        )
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    elapsed = time.perf_counter() - start
    print(
        f"wrote {args.num_videos} train videos in {len(shards['train'])} shard(s) and "
        f"{args.val_videos} val videos in {len(shards['val'])} shard(s) to {args.out} "
        f"in {elapsed:.1f}s"
    )


if __name__ == "__main__":
    main()
