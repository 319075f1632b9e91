"""The training/validation video stream: shards -> samples -> clips -> bucketed batches.

Everything below runs inside DataLoader workers (``batch_size=None`` in the loader):
each worker reads whole shards, shuffles raw (still encoded) samples, decodes only the
frames it needs with decord (1 thread), and emits batches that never mix buckets::

    shards ─▶ tar samples ─▶ validate + bucket (JSON only) ─▶ shuffle ─▶ decode ─▶ batch

Streams. A stream is one (rank, worker). With ``resampled=True`` every stream draws
shards with replacement from the full list, each from its own RNG seeded by
(seed, rank, worker, epoch), so streams are disjoint in distribution and
reproducible; ``batches_per_epoch`` batches per rank are divided exactly among the
workers, so every rank takes the same number of steps, and a run resumed mid-epoch sees
exactly the batches of the uninterrupted run (``vidgen.data.streams``). With
``resampled=False`` (validation) shard ``i`` goes to stream ``i mod (world_size *
num_workers)``, is read once in order, and clips are centred.

Buckets (``vidgen.data.buckets``). Training streams draw each sample's bucket from the
stream's own generator among the buckets the video can fill (enough frames; aspect ratio
within ``max_aspect_distortion`` when set), weighted by ``bucket_weights`` renormalised
over them; so one video is trained at several lengths and sizes, and 1-frame buckets
("1x128x128") mix single frames of the videos in as images. Finite passes (validation)
take each video's one deterministic bucket (``assign_bucket``).

Bad data never stops the stream: unreadable shards, samples without video, caption or
valid metadata, videos too short for every bucket and undecodable videos are logged,
skipped and counted (``SKIP_REASONS``); each batch reports the skips its worker saw
since its previous batch.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import get_worker_info

from vidgen.data.buckets import (
    Bucket,
    assign_bucket,
    draw_bucket,
    eligible_buckets,
    parse_bucket_weights,
    parse_buckets,
)
from vidgen.data.metadata import BadMetadata, image_facts, stream_facts
from vidgen.data.shard_io import ShardReadError, ShardRetry, read_shard, unreadable_summary
from vidgen.data.shards import IMAGE_EXTS, expand_shards
from vidgen.data.sources import Source, count_sources, parse_sources
from vidgen.data.streams import ShardStream, dist_rank_world, shuffled
from vidgen.data.video import VideoTooShortError, decode_clip, decode_image, resize_crop

log = logging.getLogger(__name__)

SKIP_REASONS = (
    "unreadable_shard",  # shard could not be opened or its tar stream broke (counts 1 per shard)
    "bad_sample",  # malformed tar members (e.g. duplicate names)
    "missing_video",  # no video member ({key}.mp4, .webm, ...) and no image (.jpg, .png, .webp)
    "no_caption",  # no {key}.txt, or an empty one
    "bad_meta",  # {key}.json not a JSON object, or invalid num_frames/fps/height/width
    "too_short",  # fits no bucket at the requested frame spacing (an image: no 1-frame bucket)
    "too_small",  # an image smaller than every 1-frame bucket (images are never upscaled)
    "aspect_mismatch",  # long enough for a bucket, but none within max_aspect_distortion
    "decode_error",  # decord could not decode the chosen frames
)

VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")  # shard members decoded as video (decord)

BATCH_DTYPES = {"float32": torch.float32, "uint8": torch.uint8}

# Resampled streams are infinite: if every shard keeps failing, stop with an error
# instead of spinning forever. Both conditions must hold (see _Health).
_MIN_CONSECUTIVE_FAILURES = 200


@dataclass
class _Sample:
    key: str
    url: str
    media: bytes  # the encoded video, or image when meta["image"]
    caption: str
    meta: dict
    bucket: Bucket
    source: str | None = None  # its source's name, in a mixture
    health: _Health | None = None  # the health check of the sample's source stream


@dataclass
class _SkipCounter:
    """Per-reason skip counts since the last batch was emitted."""

    counts: dict = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    notes: dict = field(default_factory=dict)  # events that cost time but skip nothing

    def add(self, reason: str, where: str, detail: object) -> None:
        self.counts[reason] += 1
        log.warning("vidgen.data: skipping %s (%s): %s", where, reason, detail)

    def note(self, event: str) -> None:
        self.notes[event] = self.notes.get(event, 0) + 1

    def take(self) -> dict:
        taken, self.counts = self.counts, dict.fromkeys(SKIP_REASONS, 0)
        return taken

    def take_notes(self) -> dict:
        taken, self.notes = self.notes, {}
        return taken


class _Health:
    """Raises when a resampled stream cannot make progress: at least
    ``_MIN_CONSECUTIVE_FAILURES`` failures in a row, and every shard failed at least
    once since the last good sample (so one rare good shard is never mistaken for none).
    """

    def __init__(self, num_shards: int, counter: _SkipCounter, source: str | None = None):
        self.num_shards, self.counter, self.source = num_shards, counter, source
        self.failed_urls: set[str] = set()
        self.unreadable: dict[str, ShardReadError] = {}  # since the last good sample
        self.consecutive = 0

    def ok(self) -> None:
        self.failed_urls.clear()
        self.unreadable.clear()
        self.consecutive = 0

    def fail(self, url: str, unreadable: ShardReadError | None = None) -> None:
        self.failed_urls.add(url)
        if unreadable is not None:
            self.unreadable[url] = unreadable
        self.consecutive += 1
        if self.consecutive >= _MIN_CONSECUTIVE_FAILURES and len(self.failed_urls) >= self.num_shards:
            of = f" of source {self.source!r}" if self.source else ""
            raise RuntimeError(
                f"no usable sample in {self.consecutive} attempts across all "
                f"{self.num_shards} shards{of}; skip counts so far: {self.counter.counts}. "
                f"{unreadable_summary(self.unreadable)}"
                "Check the shards and that num_frames/buckets fit the videos."
            )


class VideoShardDataset(ShardStream):
    """Batches of clips from WebDataset video shards; build it with ``build_video_dataset``.

    Yields dicts (already collated; use a DataLoader with ``batch_size=None`` and
    ``collate_fn=keep_batch``)::

        video:       float32 [B, 3, T, H, W] in [-1, 1]   (image mode: T = 1), or with
                     dtype="uint8" the pixels 0..255, channel-last in memory (to_model_range maps them later)
        bucket:      str, the batch's bucket "FxHxW" (one per batch)
        caption:     list[str], length B
        key:         list[str]
        meta:        list[dict]  shard JSON + frame_indices, bucket ("FxHxW"), shard url
        num_skipped: int, samples this worker skipped since its last batch
        skipped:     dict[reason, int], the same broken down by SKIP_REASONS
        counts:      dict[event, int], costly events since its last batch that skipped
                     nothing (``probed_meta``: a video opened to read its metadata)
    """

    def __init__(
        self,
        shards: list[str],
        *,
        mode: str,
        buckets: list[Bucket],
        bucket_weights: list[float] | None,
        max_aspect_distortion: float | None,
        frame_stride: float,
        target_fps: float | None,
        batch_size: int,
        shuffle_buffer: int,
        resampled: bool,
        batches_per_epoch: int | None,
        seed: int,
        deterministic: bool,
        rank: int,
        world_size: int,
        dtype: str = "float32",
        retry: ShardRetry | None = None,
        sources: list[Source] | None = None,
    ):
        super().__init__(
            shards, resampled=resampled, batches_per_epoch=batches_per_epoch, seed=seed,
            rank=rank, world_size=world_size, sources=sources,
        )
        self.dtype = BATCH_DTYPES[dtype]
        self.retry = retry or ShardRetry()
        self.mode = mode
        self.buckets = buckets
        self.bucket_weights = bucket_weights  # None: finite pass, assign_bucket
        self.max_aspect_distortion = max_aspect_distortion
        self.frame_stride = frame_stride
        self.target_fps = target_fps
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.deterministic = deterministic or not resampled

    # -- the stream ----------------------------------------------------------------

    def epoch_stream(self, *, worker: int, num_workers: int, epoch: int) -> Iterator[dict]:
        shard_ss, shuffle_ss, frame_ss, bucket_ss, source_ss = self.stream_seeds(worker, epoch, 5)
        counter = _SkipCounter()
        limit = self.worker_batches(worker, num_workers)
        if limit == 0 or not (self.resampled or self.assigned_shards(worker, num_workers)):
            return
        bucket_rng = np.random.default_rng(bucket_ss)
        if self.sources is None:
            health = _Health(len(self.shards), counter) if self.resampled else None
            urls = self.stream_urls(shard_ss, worker, num_workers)
            samples = self._samples(urls, counter, health, bucket_rng)
        else:  # a weighted mixture: one endless shard stream per source
            samples = self.mixed(shard_ss, source_ss, lambda urls, src: self._samples(
                urls, counter, _Health(len(src.shards), counter, src.name), bucket_rng, src.name))
        if not self.deterministic and self.shuffle_buffer > 1:
            samples = shuffled(samples, self.shuffle_buffer, np.random.default_rng(shuffle_ss))
        batches = self._batches(samples, counter, np.random.default_rng(frame_ss))
        if not self.resampled:
            batches = _with_trailing_skips(batches, counter)

        emitted = 0
        for batch in batches:
            yield batch
            emitted += 1
            if limit is not None and emitted >= limit:
                return
        if emitted == 0:
            log.warning(
                "vidgen.data: rank %d worker %d produced no batch from %d shard(s); skipped: %s",
                self.rank, worker, len(self.shards), counter.counts,
            )

    def _samples(
        self, urls: Iterator[str], counter: _SkipCounter, health: _Health | None, rng: np.random.Generator,
        source: str | None = None,
    ) -> Iterator[_Sample]:
        """Validated, bucketed, still-encoded samples from a sequence of shards."""
        for url in urls:
            for raw in self._read_shard(url, counter, health):
                sample = self._validate(raw, url, counter, rng)
                if sample is not None:
                    sample.source, sample.health = source, health
                    yield sample
                elif health is not None:
                    health.fail(url)

    def _read_shard(self, url: str, counter: _SkipCounter, health: _Health | None) -> Iterator[dict]:
        """Raw samples ``{__key__, mp4, txt, json}`` of one shard (retried as ``self.retry``
        says); a shard that stays unreadable is counted once and skipped."""

        def on_sample_error(exn: Exception) -> bool:
            counter.add("bad_sample", url, exn)
            return True  # keep the rest of the shard

        try:
            yield from read_shard(url, self.retry, on_sample_error=on_sample_error)
        except ShardReadError as exn:
            counter.add("unreadable_shard", url, exn)
            if health is not None:
                health.fail(url, unreadable=exn)

    def _validate(self, raw: dict, url: str, counter: _SkipCounter, rng: np.random.Generator) -> _Sample | None:
        """Check members and metadata, pick the bucket (no decoding; ``rng`` draws it)."""
        key = raw.get("__key__", "?")
        where = f"{url}:{key}"
        video_ext = next((e for e in VIDEO_EXTS if e in raw), None)
        image_ext = None if video_ext else next((e for e in IMAGE_EXTS if e in raw), None)
        if video_ext is None and image_ext is None:
            counter.add("missing_video", where, f"members present: {sorted(k for k in raw if not k.startswith('__'))}")
            return None
        try:
            caption = raw["txt"].decode("utf-8").strip() if "txt" in raw else ""
        except UnicodeDecodeError as exn:
            counter.add("bad_sample", where, f"caption is not UTF-8: {exn}")
            return None
        if not caption:
            counter.add("no_caption", where, "missing or empty .txt")
            return None
        media = raw[video_ext or image_ext]
        facts = stream_facts if video_ext else image_facts
        try:
            meta, source = facts(json.loads(raw["json"]) if "json" in raw else {}, media)
        except (BadMetadata, ValueError, TypeError) as exn:  # JSONDecodeError is a ValueError
            counter.add("bad_meta", where, exn)
            return None
        except (RuntimeError, OSError) as exn:  # no facts in the shard, and the media cannot be opened
            counter.add("decode_error", where, f"probing the {'video' if video_ext else 'image'} "
                        f"for its metadata: {type(exn).__name__}: {exn}")
            return None
        if source == "probed":
            counter.note("probed_meta")
        bucket = self._bucket_for(meta, where, counter, rng)
        return None if bucket is None else _Sample(key, url, media, caption, meta, bucket)

    def _bucket_for(self, meta: dict, where: str, counter: _SkipCounter, rng: np.random.Generator) -> Bucket | None:
        """The sample's bucket (drawn by ``rng`` in training streams), or None, counted."""
        buckets, weights = self.buckets, self.bucket_weights
        image = meta.get("image", False)
        if image:  # 1-frame buckets the image covers without upscaling
            covered = [i for i, b in enumerate(buckets)
                       if b.frames == 1 and b.height <= meta["height"] and b.width <= meta["width"]]
            if not covered:
                if any(b.frames == 1 for b in buckets):
                    smallest = min((b for b in buckets if b.frames == 1), key=lambda b: b.height * b.width)
                    counter.add("too_small", where, f"{meta['width']}x{meta['height']} image; the smallest "
                                f"1-frame bucket is {smallest} (images are not upscaled)")
                else:
                    counter.add("too_short", where, "an image fits only 1-frame buckets (e.g. '1x256x256'); "
                                f"the buckets are {[str(b) for b in buckets]}")
                return None
            buckets = [buckets[i] for i in covered]
            weights = None if weights is None else [weights[i] for i in covered]
        stride, max_distortion = (1 if image else self._stride(meta)), self.max_aspect_distortion
        if weights is None:
            bucket = assign_bucket(meta, buckets, stride, max_distortion)
        else:
            bucket = draw_bucket(meta, buckets, weights, rng, stride, max_distortion)
        if bucket is not None:
            return bucket
        if eligible_buckets(meta, buckets, stride):
            counter.add(
                "aspect_mismatch", where,
                f"{meta['width']}x{meta['height']} {'image' if image else 'video'}; no bucket it fits is "
                f"within max_aspect_distortion={max_distortion:g}",
            )
        else:
            smallest = min(b.frames for b in buckets)
            counter.add(
                "too_short", where,
                f"{meta['num_frames']} frames; smallest bucket needs {smallest} at stride {stride:g}",
            )
        return None

    def _stride(self, meta: dict) -> float:
        return meta["fps"] / self.target_fps if self.target_fps is not None else self.frame_stride

    def _decode_into(self, s: _Sample, rng: np.random.Generator, out: torch.Tensor) -> list[int]:
        """Decode the sample's clip (or image) into ``out`` ([3, T, H, W], in [-1, 1]);
        -> frame indices."""
        if s.meta.get("image"):
            frames, indices = decode_image(s.media), [0]
        else:
            if self.target_fps is not None:
                spacing = dict(target_fps=self.target_fps, fps=s.meta["fps"])
            else:
                spacing = dict(stride=self.frame_stride)
            frames, indices = decode_clip(
                s.media, s.bucket.frames, rng=None if self.deterministic else rng, **spacing
            )
        resize_crop(frames, s.bucket.height, s.bucket.width, out=out)
        return indices

    def _batches(
        self, samples: Iterator[_Sample], counter: _SkipCounter, rng: np.random.Generator
    ) -> Iterator[dict]:
        """Decode and group by bucket; a bucket is emitted when it has batch_size clips."""
        pending: dict[Bucket, _Group] = {}
        for s in samples:
            group = pending.get(s.bucket)
            if group is None:
                group = pending[s.bucket] = _Group(s.bucket, self.batch_size, self.dtype)
            try:
                # Clips go straight into their slot of the batch tensor: no stacking copy.
                indices = self._decode_into(s, rng, group.video[len(group.samples)])
            except VideoTooShortError as exn:  # the real video is shorter than its JSON says
                counter.add("too_short", f"{s.url}:{s.key}", exn)
                ok = False
            except Exception as exn:  # noqa: BLE001 - decord raises several types
                counter.add("decode_error", f"{s.url}:{s.key}", f"{type(exn).__name__}: {exn}")
                ok = False
            else:
                ok = True
            if not ok:
                if s.health is not None:
                    s.health.fail(s.url)
                continue
            if s.health is not None:
                s.health.ok()
            group.samples.append(s)
            group.indices.append(indices)
            if len(group.samples) == self.batch_size:
                yield pending.pop(s.bucket).collate(counter)
        # Finite (validation) streams keep every sample: flush partial batches in a
        # fixed order. Resampled streams never get here before their limit.
        for bucket in sorted(pending):
            if pending[bucket].samples:
                yield pending[bucket].collate(counter)


def keep_batch(batch: dict) -> dict:
    """The DataLoader ``collate_fn`` for the pipeline's batches, which the workers have
    collated already: torch's default (``default_convert``) would only walk every caption
    and metadata dict again, about 80 us per 256px image at batch 8 (bench/bench_data.py)."""
    return batch


def _with_trailing_skips(batches: Iterator[dict], counter: _SkipCounter) -> Iterator[dict]:
    """A finite pass's batches, the last one held back so that skips seen after it (a bad
    final shard) are reported on it instead of being lost."""
    held = None
    for batch in batches:
        if held is not None:
            yield held
        held = batch
    if held is None:
        return
    late, notes = counter.take(), counter.take_notes()
    held["skipped"] = {k: held["skipped"][k] + late[k] for k in late}
    held["num_skipped"] = held["num_skipped"] + sum(late.values())
    held["counts"] = {k: held["counts"].get(k, 0) + notes.get(k, 0) for k in {*held["counts"], *notes}}
    yield held


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised ``[B, 3, T, H, W]`` batch; in a loader worker it lives in shared
    memory (as in torch's default_collate), so handing it to the main process copies nothing.

    A uint8 batch keeps the decoders' channel-last byte order (``[B, T, H, W, 3]`` in
    memory, a permuted view): filling a slot is a plain copy, not the HWC -> CHW transpose
    that took a quarter of the time per 256px image; ``to_model_range`` transposes while it
    converts to float, on the training device (bench/bench_data.py).
    """
    b, c, t, h, w = shape
    stored = (b, t, h, w, c) if dtype == torch.uint8 else shape
    if get_worker_info() is None:
        tensor = torch.empty(stored, dtype=dtype)
    else:
        template = torch.empty(0, dtype=dtype)
        storage = template._typed_storage()._new_shared(math.prod(shape), device="cpu")
        tensor = template.new(storage).resize_(stored)
    return tensor.permute(0, 4, 1, 2, 3) if dtype == torch.uint8 else tensor


class _Group:
    """A batch being filled for one bucket: clips are decoded into ``video`` in place."""

    def __init__(self, bucket: Bucket, batch_size: int, dtype: torch.dtype):
        self.video = _batch_tensor((batch_size, 3, bucket.frames, bucket.height, bucket.width), dtype)
        self.bucket = bucket
        self.samples: list[_Sample] = []
        self.indices: list[list[int]] = []

    def collate(self, counter: _SkipCounter) -> dict:
        n = len(self.samples)
        skipped = counter.take()
        return dict(
            # A partial (last) batch is copied so it does not carry the unused slots.
            video=self.video if n == len(self.video) else self.video[:n].clone(),
            bucket=str(self.bucket),
            caption=[s.caption for s in self.samples],
            key=[s.key for s in self.samples],
            meta=[
                dict(s.meta, frame_indices=indices, bucket=str(self.bucket), shard=s.url)
                for s, indices in zip(self.samples, self.indices)
            ],
            num_skipped=sum(skipped.values()),
            skipped=skipped,
            counts={**counter.take_notes(), **count_sources(s.source for s in self.samples)},
        )


def resolve_buckets(
    *, mode: str, buckets: str | Sequence | None, num_frames: int, height: int, width: int,
    bucket_weights: Sequence | dict | None, resampled: bool,
) -> tuple[list[Bucket], list[float] | None]:
    """The stream's buckets and their draw weights (None: a finite pass, which assigns each
    video one bucket); arguments as in ``build_video_dataset``. Raises ValueError for bad specs."""
    if not resampled and bucket_weights is not None:
        raise ValueError(
            f"bucket_weights={bucket_weights!r} only apply to resampled (training) streams; a finite "
            "pass (resampled=false: validation, encode_latents) puts each video in one fixed bucket"
        )
    bucket_list = parse_buckets(buckets) if buckets is not None else [Bucket(num_frames, height, width)]
    weights = parse_bucket_weights(bucket_weights, bucket_list) if resampled else None
    if mode == "image":
        # One frame per sample: keep each distinct spatial shape once, with the summed weight.
        merged: dict[Bucket, float] = {}
        for i, b in enumerate(bucket_list):
            image = Bucket(1, b.height, b.width)
            merged[image] = merged.get(image, 0.0) + (weights[i] if weights is not None else 0.0)
        bucket_list = list(merged)
        weights = list(merged.values()) if weights is not None else None
    if weights is not None:
        # Zero-weight buckets are never drawn: leave them out (skip reasons then name the rest).
        kept = [i for i, w in enumerate(weights) if w > 0]
        bucket_list, weights = [bucket_list[i] for i in kept], [weights[i] for i in kept]
    return bucket_list, weights


def build_video_dataset(
    shards: str | Sequence[str] | None = None,
    *,
    sources: Sequence[dict] | None = None,
    mode: str = "video",
    num_frames: int = 17,
    height: int = 64,
    width: int = 64,
    buckets: str | Sequence | None = None,
    bucket_weights: Sequence | dict | None = None,
    max_aspect_distortion: float | None = None,
    frame_stride: float = 1,
    target_fps: float | None = None,
    batch_size: int = 2,
    shuffle_buffer: int = 100,
    resampled: bool = True,
    batches_per_epoch: int | None = None,
    seed: int = 0,
    deterministic: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    dtype: str = "float32",
    shard_retry: ShardRetry | dict | None = None,
) -> VideoShardDataset:
    """Build the bucketed video stream (see the module docstring and VideoShardDataset).

    Args:
        shards: pattern(s) for ``expand_shards`` (brace ranges, globs, dirs, lists).
        sources: instead of ``shards``, a weighted mixture for training streams:
            ``[{name, shards, weight}]`` (``vidgen.data.sources``); samples are drawn from
            the sources in proportion to their weights and counted per source.
        mode: "video" (clips of ``num_frames``) or "image" (one random frame, T=1).
        num_frames, height, width: the single bucket used when ``buckets`` is None.
        buckets: e.g. ``["17x64x64", "9x64x112", "1x64x64"]``; in image mode only H, W
            count (buckets of equal H, W merge, their weights add up).
        bucket_weights: training streams' relative bucket frequencies: None (uniform), a
            list parallel to ``buckets``, or a mapping bucket -> weight naming every bucket;
            renormalised per sample over the buckets its video fits (0: never drawn).
            Finite passes (``resampled=False``) take ``assign_bucket``'s bucket instead and
            reject weights.
        max_aspect_distortion: a video is only put in buckets whose aspect ratio is within
            this factor of its own (>= 1; e.g. 1.5); None: any (clips are resize-cropped).
        frame_stride: source frames between clip frames; or give ``target_fps``.
        batch_size: clips per batch (batches never mix buckets).
        shuffle_buffer: raw samples held for shuffling (resampled, non-deterministic).
        resampled: infinite shard resampling (training) vs each shard once (validation).
        batches_per_epoch: batches per rank per epoch (resampled only); None = endless.
        seed: base of every RNG stream (with rank, worker, epoch).
        deterministic: centred clips and no shuffle even when resampled (buckets are still
            drawn, from the stream's seeded generator).
        rank, world_size: override torch.distributed / env RANK, WORLD_SIZE.
        dtype: "float32" (clips in [-1, 1]) or "uint8" (pixels 0..255: a quarter of the
            bytes between worker and trainer; ``vidgen.data.video.to_model_range`` converts
            on the device, as ``VideoDataModule`` does after the batch transfer).
        shard_retry: how often and how patiently a shard that fails to open or read is
            tried again before it is skipped (``vidgen.data.shard_io.ShardRetry`` or a dict
            of its fields; None: its defaults).
    """
    if dtype not in BATCH_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(BATCH_DTYPES)}, got {dtype!r}")
    if mode not in ("video", "image"):
        raise ValueError(f"mode must be 'video' or 'image', got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if target_fps is not None and frame_stride != 1:
        raise ValueError(f"give frame_stride ({frame_stride}) or target_fps ({target_fps}), not both")
    if target_fps is not None and target_fps <= 0:
        raise ValueError(f"target_fps must be > 0, got {target_fps}")
    if frame_stride <= 0:
        raise ValueError(f"frame_stride must be > 0, got {frame_stride}")
    if batches_per_epoch is not None:
        if not resampled:
            raise ValueError("batches_per_epoch only applies to resampled=True (a finite pass has its own length)")
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1 or None, got {batches_per_epoch}")

    if max_aspect_distortion is not None and not max_aspect_distortion >= 1:
        raise ValueError(f"max_aspect_distortion must be >= 1 or None, got {max_aspect_distortion!r}")
    bucket_list, weights = resolve_buckets(
        mode=mode, buckets=buckets, num_frames=num_frames, height=height, width=width,
        bucket_weights=bucket_weights, resampled=resampled,
    )

    env_rank, env_world = dist_rank_world()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")

    if sources is not None and not resampled:
        raise ValueError("sources (a weighted mixture) only apply to resampled training streams; "
                         "a finite pass (validation, encode_latents) reads shards")
    mixture = parse_sources(sources, shards) if sources is not None else None
    return VideoShardDataset(
        [u for src in mixture for u in src.shards] if mixture else expand_shards(shards),
        mode=mode,
        buckets=bucket_list,
        bucket_weights=weights,
        max_aspect_distortion=max_aspect_distortion,
        frame_stride=frame_stride,
        target_fps=target_fps,
        batch_size=batch_size,
        shuffle_buffer=shuffle_buffer,
        resampled=resampled,
        batches_per_epoch=batches_per_epoch,
        seed=seed,
        deterministic=deterministic,
        rank=rank,
        world_size=world_size,
        dtype=dtype,
        retry=ShardRetry.of(shard_retry),
        sources=mixture,
    )
