"""DiT training data: latent shards -> packed sequences, built inside loader workers.

    dm = LatentDataModule(
        train=dict(shards="latents/train", max_tokens=4096, batches_per_epoch=500,
                   cfg_dropout=0.1, schedule=[{"step": 20000, "max_tokens": 8192}]),
        val=dict(shards="latents/val", max_tokens=4096),
        patch_size=(1, 2, 2), num_workers=4, seed=0,
    )

Latent shards are written by ``vidgen.tools.encode_latents`` (format there). Per stream
(one rank x one loader worker)::

    shards ─▶ decode {key}.safetensors ─▶ shuffle ─▶ caption dropout ─▶ bucket filter
           ─▶ PackingBuffer (first-fit decreasing to max_tokens) ─▶ {"packed": PackedBatch, ...}

Timesteps and noise are NOT drawn here: the training step draws them (per sample, from a
generator seeded by step and rank), so they do not depend on the number of workers.

Caption dropout (classifier-free guidance): with probability ``cfg_dropout`` a sample's
text embedding is replaced by the empty-caption embedding stored with the latents
(``empty_caption.safetensors``), the same one sampling uses for the unconditional branch.

Image-to-video latents (``encode_latents i2v=true``; ``latents_info.json`` then holds ``i2v``):
each sample also carries ``cond`` (the stored first-frame latent with the first-frame mask
put in front, ``vidgen.i2v.with_mask``) and, when an image encoder was set, ``image`` tokens.
With probability ``image_dropout`` (drawn independently of the caption's) both become zeros:
the image-unconditional input that image guidance at sampling time uses.

Streams, epochs, resume: ``vidgen.data.streams``, shared with the video pipeline. With
``resampled=True`` each stream draws shards with replacement from its own RNG seeded by
(seed, rank, worker, epoch); ``batches_per_epoch`` batches per rank are split exactly among
the workers, and a run resumed mid-epoch regenerates the epoch's streams and drops the
batches already trained, so it sees exactly the batches of the uninterrupted run.
Validation (``resampled=False``) reads shard ``i`` in loader worker ``i mod workers``, and every
rank reads the whole validation set (sharded forwards and synced metrics need equal batch
counts on all ranks; keep it small).

Schedule (progressive resolution within a run): ``schedule`` lists stages
``{step, buckets, max_tokens}``; a stage applies from training batch ``step`` on (batches
of this rank: one optimizer step each, unless the NaN guard skipped steps), unspecified
keys carry over from the stage before, and stage 0 is the top-level ``buckets`` /
``max_tokens``. Each stream knows the index of every batch it makes (the DataLoader takes
batches from workers round-robin), so the switch happens at exactly that batch, identically
in a resumed run (which replays the same streams). ``buckets`` are the pixel-space buckets the latents were encoded at
("17x256x256", stored in each sample's JSON); null means every bucket.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import lightning as L
import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.utils.data import DataLoader

from vidgen.data.buckets import parse_buckets
from vidgen.data.loader import EpochDataLoader, seed_worker, to_builtin, trained_position
from vidgen.data.packing import PackingBuffer
from vidgen.data.shard_io import ShardReadError, ShardRetry, read_shard, unreadable_summary
from vidgen.data.shards import expand_shards
from vidgen.data.sources import Source, count_sources, parse_sources
from vidgen.data.streams import ShardStream, check_context_parallel, dist_rank_world, shuffled
from vidgen.i2v import drop_condition, with_mask

log = logging.getLogger(__name__)

INFO_NAME = "latents_info.json"
EMPTY_NAME = "empty_caption.safetensors"
FORMAT = "vidgen-latents-v1"
# A resampled stream that cannot make progress stops with an error instead of spinning.
_MAX_EMPTY_SHARDS = 200
_MAX_REJECTED = 10000


# --------------------------------------------------------------------------------------
# The latent shard format (written by vidgen.tools.encode_latents)
# --------------------------------------------------------------------------------------


def encode_sample(
    latent: torch.Tensor,
    text: torch.Tensor,
    cond: torch.Tensor | None = None,
    image: torch.Tensor | None = None,
) -> bytes:
    """The ``{key}.safetensors`` member: latent [C, t, h, w] and text [L, D] (already cast);
    for image-to-video also ``cond`` [C, t, h, w], the normalised latent of the first frame
    followed by zero frames, and ``image`` [Li, Di], the image encoder's tokens of that frame."""
    tensors = {"latent": latent, "text": text, "cond": cond, "image": image}
    return st_save({k: v.contiguous().cpu() for k, v in tensors.items() if v is not None})


def decode_sample(data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of ``encode_sample``: {"latent", "text"[, "cond", "image"]} as float32."""
    return {k: v.float() for k, v in st_load(data).items()}


def load_empty_caption(folder: str | os.PathLike) -> torch.Tensor:
    """[L0, D] float32 embedding of the empty caption stored by encode_latents in ``folder``."""
    path = Path(folder) / EMPTY_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a latent folder written by encode_latents")
    return st_load(path.read_bytes())["text"].float()


# --------------------------------------------------------------------------------------
# Stages (the within-run schedule)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """From training batch ``step`` on: pack to ``max_tokens``, keep only ``buckets`` (None: all)."""

    step: int
    max_tokens: int
    buckets: frozenset[str] | None


def parse_schedule(
    max_tokens: int, buckets: Sequence | None, schedule: Sequence[Mapping] | None
) -> list[Stage]:
    """Stage list from the top-level settings (stage 0) and the ``schedule`` entries."""
    def bucket_set(value):
        return None if value is None else frozenset(str(b) for b in parse_buckets(list(value)))

    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    stages = [Stage(0, max_tokens, bucket_set(buckets))]
    valid, last = {"step", "max_tokens", "buckets"}, -1
    for entry in schedule or []:
        entry = dict(entry)
        if not set(entry) <= valid or "step" not in entry:
            raise ValueError(
                f"schedule entry {entry} must have 'step' and only keys {sorted(valid)}"
            )
        step = int(entry["step"])
        if step <= last:
            raise ValueError(f"schedule steps must increase, got {step} after {last}")
        last = step
        prev = stages.pop() if step == 0 else stages[-1]  # a step-0 entry replaces stage 0
        tokens = int(entry.get("max_tokens", prev.max_tokens))
        if tokens < 1:
            raise ValueError(f"schedule entry {entry}: max_tokens must be >= 1")
        chosen = bucket_set(entry["buckets"]) if "buckets" in entry else prev.buckets
        stages.append(Stage(step, tokens, chosen))
    return stages


def stage_at(stages: Sequence[Stage], batch: int) -> int:
    """Index of the stage that applies to training batch ``batch``."""
    return max(i for i, s in enumerate(stages) if s.step <= batch)


class LatentShardDataset(ShardStream):
    """Packed batches from latent shards; build it through ``LatentDataModule``.

    Yields dicts (use a DataLoader with ``batch_size=None``)::

        packed:      PackedBatch (clean latent tokens, text, grids; t=None)
        stage:       index of the schedule stage it was packed for
        num_skipped: int, unreadable samples this worker skipped since its last batch
    """

    def __init__(
        self,
        shards: list[str],
        *,
        patch_size: Sequence[int],
        stages: list[Stage],
        empty_text: torch.Tensor | None,
        cfg_dropout: float = 0.0,
        shuffle_buffer: int = 256,
        pack_buffer: int = 64,
        min_efficiency: float = 0.9,
        resampled: bool = True,
        batches_per_epoch: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        retry: ShardRetry | None = None,
        sources: list[Source] | None = None,
        i2v: Mapping | None = None,
        image_dropout: float = 0.0,
    ):
        super().__init__(
            shards, resampled=resampled, batches_per_epoch=batches_per_epoch, seed=seed,
            rank=rank, world_size=world_size, sources=sources,
        )
        self.retry = retry or ShardRetry()
        if not 0.0 <= cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1], got {cfg_dropout}")
        if cfg_dropout > 0 and empty_text is None:
            raise ValueError("cfg_dropout > 0 needs the empty-caption embedding (empty_text)")
        if not 0.0 <= image_dropout <= 1.0:
            raise ValueError(f"image_dropout must be in [0, 1], got {image_dropout}")
        if image_dropout > 0 and not i2v:
            raise ValueError(
                f"image_dropout={image_dropout} but these latents carry no image condition "
                "(encode them with encode_latents i2v=true)"
            )
        self.i2v, self.image_dropout = (dict(i2v) if i2v else None), image_dropout
        if len(stages) > 1 and (not resampled or batches_per_epoch is None):
            raise ValueError("a schedule needs resampled=True and batches_per_epoch set")
        self.patch_size, self.stages = tuple(patch_size), stages
        self.empty_text, self.cfg_dropout = empty_text, cfg_dropout
        self.shuffle_buffer, self.pack_buffer, self.min_efficiency = shuffle_buffer, pack_buffer, min_efficiency

    def epoch_stream(self, *, worker: int, num_workers: int, epoch: int) -> Iterator[dict]:
        shard_ss, shuffle_ss, drop_ss, pack_ss, source_ss = self.stream_seeds(worker, epoch, 5)
        self._skipped = 0
        if self.sources is None:
            samples = self._samples(self.stream_urls(shard_ss, worker, num_workers))
        else:  # a weighted mixture: one endless shard stream per source
            samples = self.mixed(shard_ss, source_ss, lambda urls, src: self._samples(urls, src.name))
        if self.resampled and self.shuffle_buffer > 1:
            samples = shuffled(samples, self.shuffle_buffer, np.random.default_rng(shuffle_ss))
        if self.cfg_dropout > 0 or self.image_dropout > 0:
            samples = self._dropout(samples, np.random.default_rng(drop_ss))
        pack_seed = int(pack_ss.generate_state(1)[0])

        if self.batches_per_epoch is None:  # finite pass (validation) or endless, one stage
            yield from self._packed(samples, self.stages[0], pack_seed, final=not self.resampled)
            return
        limit = self.worker_batches(worker, num_workers)
        first = epoch * self.batches_per_epoch + worker  # this stream's batch 0
        k = 0
        while k < limit:
            stage = stage_at(self.stages, first + k * num_workers)
            n = 1
            while k + n < limit and stage_at(self.stages, first + (k + n) * num_workers) == stage:
                n += 1
            packed = self._packed(samples, self.stages[stage], pack_seed + k, final=False)
            for batch in islice(packed, n):
                yield dict(batch, stage=stage)
            k += n

    # -- pieces of the stream ----------------------------------------------------------

    def _packed(self, samples, stage: Stage, seed: int, final: bool) -> Iterator[dict]:
        """Pack the samples of ``stage``'s buckets to its budget (a fresh buffer per stage)."""
        buffer = PackingBuffer(
            self._filter(samples, stage.buckets), self.patch_size, stage.max_tokens,
            buffer_size=self.pack_buffer, min_efficiency=self.min_efficiency, seed=seed,
            drop_last=False,
        )
        for packed in buffer:
            skipped, self._skipped = self._skipped, 0
            yield dict(packed=packed, stage=0, num_skipped=skipped,
                       counts=count_sources(m.get("source") for m in packed.meta))
        if not final:
            raise RuntimeError("the latent stream ended although it is resampled")

    def _filter(self, samples, buckets: frozenset[str] | None) -> Iterator[dict]:
        if buckets is None:
            # Not ``yield from``: it would close the shared sample stream when a stage's
            # packer is dropped, and the next stage would find it ended.
            for s in samples:
                yield s
            return
        rejected, seen = 0, set()
        for s in samples:
            if s["bucket"] in buckets:
                rejected = 0
                yield s
                continue
            rejected += 1
            seen.add(s["bucket"])
            if rejected >= _MAX_REJECTED:
                raise RuntimeError(
                    f"no latent sample of buckets {sorted(buckets)} in {rejected} consecutive "
                    f"samples; the shards hold buckets {sorted(seen)}. Check the stage's buckets."
                )

    def _dropout(self, samples, rng: np.random.Generator) -> Iterator[dict]:
        for s in samples:
            if self.cfg_dropout > 0 and rng.random() < self.cfg_dropout:
                s = dict(s, context=self.empty_text, dropped=True)
            if self.image_dropout > 0 and rng.random() < self.image_dropout:
                cond, image = drop_condition(s["cond"], s.get("image"))
                s = dict(s, cond=cond, image_dropped=True, **({} if image is None else {"image": image}))
            yield s

    def _samples(self, urls: Iterator[str], source: str | None = None) -> Iterator[dict]:
        """Decoded samples {latent [C,t,h,w], context [L,D], key, caption, bucket, source}."""
        empty_run, unreadable = 0, {}
        for url in urls:
            got = 0
            for raw in self._read_shard(url, unreadable):
                key = raw.get("__key__", "?")
                try:
                    tensors = decode_sample(raw["safetensors"])
                    meta = json.loads(raw["json"])
                    caption = raw["txt"].decode("utf-8")
                    sample = dict(latent=tensors["latent"], context=tensors["text"], key=key,
                                  caption=caption, bucket=str(meta.get("bucket")), source=source)
                    sample.update(self._condition(tensors))
                except Exception as exn:  # noqa: BLE001 - any broken member is the same skip
                    self._skipped += 1
                    log.warning("vidgen.data.latents: skipping %s:%s: %s", url, key, exn)
                    continue
                got += 1
                yield sample
            if got:
                empty_run = 0
                unreadable.clear()
            else:
                empty_run += 1
            if self.resampled and empty_run >= _MAX_EMPTY_SHARDS:
                of = f" of source {source!r}" if source else ""
                raise RuntimeError(
                    f"{empty_run} consecutive shard reads{of} gave no usable latent sample "
                    f"({len(self.shards)} shard(s), e.g. {self.shards[0]}). {unreadable_summary(unreadable)}"
                )

    def _condition(self, tensors: dict) -> dict:
        """The I2V inputs of a decoded sample: {cond[, image]} ({} for text-to-video latents)."""
        if self.i2v is None:
            return {}
        if "cond" not in tensors or (self.i2v.get("image_dim") is not None) != ("image" in tensors):
            raise ValueError(f"an image-to-video sample needs 'cond' and, with an image encoder, "
                             f"'image'; it holds {sorted(tensors)}")
        out = dict(cond=with_mask(tensors["cond"], int(self.i2v["temporal"])))
        if "image" in tensors:
            out["image"] = tensors["image"]
        return out

    def _read_shard(self, url: str, unreadable: dict) -> Iterator[dict]:
        """Raw samples of one shard (retried as ``self.retry`` says); an unreadable shard
        is counted, logged and recorded in ``unreadable``."""

        def on_sample_error(exn: Exception) -> bool:
            self._skipped += 1
            log.warning("vidgen.data.latents: %s: %s", url, exn)
            return True

        try:
            yield from read_shard(url, self.retry, on_sample_error=on_sample_error)
        except ShardReadError as exn:
            self._skipped += 1
            unreadable[url] = exn
            log.warning("vidgen.data.latents: skipping %s (unreadable_shard): %s", url, exn)


# --------------------------------------------------------------------------------------
# Dataset-level files and the DataModule
# --------------------------------------------------------------------------------------


def read_latents_info(shards: Sequence[str]) -> dict:
    """``latents_info.json`` of the folders holding ``shards``; they must agree."""
    remote = [s for s in shards if "://" in s and not s.startswith("file://") or s.startswith("pipe:")]
    if remote:
        raise ValueError(
            f"latent shards are read from local or mounted folders (latents_info.json and "
            f"{EMPTY_NAME} sit next to them), got {remote[0]!r}; copy or mount the folder"
        )
    folders = sorted({os.path.dirname(os.path.abspath(s.removeprefix("file://"))) for s in shards})
    infos = []
    for folder in folders:
        path = Path(folder) / INFO_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: latent shards come with it (python -m "
                "vidgen.tools.encode_latents ... out=<folder>)"
            )
        infos.append(dict(json.loads(path.read_text()), folder=folder))
    for other in infos[1:]:
        for key in ("vae_config", "text_encoder", "text_dim", "i2v"):
            if other.get(key) != infos[0].get(key):
                raise ValueError(
                    f"latent folders {infos[0]['folder']} and {other['folder']} disagree on {key}: "
                    "train on latents of one VAE and one text encoder"
                )
    return infos[0]


_TRAIN_KEYS = {"shards", "sources", "max_tokens", "buckets", "schedule", "cfg_dropout", "image_dropout",
               "shuffle_buffer", "pack_buffer", "min_efficiency", "resampled", "batches_per_epoch"}
_VAL_KEYS = {"shards", "max_tokens", "buckets", "pack_buffer", "min_efficiency"}


class LatentDataModule(L.LightningDataModule):
    """Train / val loaders of packed latent sequences (plain kwargs, like VideoDataModule).

    Args:
        train: shards, max_tokens (token budget per packed sequence), buckets (None: all),
            schedule (see module doc), cfg_dropout, image_dropout (I2V latents), shuffle_buffer, pack_buffer (samples held
            for packing), min_efficiency (fill a sequence needs to leave the buffer),
            resampled, batches_per_epoch (per rank).
        val: shards, max_tokens, buckets, pack_buffer, min_efficiency; or None.
        patch_size: the DiT's (pt, ph, pw) patch.
        num_workers, seed, pin_memory, persistent_workers, shard_retry, context_parallel: as in
            VideoDataModule.

    ``info`` (the latents_info.json: VAE, text encoder) and ``empty_text`` (the [L0, D]
    empty-caption embedding) are read at construction; the DiT module uses them.
    """

    def __init__(
        self,
        train: Mapping,
        val: Mapping | None = None,
        patch_size: Sequence[int] = (1, 2, 2),
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        shard_retry: Mapping | None = None,
        context_parallel: int = 1,
    ):
        super().__init__()
        self.shard_retry = ShardRetry.of(to_builtin(shard_retry))
        self.context_parallel = check_context_parallel(context_parallel)
        self.train_kwargs = self._check(to_builtin(train), _TRAIN_KEYS, "train")
        self.val_kwargs = self._check(to_builtin(val), _VAL_KEYS, "val") if val is not None else None
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.num_workers, self.seed, self.pin_memory = num_workers, seed, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self._passes = 0
        k = self.train_kwargs
        self.train_sources = parse_sources(k["sources"], k.get("shards"), "data.train") if k.get("sources") else None
        self.train_shards = ([u for src in self.train_sources for u in src.shards] if self.train_sources
                             else expand_shards(k["shards"]))
        self.info = read_latents_info(self.train_shards)
        self.empty_text = load_empty_caption(self.info["folder"])
        self.stages = parse_schedule(
            self.train_kwargs["max_tokens"], self.train_kwargs.get("buckets"),
            self.train_kwargs.get("schedule"),
        )

    @staticmethod
    def _check(kwargs, valid: set, name: str) -> dict:
        if (not isinstance(kwargs, dict) or "max_tokens" not in kwargs
                or kwargs.get("shards") is None and kwargs.get("sources") is None):
            raise ValueError(f"LatentDataModule({name}=...) needs a dict with 'shards' (or, for training, "
                             "'sources') and 'max_tokens'")
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise ValueError(f"LatentDataModule({name}=...): unknown keys {unknown}; valid: {sorted(valid)}")
        return kwargs

    def _train_position(self) -> tuple[int, int]:
        """(epoch, batches already done in it) for the pass about to start.

        Counted from the batches trained so far (Lightning's total batch progress, restored
        from the checkpoint), not from its epoch counter: both batch-end and epoch-end
        checkpoints then resume the data stream exactly where the uninterrupted run is.
        """
        per_epoch = self.train_kwargs.get("batches_per_epoch")
        trainer = self.trainer
        if trainer is None or per_epoch is None:
            epoch, self._passes = self._passes, self._passes + 1
            return epoch, 0
        return trained_position(trainer, per_epoch)

    def _loader(self, dataset, position_fn) -> DataLoader:
        return EpochDataLoader(
            dataset, position_fn=position_fn, batch_size=None, num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=self.persistent_workers,
            worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataset(self, rank: int | None = None, world_size: int | None = None) -> LatentShardDataset:
        k = self.train_kwargs
        env_rank, env_world = dist_rank_world(self.context_parallel)
        return LatentShardDataset(
            self.train_shards, patch_size=self.patch_size, stages=self.stages,
            empty_text=self.empty_text, cfg_dropout=k.get("cfg_dropout", 0.0),
            shuffle_buffer=k.get("shuffle_buffer", 256), pack_buffer=k.get("pack_buffer", 64),
            min_efficiency=k.get("min_efficiency", 0.9), resampled=k.get("resampled", True),
            batches_per_epoch=k.get("batches_per_epoch"), seed=self.seed,
            rank=env_rank if rank is None else rank,
            world_size=env_world if world_size is None else world_size, retry=self.shard_retry,
            sources=self.train_sources, i2v=self.info.get("i2v"),
            image_dropout=k.get("image_dropout", 0.0),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset(), self._train_position)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_kwargs is None:
            return []
        k = self.val_kwargs
        # Every rank reads the whole (small) validation set: a sharded (FSDP2) forward needs
        # every rank, and sync_dist logging needs every rank to log, so no rank may run out
        # of validation batches before the others. The metrics are then identical on all ranks.
        dataset = LatentShardDataset(
            expand_shards(k["shards"]), patch_size=self.patch_size,
            stages=parse_schedule(k["max_tokens"], k.get("buckets"), None), empty_text=None,
            pack_buffer=k.get("pack_buffer", 64), min_efficiency=k.get("min_efficiency", 0.9),
            resampled=False, seed=self.seed, rank=0, world_size=1, retry=self.shard_retry,
            i2v=read_latents_info(expand_shards(k["shards"])).get("i2v"),
        )
        return self._loader(dataset, lambda: (0, 0))

