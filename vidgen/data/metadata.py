"""A video sample's stream facts (num_frames, fps, height, width, duration), wherever its
shard keeps them.

Shards written by ``make_shards`` hold them at the top level of ``{key}.json``. Shards
written by video2dataset do not: its ``{key}.json`` has ``url``, ``key``, ``status``,
``caption`` and, when its ffprobe subsampler ran, ``video_metadata`` (ffprobe's
``-show_format -show_streams`` JSON). ``stream_facts`` takes the facts from the first of:

1. the top-level keys (``"shard"``);
2. ``video_metadata``: the first stream with ``codec_type == "video"``: ``width``,
   ``height``, ``avg_frame_rate`` (else ``r_frame_rate``), ``nb_frames`` (else duration x
   fps), the stream's ``duration`` (else the format's) (``"ffprobe"``);
3. the video itself, opened with decord and its first frame decoded (``"probed"``; the
   loader counts these as ``probed_meta``, since each costs a video open in the worker).

Images (img2dataset's ``{key}.jpg|png|webp`` with ``width`` / ``height`` in its JSON) get
``image_facts``: the size from the JSON, else from the image header (``"probed"``), and
``num_frames = 1``.
"""

from __future__ import annotations

import math
from fractions import Fraction

from vidgen.data.video import probe_image, probe_video

FACTS = ("num_frames", "fps", "height", "width")
IMAGE_FACTS = ("height", "width")


class BadMetadata(ValueError):
    """The sample's metadata is not usable (names what is wrong)."""


def _rate(value) -> float | None:
    """ffprobe's "30000/1001" (or a number) as a float; None for missing or 0/0."""
    if value in (None, "", "0/0"):
        return None
    try:
        rate = float(Fraction(str(value)))
    except (ValueError, ZeroDivisionError):
        return None
    return rate if math.isfinite(rate) and rate > 0 else None


def ffprobe_facts(video_metadata: dict) -> dict | None:
    """The facts from ffprobe JSON (see the module docstring); None when it lacks them."""
    if not isinstance(video_metadata, dict):
        return None
    streams = [s for s in video_metadata.get("streams") or [] if isinstance(s, dict)]
    video = next((s for s in streams if s.get("codec_type") == "video"), None)
    if video is None:
        return None
    fps = _rate(video.get("avg_frame_rate")) or _rate(video.get("r_frame_rate"))
    try:
        width, height = int(video["width"]), int(video["height"])
        duration = float(video.get("duration") or (video_metadata.get("format") or {}).get("duration") or 0)
        nb_frames = int(video.get("nb_frames") or 0)
    except (KeyError, TypeError, ValueError):
        return None
    if fps is None:
        return None
    num_frames = nb_frames if nb_frames > 0 else int(round(duration * fps))
    if num_frames <= 0 or width <= 0 or height <= 0:
        return None
    return dict(num_frames=num_frames, fps=fps, height=height, width=width,
                duration=duration if duration > 0 else num_frames / fps)


def stream_facts(meta: dict, video: bytes) -> tuple[dict, str]:
    """(``meta`` with the facts filled in, where they came from: "shard", "ffprobe" or
    "probed"). Raises BadMetadata for facts that are present but invalid, and what
    ``probe_video`` raises when the video itself cannot be opened."""
    if not isinstance(meta, dict):
        raise BadMetadata(f"the .json is a {type(meta).__name__}, not an object")
    source = "shard"
    if any(meta.get(k) is None for k in FACTS):
        facts = ffprobe_facts(meta.get("video_metadata"))
        source = "ffprobe"
        if facts is None:
            facts, source = probe_video(video), "probed"
        meta = {**meta, **facts}
    valid = all(isinstance(meta[k], (int, float)) and not isinstance(meta[k], bool)
                and math.isfinite(meta[k]) and meta[k] > 0 for k in FACTS)
    if not valid:
        raise BadMetadata(f"num_frames, fps, height, width must be numbers > 0, got "
                          f"{ {k: meta.get(k) for k in FACTS} }")
    meta.setdefault("duration", meta["num_frames"] / meta["fps"])
    return meta, source


def image_facts(meta: dict, image: bytes) -> tuple[dict, str]:
    """(``meta`` with height, width, num_frames = 1 and image = True, where the size came
    from: "shard" or "probed"). Raises BadMetadata for a size that is present but invalid,
    and what ``probe_image`` raises for bytes that are no image."""
    if not isinstance(meta, dict):
        raise BadMetadata(f"the .json is a {type(meta).__name__}, not an object")
    source = "shard"
    if any(meta.get(k) is None for k in IMAGE_FACTS):
        meta, source = {**meta, **probe_image(image)}, "probed"
    if not all(isinstance(meta[k], int) and not isinstance(meta[k], bool) and meta[k] > 0 for k in IMAGE_FACTS):
        raise BadMetadata(f"height, width must be ints > 0, got { {k: meta.get(k) for k in IMAGE_FACTS} }")
    return {**meta, "num_frames": 1, "image": True}, source
