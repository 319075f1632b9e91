"""Lightning callbacks that tests add to real `train.py` runs from the command line:

    python train.py ... +callbacks.poison._target_=tests.callbacks.InjectNonFinite \
        '+callbacks.poison.batches=[1]' +callbacks.poison.rank=1
    python train.py ... +callbacks.hashes._target_=tests.callbacks.WeightHashes

(`tests` resolves as a namespace package from the repository root, where train.py runs.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch


class InjectNonFinite(L.Callback):
    """Turn the input of the given training batches (counted from 0, every batch the
    loader hands over) into NaN on one rank, to exercise the non-finite guards."""

    def __init__(self, batches: list[int], rank: int = 0):
        self.batches, self.rank = set(batches), rank
        self.seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        index, self.seen = self.seen, self.seen + 1
        if trainer.global_rank != self.rank or index not in self.batches:
            return
        if "video" in batch:
            batch["video"].fill_(float("nan"))
        else:
            batch["packed"].x.fill_(float("nan"))

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]


def state_fingerprint(pl_module: L.LightningModule) -> dict:
    """sha256 of the module's state and its EMA shadow, and whether all of it is finite."""
    tensors = dict(pl_module.state_dict())
    ema = getattr(pl_module, "ema", None)
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
    h, finite = hashlib.sha256(), True
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        finite &= bool(torch.isfinite(t).all()) if t.is_floating_point() else True
        h.update(name.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"sha256": h.hexdigest(), "finite": finite, "tensors": len(tensors)}


class WeightHashes(L.Callback):
    """At the end of training each rank writes `<run>/fingerprint_rank<r>.json`
    (`state_fingerprint`) with the guard's counts, so a test can compare the replicas."""

    def on_train_end(self, trainer, pl_module) -> None:
        out = dict(state_fingerprint(pl_module), steps_done=pl_module.steps_done,
                   nonfinite=dict(pl_module.guard.nonfinite))
        path = Path(trainer.default_root_dir) / f"fingerprint_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(out, indent=2))
