"""What the video and latent datasets share: epochs, streams, shard order, shuffling, resume.

A stream is one (rank, loader worker). ``ShardStream`` keeps the epoch position in shared
memory (the main process writes it before each epoch, possibly persistent workers read it
when they start), splits a rank's ``batches_per_epoch`` exactly among its workers, seeds
each stream's generators from (seed, rank, worker, epoch), and hands out the stream's
shard URLs:

- ``resampled=True`` (training): endless draws with replacement from the full list, from
  the stream's own generator, so streams are disjoint in distribution and reproducible;
- ``resampled=False`` (validation): shard ``i`` goes to stream ``i mod num_streams``, read
  once in order.

Subclasses implement ``epoch_stream(worker=, num_workers=, epoch=)``: every batch of one
stream's epoch, a pure function of (seed, rank, worker, num_workers, epoch).

Mid-epoch resume is exact. The DataLoader takes batch ``k`` of a pass from worker
``k mod W``; in an epoch started at batch 0 that is batch ``k`` of the epoch, made by
stream ``k mod W``. A pass that starts at batch ``s`` (a run resumed after ``s`` batches of
the epoch) gets its first batch from worker 0, so loader worker ``w`` plays stream
``(w + s) mod W``, regenerates that stream's epoch from its batch 0 and drops the batches
the stream had already made before ``s`` (``resume_plan``). The resumed run then sees
exactly the batches of the uninterrupted one. The price: each worker redoes its share of
the first ``s`` batches (for video, reading and decoding them again), at most one epoch's
data time spread over the workers. Skip counts carried by dropped batches are dropped with
them (the training module restores its own running count from the checkpoint).

``W`` (loader workers, 0 counting as 1) and the world size are part of the streams'
identity: ``EpochDataLoader`` (``vidgen.data.datamodule``) records them in the checkpoint
and warns, naming both values, when a run resumes with different ones.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from itertools import islice

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

log = logging.getLogger(__name__)


def check_context_parallel(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"context_parallel must be an integer >= 1, got {value!r}")
    return value


def dist_rank_world(context_parallel: int = 1) -> tuple[int, int]:
    """(rank, world size) from torch.distributed if initialised, else env RANK/WORLD_SIZE; with
    context parallelism the data-parallel ones: the ``context_parallel`` neighbouring ranks of
    a group read one stream."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if context_parallel < 1 or world % context_parallel:
        raise ValueError(f"context_parallel={context_parallel} must divide the world size {world} "
                         "(trainer.devices x trainer.num_nodes)")
    return rank // context_parallel, world // context_parallel


def shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Streaming shuffle with a buffer of ``size`` items (WebDataset-style)."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset, ABC):
    """Base of the shard-reading datasets (see the module docstring)."""

    def __init__(
        self,
        shards: list[str],
        *,
        resampled: bool,
        batches_per_epoch: int | None,
        seed: int,
        rank: int,
        world_size: int,
        sources: list | None = None,
    ):
        super().__init__()
        if sources is not None and not resampled:
            raise ValueError("sources (a weighted mixture) need resampled=True; a finite pass reads shards")
        if batches_per_epoch is not None and (not resampled or batches_per_epoch < 1):
            raise ValueError(
                f"batches_per_epoch={batches_per_epoch} needs resampled=True and a value >= 1"
            )
        self.shards = shards
        self.sources = sources  # vidgen.data.sources.Source list, or None: one stream of shards
        self.resampled, self.batches_per_epoch = resampled, batches_per_epoch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()  # [epoch, start_batch]

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's streams; ``start_batch`` > 0 resumes mid-epoch: the next pass
        yields the epoch's batches ``start_batch, start_batch + 1, ...`` exactly as a pass
        from batch 0 would have after its first ``start_batch`` batches."""
        if epoch < 0 or start_batch < 0:
            raise ValueError(f"epoch and start_batch must be >= 0, got {epoch}, {start_batch}")
        if self.batches_per_epoch is not None and start_batch > self.batches_per_epoch:
            raise ValueError(f"start_batch={start_batch} > batches_per_epoch={self.batches_per_epoch}")
        if not self.resampled and start_batch:
            raise ValueError(f"a finite pass (resampled=False) always starts at batch 0, got {start_batch}")
        self._position[0], self._position[1] = epoch, start_batch

    def __len__(self) -> int:
        """Batches per epoch for this rank; only defined for resampled epochs."""
        if self.batches_per_epoch is None:
            raise TypeError("length is only known with resampled=True and batches_per_epoch set")
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start_batch = (int(v) for v in self._position.tolist())
        return self.iterate(worker=worker, num_workers=num_workers, epoch=epoch, start_batch=start_batch)

    def iterate(self, *, worker: int = 0, num_workers: int = 1, epoch: int = 0, start_batch: int = 0) -> Iterator[dict]:
        """What loader worker ``worker`` (of ``num_workers``) yields in a pass over epoch
        ``epoch`` that starts at batch ``start_batch``; public so that tests and tools can
        simulate any rank / worker without processes."""
        stream, done = self.resume_plan(worker, num_workers, start_batch)
        share = self.worker_batches(stream, num_workers)
        if share is not None and done >= share:
            return iter(())
        if done:
            log.info("vidgen.data: rank %d worker %d resumes stream %d of epoch %d after batch %d: "
                     "regenerating and dropping its first %d batch(es)",
                     self.rank, worker, stream, epoch, start_batch, done)
        return islice(self.epoch_stream(worker=stream, num_workers=num_workers, epoch=epoch), done, None)

    @abstractmethod
    def epoch_stream(self, *, worker: int, num_workers: int, epoch: int) -> Iterator[dict]:
        """Every batch of stream ``worker`` (rank ``self.rank``) in epoch ``epoch``: batches
        ``worker, worker + num_workers, ...`` of the rank's epoch."""

    @staticmethod
    def resume_plan(worker: int, num_workers: int, start_batch: int) -> tuple[int, int]:
        """(stream that loader ``worker`` plays, batches of it made before ``start_batch``)."""
        stream = (worker + start_batch) % num_workers
        return stream, max(0, -(-(start_batch - stream) // num_workers))  # ceil division

    def worker_batches(self, worker: int, num_workers: int) -> int | None:
        """Stream ``worker``'s share of the rank's epoch (exact split; None = unbounded)."""
        if self.batches_per_epoch is None:
            return None
        per_epoch = self.batches_per_epoch
        return per_epoch // num_workers + (1 if worker < per_epoch % num_workers else 0)

    def stream_seeds(self, worker: int, epoch: int, n: int) -> list[np.random.SeedSequence]:
        """``n`` independent seed sequences for one stream's generators; child ``i`` does
        not depend on ``n``, so a new generator can be added without changing the others."""
        # The trailing 0 stands where earlier versions put the resumed start_batch (0 for an
        # epoch started from its beginning), so streams (and resumed runs) stay the same.
        return np.random.SeedSequence([self.seed, self.rank, worker, epoch, 0]).spawn(n)

    def assigned_shards(self, worker: int, num_workers: int) -> list[str]:
        """A finite pass's (``resampled=False``) share of the shards for this stream."""
        stream, num_streams = self.rank * num_workers + worker, self.world_size * num_workers
        assigned = self.shards[stream::num_streams]
        if not assigned:
            log.info("vidgen.data: %d shard(s) for %d streams; stream %d has none",
                     len(self.shards), num_streams, stream)
        return assigned

    def stream_urls(self, shard_seed: np.random.SeedSequence, worker: int, num_workers: int) -> Iterator[str]:
        """The stream's shards: endless resampled draws, or its fixed share read once."""
        if not self.resampled:
            yield from self.assigned_shards(worker, num_workers)
            return
        yield from self._draws(shard_seed, self.shards)

    @staticmethod
    def _draws(seed: np.random.SeedSequence, shards) -> Iterator[str]:
        rng = np.random.default_rng(seed)
        while True:
            yield shards[int(rng.integers(len(shards)))]

    def source_seeds(self, shard_seed: np.random.SeedSequence) -> list[np.random.SeedSequence]:
        """One shard-draw seed per source of the mixture (child ``i`` is the same whatever
        the number of sources)."""
        return shard_seed.spawn(len(self.sources))

    def mixed(self, shard_seed: np.random.SeedSequence, source_seed: np.random.SeedSequence,
              samples_of) -> Iterator:
        """A mixture's samples: ``samples_of(urls, source)`` is one source's sample stream
        over its own endless shard draws; each sample comes from a source drawn by weight."""
        from vidgen.data.sources import mix

        streams = [samples_of(self.source_urls(ss, src), src)
                   for src, ss in zip(self.sources, self.source_seeds(shard_seed))]
        return (s for _, s in mix(streams, [src.weight for src in self.sources],
                                  np.random.default_rng(source_seed)))

    def source_urls(self, seed: np.random.SeedSequence, source) -> Iterator[str]:
        """A mixture source's endless shard draws (with replacement, from its own list)."""
        return self._draws(seed, source.shards)
