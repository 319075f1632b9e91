"""WebDataset shards of videos: writing them, and finding them from a pattern.

A sample is three tar members sharing a key::

    {key}.mp4    the encoded video
    {key}.txt    the caption (UTF-8)
    {key}.json   num_frames, fps, height, width, duration (+ source info)

The JSON holds everything bucketing needs, so the loader never decodes a video to
decide whether, or where, it fits.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import braceexpand
import webdataset as wds

REQUIRED_META = ("num_frames", "fps", "height", "width", "duration")
REQUIRED_IMAGE_META = ("height", "width")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # shard members that hold an image (img2dataset: jpg)
# WebDataset splits a member name at the first dot of its basename: keys must not
# contain dots (or slashes, which would make directories inside the tar).
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


def make_key(index: int, name: str = "") -> str:
    """A valid, unique sample key: zero-padded index plus a sanitised readable name."""
    stem = re.sub(r"[^A-Za-z0-9_\-]+", "_", name).strip("_")[:64]
    return f"{index:09d}_{stem}" if stem else f"{index:09d}"


class VideoShardWriter:
    """Writes samples into ``<out_dir>/<prefix>-%06d.tar``, rolling to a new shard when
    the current one holds ``max_samples`` samples or would exceed ``max_bytes``.

    Each shard is written under a ``.tmp`` name and renamed when complete, so a crash
    never leaves a truncated shard that looks finished.

    Example::

        with VideoShardWriter("shards/", max_samples=1000) as w:
            w.write("000000001_cat", mp4_bytes, "a cat", probe_video(mp4_bytes))
        w.shards  # ['shards/shard-000000.tar', ...]
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        max_samples: int = 1000,
        max_bytes: int = 1 << 30,
        prefix: str = "shard",
        start_index: int = 0,
    ):
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.prefix = prefix
        self.shards: list[str] = []  # finished shards, in order
        self.num_samples = 0
        self._next_index = start_index
        self._tar: wds.TarWriter | None = None
        self._tmp_path: Path | None = None
        self._count = 0
        self._bytes = 0
        self._keys: set[str] = set()

    # -- shard rolling ---------------------------------------------------------------

    def _open_next(self) -> None:
        self._finish_current()
        final = self.out_dir / f"{self.prefix}-{self._next_index:06d}.tar"
        self._next_index += 1
        self._tmp_path = final.with_name(final.name + ".tmp")
        # A fixed integer mtime: byte-identical shards for the same samples, and plain
        # ustar headers (a float mtime adds a PAX header to every member).
        self._tar = wds.TarWriter(str(self._tmp_path), encoder=False, mtime=0)
        self._count = 0
        self._bytes = 0

    def _finish_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self._tmp_path.with_name(self._tmp_path.name[: -len(".tmp")])
        os.replace(self._tmp_path, final)
        self.shards.append(str(final))
        self._tar = None
        self._tmp_path = None

    # -- public API ------------------------------------------------------------------

    def write(self, key: str, mp4: bytes, caption: str, meta: dict, ext: str = "mp4") -> None:
        """Add one sample. ``meta`` must hold at least ``REQUIRED_META`` (an image, ``ext``
        one of ``IMAGE_EXTS``: ``REQUIRED_IMAGE_META``); the media member is ``{key}.{ext}``."""
        if not _KEY_OK.match(key):
            raise ValueError(f"invalid sample key {key!r}: use letters, digits, '_' or '-' only")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        required = REQUIRED_IMAGE_META if ext in IMAGE_EXTS else REQUIRED_META
        missing = [k for k in required if k not in meta]
        if missing:
            raise ValueError(f"meta for {key!r} lacks {missing}; required: {list(required)}")
        sample = {
            "__key__": key,
            ext: bytes(mp4),
            "txt": caption.encode("utf-8"),
            "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
        }
        size = sum(len(v) for k, v in sample.items() if k != "__key__")
        full = self._count >= self.max_samples or (
            self._count > 0 and self._bytes + size > self.max_bytes
        )
        if self._tar is None or full:
            self._open_next()
        self._tar.write(sample)
        self._keys.add(key)
        self._count += 1
        self._bytes += size
        self.num_samples += 1

    def close(self) -> list[str]:
        """Finish the last shard; returns all shard paths written."""
        self._finish_current()
        return self.shards

    def __enter__(self) -> VideoShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            # Keep the partial shard as .tmp for inspection; never publish it.
            self._tar.close()
            self._tar = None


# --------------------------------------------------------------------------------------
# Finding shards
# --------------------------------------------------------------------------------------

_REMOTE = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.\-]*://)")
_GLOB_CHARS = re.compile(r"[*?\[]")


def _expand_one(item: str) -> tuple[list[str], list[str]]:
    """Expand one brace-expanded piece. Returns (found paths, missing explicit paths)."""
    if _REMOTE.match(item) and not item.startswith("file://"):
        return [item], []  # remote URL: cannot be checked here; the loader will open it
    item = re.sub(r"^file://", "", item)
    if os.path.isdir(item):
        return sorted(glob.glob(os.path.join(item, "*.tar"))), []
    if _GLOB_CHARS.search(item):
        return sorted(glob.glob(item)), []
    return ([item], []) if os.path.isfile(item) else ([], [item])


def expand_shards(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Turn a shard spec into a list of shard paths/URLs.

    Accepts brace ranges (``shards/{00000..00009}.tar``), globs (``shards/*.tar``),
    directories (all their ``*.tar``), remote URLs (``pipe:...``, ``s3://...``, passed
    through), and lists of any of these. Order is kept; duplicates are dropped.

    Raises:
        FileNotFoundError: nothing matches, or an explicitly named file is missing
            (the error names the pattern and the first missing paths).
    """
    items: Iterable = (
        [pattern] if isinstance(pattern, (str, os.PathLike)) else list(pattern)
    )
    found: list[str] = []
    missing: list[str] = []
    for item in items:
        for piece in braceexpand.braceexpand(os.fspath(item)):
            got, lost = _expand_one(piece)
            found.extend(got)
            missing.extend(lost)
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"shard pattern {pattern!r}: {len(missing)} named shard(s) do not exist: {shown}"
        )
    if not found:
        raise FileNotFoundError(
            f"shard pattern {pattern!r} matches no shards (expected .tar files, a "
            "directory of them, a glob or a brace range like shards/{00000..00009}.tar)"
        )
    return list(dict.fromkeys(found))
