"""Loader helpers the video and the latent DataModules share: the epoch-aware DataLoader
whose state is the stream layout a checkpoint resumes exactly with, worker seeding, the
trained position of a run, and OmegaConf-to-builtin conversion of config values."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def to_builtin(value):
    """Recursively turn OmegaConf containers (or anything dict/list-like) into builtins."""
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_builtin(v) for v in value]
    return value


def seed_worker(worker_id: int) -> None:
    """Seed a loader worker's global RNGs (for user transforms; the pipeline itself uses
    its own per-(seed, rank, worker, epoch) generators). ``torch.initial_seed()`` already
    differs per worker and per pass, drawn from the loader's seeded generator."""
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


def trained_position(trainer, batches_per_epoch: int) -> tuple[int, int]:
    """(epoch, batches already done in it) of the training stream, from the batches trained
    so far. Read before Lightning's restart bookkeeping runs: the total count of processed
    batches (restored from the checkpoint) includes the batch whose on_train_batch_end saved
    it, and gives the data position however Lightning itself splits the resumed epoch. Every
    rank trains the same number of batches, so every rank gets the same position."""
    return divmod(trainer.fit_loop.epoch_loop.batch_progress.total.processed, batches_per_epoch)


# What the training streams depend on besides the position, and how a user sets it.
_LAYOUT_KEYS = {
    "num_workers": "data.num_workers",
    "world_size": "the data-parallel world size (trainer.devices x trainer.num_nodes / context_parallel)",
    "batches_per_epoch": "data.train.batches_per_epoch",
    "seed": "data.seed",
}


class EpochDataLoader(DataLoader):
    """A DataLoader that sets the dataset's (epoch, start_batch) before each pass, and whose
    ``state_dict`` is the stream layout a checkpoint resumes exactly with. The dataset has
    ``set_epoch(epoch, start_batch)``, ``world_size``, ``batches_per_epoch`` and ``seed``
    (``VideoShardDataset``, the latent dataset)."""

    def __init__(self, dataset: Dataset, *, position_fn: Callable[[], tuple[int, int]], **kwargs):
        super().__init__(dataset, **kwargs)
        self.position_fn = position_fn

    def __iter__(self):
        self.dataset.set_epoch(*self.position_fn())
        return super().__iter__()

    def state_dict(self) -> dict:
        """Loader workers (0 and 1 make the same single stream), world size,
        batches_per_epoch and seed of the streams. The position itself comes from the
        Trainer's batch count, which Lightning restores on its own."""
        d = self.dataset
        return dict(num_workers=self.num_workers, world_size=d.world_size,
                    batches_per_epoch=d.batches_per_epoch, seed=d.seed)

    def load_state_dict(self, state: dict) -> None:
        """Warn (naming both values) about each layout value that differs from the checkpoint's."""
        now = self.state_dict()
        for key, name in _LAYOUT_KEYS.items():
            if key not in state:
                continue
            before, after = state[key], now[key]
            if key == "num_workers":
                before, after = max(1, before), max(1, after)
            if before != after:
                warnings.warn(
                    f"vidgen.data: resuming with {name} = {now[key]}, but the checkpoint was "
                    f"saved with {state[key]}. The data streams depend on it, so from here on "
                    "this run reads other batches than the uninterrupted run would have (the "
                    f"rest of the epoch comes from the streams of {name} = {now[key]}). Resume "
                    f"with {state[key]} to continue exactly.",
                    stacklevel=2,
                )
