"""Shape buckets: which (frames, height, width) a video is trained at.

Everything here reads the shard's JSON metadata alone (never the video).

Eligibility. A video fits a bucket when it has enough source frames for the bucket's
frame count at the requested spacing (``frames_needed``). Spatially every bucket fits:
the clip is resized to cover the bucket and centre-cropped. ``max_aspect_distortion``
(optional) bounds that crop: a bucket is eligible only if its aspect ratio is within
that factor of the video's (1.5 lets a 16:9 video into 4:3 buckets, 1.78 / 1.33 = 1.33,
but not into 1:1 ones, 1.78; 9:16 ones are 3.16 away). A 1-frame bucket ("1x128x128") takes a
single frame of the video, so it fits every video: image buckets mixed with video ones.

Selection, two ways:

- ``draw_bucket`` (training streams): one bucket per sample, drawn from a seeded
  generator among the eligible buckets with probability proportional to their weights
  (``parse_bucket_weights``) renormalised over those buckets. A square 17-frame clip with
  buckets 1x/5x/9x/17x is trained at all four lengths; a 9-frame one only at 1x/5x/9x.
- ``assign_bucket`` (finite passes: validation, ``encode_latents``): one fixed bucket,
  the closest aspect ratio (in log space, so 2:1 and 1:2 are equally far from 1:1),
  then the most frames, then the largest area.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

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


def parse_bucket_weights(weights: Sequence | Mapping | None, buckets: Sequence[Bucket]) -> list[float]:
    """One weight per bucket from ``None`` (uniform), a list parallel to ``buckets``, or a
    mapping ``{"17x64x64": 4, ...}`` naming every bucket. Weights are >= 0 (0 leaves a
    bucket out of the draw) and not all 0; they need not sum to 1."""
    names = [str(b) for b in buckets]
    if weights is None:
        return [1.0] * len(buckets)
    if isinstance(weights, Mapping):
        given = {}
        for key, value in weights.items():
            try:
                bucket = Bucket.parse(key)
            except ValueError as err:
                raise ValueError(f"bucket_weights key {key!r}: {err}") from err
            if bucket not in buckets:
                raise ValueError(f"bucket_weights names bucket {key!r}, which is not in buckets {names}")
            given[bucket] = value
        missing = [str(b) for b in buckets if b not in given]
        if missing:
            raise ValueError(
                f"bucket_weights gives no weight for bucket(s) {missing}; name every bucket of "
                f"{names} (0 leaves one out), or use bucket_weights=null for uniform"
            )
        values = [given[b] for b in buckets]
    elif isinstance(weights, Sequence) and not isinstance(weights, str):
        values = list(weights)
        if len(values) != len(buckets):
            raise ValueError(
                f"bucket_weights has {len(values)} entries {values} for the {len(buckets)} "
                f"buckets {names}: give one weight per bucket, or bucket_weights=null for uniform"
            )
    else:
        raise ValueError(f"bucket_weights must be null, a list or a mapping bucket -> weight, got {weights!r}")
    out = []
    for name, value in zip(names, values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"bucket_weights: weight of bucket {name} must be a finite number >= 0, got {value!r}")
        out.append(float(value))
    if sum(out) <= 0:
        raise ValueError(f"bucket_weights {out} for buckets {names} are all 0: at least one must be > 0")
    return out


def aspect_distortion(bucket: Bucket, height: float, width: float) -> float:
    """How far the bucket's aspect ratio is from a ``height x width`` video's, as a factor
    >= 1 (1: same shape; 2: the crop keeps half of the video's width or height)."""
    ratio = bucket.aspect / (width / height)
    return max(ratio, 1 / ratio)


def eligible_buckets(
    meta: Mapping, buckets: Sequence[Bucket], frame_stride: float = 1,
    max_aspect_distortion: float | None = None,
) -> list[Bucket]:
    """The buckets a video can fill (see the module docstring), in the order given.

    Args:
        meta: at least ``num_frames``, ``height``, ``width`` (the shard JSON).
        frame_stride: source frames between consecutive clip frames (may be fractional
            when resampling to a target fps: ``fps / target_fps``).
        max_aspect_distortion: largest allowed ``aspect_distortion``; None: any.
    """
    num_frames = int(meta["num_frames"])
    fitting = [b for b in buckets if frames_needed(b.frames, frame_stride) <= num_frames]
    if max_aspect_distortion is not None:
        # The small slack keeps equal ratios written differently (64x96 vs 128x192) in.
        fitting = [b for b in fitting
                   if aspect_distortion(b, meta["height"], meta["width"]) <= max_aspect_distortion * (1 + 1e-9)]
    return fitting


def assign_bucket(
    meta: Mapping, buckets: Sequence[Bucket], frame_stride: float = 1,
    max_aspect_distortion: float | None = None,
) -> Bucket | None:
    """The one deterministic bucket for a video, or None if none is eligible.

    Among ``eligible_buckets``: the closest aspect ratio (log-ratio distance), ties broken
    by more frames, then larger area.
    """
    video_log_aspect = math.log(meta["width"] / meta["height"])

    def rank(b: Bucket):
        # Rounded so that equal ratios written differently (64x96 vs 128x192) tie exactly.
        distance = round(abs(math.log(b.aspect) - video_log_aspect), 9)
        return (distance, -b.frames, -(b.height * b.width))

    fitting = eligible_buckets(meta, buckets, frame_stride, max_aspect_distortion)
    return min(fitting, key=rank) if fitting else None


def draw_bucket(
    meta: Mapping, buckets: Sequence[Bucket], weights: Sequence[float], rng: np.random.Generator,
    frame_stride: float = 1, max_aspect_distortion: float | None = None,
) -> Bucket | None:
    """A bucket for one sample, drawn with probability proportional to ``weights`` (parallel
    to ``buckets``) among the eligible buckets with a positive weight; None if there is none.
    Uses exactly one ``rng.random()`` per call that returns a bucket."""
    weight_of = dict(zip(buckets, weights))
    fitting = [b for b in eligible_buckets(meta, buckets, frame_stride, max_aspect_distortion)
               if weight_of[b] > 0]
    if not fitting:
        return None
    if len(fitting) == 1:  # the same draw, without the cumulative sum
        rng.random()
        return fitting[0]
    cumulative = np.cumsum([weight_of[b] for b in fitting])
    i = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return fitting[min(i, len(fitting) - 1)]  # min: guards rounding at the top end
