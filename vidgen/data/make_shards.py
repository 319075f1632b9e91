"""Turn a folder or list of captioned videos and images into WebDataset shards.

    python -m vidgen.data.make_shards --src videos/ --out shards/
    python -m vidgen.data.make_shards --src list.csv --out shards/ --shard-size 500 \\
        --min-frames 17 --reencode --fps 16 --max-side 512 --keyint 16 --workers 8

Sources:
  folder   every video and image under it (recursively); caption from ``<name>.txt`` next to it
  .csv     columns ``path`` (or ``video`` / ``image``) and ``caption``
  .jsonl   one object per line with ``path`` (or ``video`` / ``image``) and ``caption``
Relative paths in a list are resolved against the list file's folder.

Images (.jpg, .jpeg, .png, .webp; other formats PIL reads, e.g. .bmp, are stored as PNG)
become ``{key}.jpg|png|webp`` samples with ``{"height", "width", "num_frames": 1,
"image": true}`` metadata, the layout img2dataset writes; the loader decodes them in its
workers and puts them in 1-frame buckets. ``--min-frames`` applies to videos only; with
``--reencode`` an image larger than ``--max-side`` is downscaled and stored as JPEG
(quality 95), other images are stored unchanged.

Every video is probed (decord); videos with no caption, unreadable ones and ones shorter
than ``--min-frames`` are skipped with their reason. ``--reencode`` rewrites each video
as H.264 (yuv420p) with a keyframe every ``--keyint`` frames (default: one per second),
optionally at ``--fps`` (frames dropped or repeated) and at most ``--max-side`` pixels on
the long side. Without it the original bytes are stored unchanged (the ``.mp4`` member
then holds whatever container the source used; decord reads it by content).

Writes ``<out>/shard-%06d.tar`` and ``<out>/summary.json`` (written / skipped counts by
reason, skipped files with details, shard list).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from vidgen.data.shards import VideoShardWriter, make_key
from vidgen.data.video import Mp4Writer, fit_within, open_video, probe_video, resize_frames

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
_STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # kept byte for byte
SKIP_REASONS = ("no_caption", "unreadable", "too_short")
_DECODE_CHUNK = 32  # frames decoded at once while re-encoding (bounds memory)


@dataclass
class Item:
    """One source video: absolute path, caption (None if missing), name for keys/info."""

    index: int
    path: str
    caption: str | None
    name: str


@dataclass
class Options:
    min_frames: int = 1
    reencode: bool = False
    fps: float | None = None
    max_side: int | None = None
    keyint: int | None = None
    crf: int = 20


# --------------------------------------------------------------------------------------
# Listing sources
# --------------------------------------------------------------------------------------


def _row_path(row: dict, where: str) -> str:
    for column in ("path", "video", "image"):
        if row.get(column):
            return str(row[column])
    raise ValueError(f"{where}: no 'path', 'video' or 'image' value (keys: {sorted(row)})")


def _resolve(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else base / p)


def list_sources(src: str | Path) -> list[Item]:
    """The videos and captions of a folder, .csv or .jsonl source, in a stable order."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"--src {str(src)!r} does not exist (expected a folder, a .csv or a .jsonl)")
    rows: list[tuple[str, str | None, str]] = []  # (path, caption, name)
    if src.is_dir():
        media = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS
        for video in sorted(p for p in src.rglob("*") if p.suffix.lower() in media and p.is_file()):
            sidecar = video.with_suffix(".txt")
            caption = sidecar.read_text(encoding="utf-8") if sidecar.is_file() else None
            rows.append((str(video), caption, str(video.relative_to(src))))
    elif src.suffix.lower() == ".csv":
        with open(src, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if not {"path", "video", "image"} & set(columns) or "caption" not in columns:
                raise ValueError(f"{src}: need a 'path' (or 'video' / 'image') and a 'caption' column, found {columns}")
            for line, row in enumerate(reader, start=2):
                path = _row_path(row, f"{src}:{line}")
                rows.append((_resolve(path, src.parent), row.get("caption"), path))
    elif src.suffix.lower() == ".jsonl":
        with open(src, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{src}:{line}: not valid JSON ({err})") from err
                if not isinstance(row, dict):
                    raise ValueError(f"{src}:{line}: expected a JSON object, got {type(row).__name__}")
                path = _row_path(row, f"{src}:{line}")
                caption = row.get("caption")
                rows.append((_resolve(path, src.parent), None if caption is None else str(caption), path))
    else:
        raise ValueError(f"--src {str(src)!r} is a file but not a .csv or .jsonl list")
    return [Item(i, path, caption, name) for i, (path, caption, name) in enumerate(rows)]


# --------------------------------------------------------------------------------------
# Processing one video (runs in worker processes)
# --------------------------------------------------------------------------------------


def _reencode(path: str, info: dict, opts: Options) -> bytes:
    """Decode ``path`` in chunks and write H.264 at the requested fps / size."""
    vr = open_video(path)
    n_src, fps_src = info["num_frames"], info["fps"]
    fps = opts.fps or fps_src
    step = fps_src / fps
    # Frame k of the output shows source frame round(k * step), never past the end.
    n_out = int((n_src - 1) // step) + 1
    indices = [min(n_src - 1, int(k * step + 0.5)) for k in range(n_out)]
    height, width = fit_within(info["height"], info["width"], opts.max_side)
    keyint = opts.keyint or max(1, round(fps))
    buf = io.BytesIO()
    with Mp4Writer(buf, fps=fps, height=height, width=width, crf=opts.crf, keyint=keyint) as writer:
        for i in range(0, n_out, _DECODE_CHUNK):
            frames = vr.get_batch(indices[i : i + _DECODE_CHUNK]).asnumpy()
            writer.write(resize_frames(frames, height, width))
    return buf.getvalue()


def _image_bytes(path: str, opts: Options) -> tuple[bytes, str, dict, dict]:
    """(stored bytes, member extension, stored size, source size) of one image."""
    from PIL import Image

    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # a truncated or corrupt file fails here
        source = dict(height=im.height, width=im.width)
        ext = _STORED_FORMATS.get(im.format)
        scale = opts.max_side / max(im.height, im.width) if opts.reencode and opts.max_side else 1.0
        height, width = max(1, round(im.height * min(scale, 1.0))), max(1, round(im.width * min(scale, 1.0)))
        if (height, width) != (im.height, im.width):
            buf = io.BytesIO()
            im.convert("RGB").resize((width, height), Image.Resampling.LANCZOS).save(buf, "JPEG", quality=95)
            return buf.getvalue(), "jpg", dict(height=height, width=width), source
        if ext is None:  # a format the loader's members do not name: store it as PNG
            buf = io.BytesIO()
            im.save(buf, "PNG")
            data, ext = buf.getvalue(), "png"
    return data, ext, dict(source), source


def _process_image(item: Item, opts: Options) -> dict:
    try:
        data, ext, size, source = _image_bytes(item.path, opts)
    except Exception as err:  # noqa: BLE001 - PIL/OS errors all mean "unreadable"
        return dict(item=item, status="unreadable", detail=f"{type(err).__name__}: {err}")
    meta = dict(size, num_frames=1, image=True, source=item.name, source_height=source["height"],
                source_width=source["width"], reencoded=size != source)
    return dict(item=item, status="ok", mp4=data, ext=ext, meta=meta)


def process_item(item: Item, opts: Options) -> dict:
    """-> ``{"item", "status": "ok", "mp4", "ext", "meta"}`` (``mp4``: the stored media bytes)
    or ``{"item", "status": reason, "detail"}``."""
    if item.caption is None or not item.caption.strip():
        return dict(item=item, status="no_caption", detail="no caption (sidecar .txt missing/empty or empty field)")
    if Path(item.path).suffix.lower() in IMAGE_EXTENSIONS:
        return _process_image(item, opts)
    try:
        source = probe_video(item.path)
        if opts.reencode:
            mp4 = _reencode(item.path, source, opts)
            info = probe_video(mp4)  # the stored bytes are the truth
        else:
            mp4 = Path(item.path).read_bytes()
            info = source
    except Exception as err:  # noqa: BLE001 - decord/av/OS errors all mean "unreadable"
        return dict(item=item, status="unreadable", detail=f"{type(err).__name__}: {err}")
    if info["num_frames"] < opts.min_frames:
        return dict(
            item=item, status="too_short",
            detail=f"{info['num_frames']} frames < --min-frames {opts.min_frames}",
        )
    meta = dict(
        info,
        source=item.name,
        source_num_frames=source["num_frames"],
        source_fps=source["fps"],
        source_height=source["height"],
        source_width=source["width"],
        reencoded=opts.reencode,
    )
    return dict(item=item, status="ok", mp4=mp4, ext="mp4", meta=meta)


def _process_star(args: tuple[Item, Options]) -> dict:
    return process_item(*args)


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def make_shards(
    src: str | Path,
    out: str | Path,
    *,
    shard_size: int = 1000,
    max_shard_bytes: int = 1 << 30,
    min_frames: int = 1,
    reencode: bool = False,
    fps: float | None = None,
    max_side: int | None = None,
    keyint: int | None = None,
    crf: int = 20,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Shard a video source; returns the summary (also written to ``<out>/summary.json``)."""
    if not reencode and (fps is not None or max_side is not None or keyint is not None):
        raise ValueError("--fps, --max-side and --keyint need --reencode")
    if min_frames < 1 or workers < 1 or shard_size < 1:
        raise ValueError(f"need min_frames, workers, shard_size >= 1; got {min_frames}, {workers}, {shard_size}")
    if (fps is not None and fps <= 0) or (max_side is not None and max_side < 2):
        raise ValueError(f"need fps > 0 and max_side >= 2; got fps={fps}, max_side={max_side}")
    items = list_sources(src)
    out = Path(out)
    existing = sorted(out.glob("shard-*.tar"))
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds shards ({existing[0].name}, ...); pass --overwrite to replace them")
    for path in existing:
        path.unlink()

    opts = Options(min_frames, reencode, fps, max_side, keyint, crf)
    counts: Counter = Counter()
    skipped_files: list[dict] = []
    total_frames, total_duration = 0, 0.0
    start = time.perf_counter()

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]shards[/]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.description}"), disable=not progress,
    )
    # "spawn": a forked child of a process that already ran decord/torch threads can
    # deadlock on a lock held at fork time (seen with pytest); fresh interpreters cannot.
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        results = (
            pool.imap(_process_star, ((item, opts) for item in items), chunksize=1)
            if pool is not None
            else (process_item(item, opts) for item in items)
        )
        with bar, VideoShardWriter(out, max_samples=shard_size, max_bytes=max_shard_bytes) as writer:
            task = bar.add_task("", total=len(items))
            for result in results:  # imap keeps source order: the shards are reproducible
                item: Item = result["item"]
                if result["status"] == "ok":
                    writer.write(make_key(item.index, Path(item.name).stem), result["mp4"], item.caption.strip(),
                                 result["meta"], ext=result["ext"])
                    total_frames += result["meta"]["num_frames"]
                    total_duration += result["meta"].get("duration", 0.0)
                    counts["written"] += 1
                    counts["images"] += result["meta"].get("image", False)
                else:
                    counts[result["status"]] += 1
                    skipped_files.append(dict(path=item.path, reason=result["status"], detail=result["detail"]))
                skipped = sum(counts[r] for r in SKIP_REASONS)
                bar.update(task, advance=1, description=f"written {counts['written']}, skipped {skipped}")
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    summary = dict(
        src=str(src),
        out=str(out),
        found=len(items),
        written=counts["written"],
        images=counts["images"],
        skipped={r: counts[r] for r in SKIP_REASONS},
        skipped_total=sum(counts[r] for r in SKIP_REASONS),
        shards=[Path(s).name for s in writer.shards],
        total_frames=total_frames,
        total_duration_s=round(total_duration, 3),
        elapsed_s=round(time.perf_counter() - start, 3),
        options=asdict(opts),
        skipped_files=skipped_files,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="make_shards summary")
    table.add_column("outcome")
    table.add_column("videos", justify="right")
    table.add_row("written", str(summary["written"]))
    table.add_row("  of which images", str(summary["images"]))
    for reason, n in summary["skipped"].items():
        table.add_row(f"skipped: {reason}", str(n))
    table.add_row("shards", str(len(summary["shards"])))
    table.add_row("frames written", str(summary["total_frames"]))
    console = Console()
    console.print(f"{summary['src']} -> {summary['out']}: {summary['found']} video(s) found")
    console.print(table)
    console.print(f"details in {Path(summary['out']) / 'summary.json'} ({summary['elapsed_s']:.1f}s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vidgen.data.make_shards",
        description="Write captioned videos and images from a folder, .csv or .jsonl into WebDataset shards.",
    )
    parser.add_argument("--src", required=True,
                        help="folder of videos/images + <name>.txt captions, or a .csv/.jsonl list")
    parser.add_argument("--out", required=True, help="output folder for shard-%%06d.tar and summary.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="max videos per shard")
    parser.add_argument("--max-shard-bytes", type=int, default=1 << 30, help="max bytes per shard")
    parser.add_argument("--min-frames", type=int, default=1, help="skip videos with fewer frames")
    parser.add_argument("--reencode", action="store_true", help="re-encode to H.264 with regular keyframes")
    parser.add_argument("--fps", type=float, default=None, help="with --reencode: output frame rate")
    parser.add_argument("--max-side", type=int, default=None, help="with --reencode: max long side in pixels")
    parser.add_argument("--keyint", type=int, default=None, help="with --reencode: keyframe interval (default 1 s)")
    parser.add_argument("--crf", type=int, default=20, help="with --reencode: x264 quality (lower is better)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards in --out")
    args = parser.parse_args(argv)
    try:
        summary = make_shards(
            args.src, args.out, shard_size=args.shard_size, max_shard_bytes=args.max_shard_bytes,
            min_frames=args.min_frames, reencode=args.reencode, fps=args.fps, max_side=args.max_side,
            keyint=args.keyint, crf=args.crf, workers=args.workers, overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        parser.error(str(err))
    print_summary(summary)


if __name__ == "__main__":
    main()
