"""LightningDataModule over the WebDataset video stream (plain kwargs; Hydra-friendly).

    dm = VideoDataModule(
        train=dict(shards="data/synth/train", num_frames=17, height=64, width=64,
                   batches_per_epoch=500),
        val=dict(shards="data/synth/val", num_frames=17, height=64, width=64),
        batch_size=8, num_workers=4, seed=0,
    )

Batches are built inside the loader workers (``batch_size=None`` on the DataLoader);
see ``vidgen.data.pipeline`` for the batch format.

Epochs. Before every pass over the training loader the module tells the dataset which
epoch it is and how many of its batches are already trained (through shared memory, so
persistent workers see it too): from the attached Trainer when there is one, else by
counting passes. A run resumed from any checkpoint, including one saved in the middle of an
epoch, continues with exactly the batches the uninterrupted run would have seen: the
workers regenerate the epoch's streams and drop the batches already trained
(``vidgen.data.streams``; for video this decodes them again, at most one epoch's data time).

The streams depend on the loader workers per rank, the world size, ``batches_per_epoch``
and the seed. ``EpochDataLoader`` saves these in the checkpoint (Lightning keeps a loader's
``state_dict`` with the fit loop, which also marks the loader as resumable) and warns, naming
the checkpoint's and the current value, when a run resumes with different ones: it then
continues with the new layout's streams, no longer a replay of the uninterrupted run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import lightning as L
import torch
from torch.utils.data import DataLoader

from vidgen.data.loader import EpochDataLoader, seed_worker, to_builtin, trained_position
from vidgen.data.pipeline import (
    BATCH_DTYPES,
    VideoShardDataset,
    build_video_dataset,
    keep_batch,
    resolve_buckets,
)
from vidgen.data.shard_io import ShardRetry
from vidgen.data.sources import parse_sources
from vidgen.data.streams import check_context_parallel, dist_rank_world
from vidgen.data.video import to_model_range


class VideoDataModule(L.LightningDataModule):
    """Train / val loaders over video shards.

    Args:
        train: kwargs for ``build_video_dataset`` (``shards``, or ``sources`` for a weighted
            mixture ``[{name, shards, weight}]``).
        val: the same for validation (``resampled`` defaults to False), or None.
        batch_size: clips per batch (set here, not inside ``train`` / ``val``).
        num_workers: loader worker processes per rank (decoding happens there).
        context_parallel: neighbouring ranks that read the same batches (they split each
            sequence in the DiT); the streams follow the data-parallel rank and world size.
        seed: base seed of all data RNG streams.
        pin_memory: pin batches for faster host-to-GPU copies.
        persistent_workers: keep workers alive between epochs (when num_workers > 0).
        transfer_dtype: "uint8" ships pixels from the workers and converts them to float32
            in [-1, 1] on the training device after the transfer (a quarter of the bytes
            through shared memory and to the GPU); "float32" converts in the workers. The
            model sees the same values either way (resized frames differ by the uint8
            rounding of the resize).
        shard_retry: retries of a shard that fails to open or read, before it is skipped
            and counted (``vidgen.data.shard_io.ShardRetry`` fields: attempts, backoff,
            max_backoff, timeout).
    """

    def __init__(
        self,
        train: Mapping,
        val: Mapping | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        transfer_dtype: str = "float32",
        shard_retry: Mapping | None = None,
        context_parallel: int = 1,
    ):
        super().__init__()
        self.shard_retry = ShardRetry.of(to_builtin(shard_retry))
        self.context_parallel = check_context_parallel(context_parallel)
        if transfer_dtype not in BATCH_DTYPES:
            raise ValueError(f"transfer_dtype must be one of {sorted(BATCH_DTYPES)}, got {transfer_dtype!r}")
        self.transfer_dtype = transfer_dtype
        self.train_kwargs = self._check_kwargs(to_builtin(train), "train", batch_size, seed)
        self.val_kwargs = self._check_kwargs(to_builtin(val), "val", batch_size, seed) if val is not None else None
        self._check_buckets(self.train_kwargs, "train", resampled=True)
        if self.val_kwargs is not None:
            self._check_buckets(self.val_kwargs, "val", resampled=False)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self._passes = 0  # training passes, used when no Trainer is attached

    @staticmethod
    def _check_kwargs(kwargs: dict, name: str, batch_size: int, seed: int) -> dict:
        if not isinstance(kwargs, dict) or kwargs.get("shards") is None and kwargs.get("sources") is None:
            raise ValueError(f"VideoDataModule({name}=...) needs a dict with 'shards' (or, for training, "
                             f"'sources'), got {kwargs!r}")
        if kwargs.get("sources") is not None:  # bad weights or patterns fail here, at construction
            parse_sources(kwargs["sources"], kwargs.get("shards"), where=f"data.{name}")
        if "dtype" in kwargs:
            raise ValueError(f"set the batch dtype with VideoDataModule(transfer_dtype=...), not {name}.dtype")
        for key, value in (("batch_size", batch_size), ("seed", seed)):
            if key in kwargs and kwargs[key] != value:
                raise ValueError(
                    f"{name}.{key}={kwargs[key]!r} conflicts with VideoDataModule({key}={value!r}); "
                    f"set {key} once, on the data module"
                )
        return {**kwargs, "batch_size": batch_size, "seed": seed}

    @staticmethod
    def _check_buckets(kwargs: dict, name: str, resampled: bool) -> None:
        """Bucket specs and weights fail here, at construction, not when training starts."""
        bound = inspect.signature(build_video_dataset).bind(**{"resampled": resampled, **kwargs})
        bound.apply_defaults()
        args = bound.arguments
        try:
            resolve_buckets(**{k: args[k] for k in inspect.signature(resolve_buckets).parameters})
        except ValueError as err:
            raise ValueError(f"VideoDataModule({name}=...): {err}") from err

    # -- epochs --------------------------------------------------------------------

    def _train_position(self) -> tuple[int, int]:
        """(epoch, batches already done in it) for the pass about to start."""
        trainer = self.trainer
        if trainer is None:
            epoch, self._passes = self._passes, self._passes + 1
            return epoch, 0
        per_epoch = self.train_kwargs.get("batches_per_epoch")
        try:
            if per_epoch is None:
                return trainer.fit_loop.epoch_progress.current.processed, 0
            return trained_position(trainer, per_epoch)
        except AttributeError:  # a Trainer without a fit loop (e.g. a test double)
            return trainer.current_epoch, 0

    # -- loaders -------------------------------------------------------------------

    def _loader(self, dataset: VideoShardDataset, position_fn: Callable[[], tuple[int, int]]) -> DataLoader:
        return EpochDataLoader(
            dataset,
            position_fn=position_fn,
            batch_size=None,  # batches are made (and bucketed) inside the workers
            collate_fn=keep_batch,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        # Built here, not in __init__, so that torch.distributed is up and the rank known.
        rank, world = dist_rank_world(self.context_parallel)  # a cp group reads one stream
        dataset = build_video_dataset(**{"rank": rank, "world_size": world, **self.train_kwargs},
                                      dtype=self.transfer_dtype, shard_retry=self.shard_retry)
        return self._loader(dataset, self._train_position)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_kwargs is None:
            return []  # Lightning runs no validation for an empty list
        # Every rank reads the whole validation set: DDP forwards and synced metrics need
        # the same number of batches on all ranks (keep it small; ranks agree on the result).
        dataset = build_video_dataset(**{"resampled": False, "rank": 0, "world_size": 1, **self.val_kwargs},
                                      dtype=self.transfer_dtype, shard_retry=self.shard_retry)
        return self._loader(dataset, lambda: (0, 0))

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """uint8 batches become float32 in [-1, 1] here, on the training device."""
        if isinstance(batch, dict) and "video" in batch:
            batch = {**batch, "video": to_model_range(batch["video"])}
        return batch
