"""Shape buckets: which (frames, height, width) a video is trained at.

A bucket is chosen from the shard's JSON metadata alone (never by decoding):
among buckets whose frame count fits the video at the requested frame spacing, take
the closest aspect ratio (in log space, so 2:1 and 1:2 are equally far from 1:1),
then the most frames, then the largest area.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from vidgen.data.video import frames_needed


@dataclass(frozen=True, order=True)
class Bucket:
    """A clip shape: ``frames x height x width`` (e.g. ``Bucket(17, 64, 64)``)."""

    frames: int
    height: int
    width: int

    def __post_init__(self):
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Bucket.{name} must be a positive int, got {value!r}")

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @classmethod
    def parse(cls, spec: Bucket | str | Sequence[int] | Mapping) -> Bucket:
        """From ``"17x64x64"``, ``[17, 64, 64]``, ``{"frames":17,"height":64,"width":64}``."""
        if isinstance(spec, Bucket):
            return spec
        if isinstance(spec, str):
            parts = spec.lower().replace(" ", "").split("x")
            if len(parts) != 3 or not all(p.isdigit() for p in parts):
                raise ValueError(f"bucket {spec!r} is not of the form FRAMESxHEIGHTxWIDTH, e.g. '17x64x64'")
            return cls(*(int(p) for p in parts))
        if isinstance(spec, Mapping):
            try:
                return cls(int(spec["frames"]), int(spec["height"]), int(spec["width"]))
            except KeyError as err:
                raise ValueError(f"bucket {dict(spec)!r} needs keys frames, height, width") from err
        if isinstance(spec, Sequence) and len(spec) == 3:
            return cls(*(int(v) for v in spec))
        raise ValueError(
            f"cannot parse bucket {spec!r}: use 'FxHxW', [F, H, W] or a dict with frames/height/width"
        )


def parse_buckets(specs: str | Iterable) -> list[Bucket]:
    """A list of buckets from ``"17x64x64,9x64x96"`` or an iterable of bucket specs."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    buckets = [Bucket.parse(s) for s in specs]
    if not buckets:
        raise ValueError("bucket list is empty")
    if len(set(buckets)) != len(buckets):
        raise ValueError(f"duplicate buckets in {[str(b) for b in buckets]}")
    return buckets


def assign_bucket(meta: Mapping, buckets: Sequence[Bucket], frame_stride: float = 1) -> Bucket | None:
    """Pick the bucket for a video from its metadata, or None if no bucket fits.

    Args:
        meta: at least ``num_frames``, ``height``, ``width`` (the shard JSON).
        buckets: candidate buckets.
        frame_stride: source frames between consecutive clip frames (may be fractional
            when resampling to a target fps: ``fps / target_fps``).

    Returns:
        The bucket whose aspect ratio is closest to the video's (log-ratio distance),
        ties broken by more frames, then larger area; None when every bucket needs
        more frames than the video has.
    """
    num_frames = int(meta["num_frames"])
    video_log_aspect = math.log(meta["width"] / meta["height"])

    def rank(b: Bucket):
        # Rounded so that equal ratios written differently (64x96 vs 128x192) tie exactly.
        distance = round(abs(math.log(b.aspect) - video_log_aspect), 9)
        return (distance, -b.frames, -(b.height * b.width))

    fitting = [b for b in buckets if frames_needed(b.frames, frame_stride) <= num_frames]
    return min(fitting, key=rank) if fitting else None
