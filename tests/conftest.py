"""Shared fixtures. Everything runs on CPU with tiny models and tiny synthetic data."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: tiny models gain nothing from more, and spin-waiting threads slow a busy box.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A small synthetic shard set: <dir>/train (24 clips) and <dir>/val (4 clips), 32px, 9 frames."""
    from vidgen.data.synthetic import make_synthetic_dataset

    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(out, num_videos=24, size=32, frames=9, fps=8, val_videos=4, seed=0)
    return out


# The repository root on sys.path, as for `python train.py` run from there, so that Hydra
# targets like `tests.callbacks.InjectNonFinite` resolve in-process too.
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1]))
