"""Checkpoint files: atomic writes, loads that never run the file's code, `ckpt_path=last`.

A `.ckpt` is a pickle, and unpickling can call any function the file names. Checkpoints are
shared (a model hub, a colleague, an issue attachment), so every load here goes through
`load_checkpoint_file`: `torch.load(weights_only=True)`, which rebuilds tensors and plain
containers only, with the few extra types vidgen's own checkpoints hold listed once in
`SAFE_GLOBALS`. Anything else is refused with `UntrustedCheckpointError`; a user who trusts
the file opts in with `trust_checkpoint=true`.
"""

from __future__ import annotations

import glob
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file beside `path`, fsync, then rename over it.

    A crash mid-write leaves the previous checkpoint intact: readers only ever see a
    complete file, because rename within one filesystem is atomic on POSIX.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# Types beyond tensors and builtin containers that vidgen's own checkpoints hold; the
# weights-only unpickler accepts these and nothing else. Extend it here, in one place, when a
# new kind of state is saved (tests/test_trust.py loads every checkpoint a run writes).
SAFE_GLOBALS: list = []


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint names code to run while loading: refused unless the user trusts it."""


def load_checkpoint_file(
    path: str | os.PathLike, *, trust: bool = False, map_location="cpu", mmap: bool = False
) -> Any:
    """`torch.load` that only rebuilds data (tensors, containers, `SAFE_GLOBALS`).

    With `trust=True` the file is unpickled in full, which runs whatever it names: only for a
    file the user made or trusts as they would a script. `mmap`: map the tensors instead of
    reading them (a cheap check of a large file).
    """
    if trust:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UntrustedCheckpointError(
            f"refused to load {path}: it names {_unsafe_globals(path) or 'types'} beyond tensors "
            "and plain containers, and unpickling it would run that code. vidgen's own "
            "checkpoints never need this. If you trust this file as you would a script, load it "
            "with trust_checkpoint=true (on the command line of the tool you ran)."
        ) from e


def _unsafe_globals(path: str | os.PathLike) -> str:
    """The globals a checkpoint names that weights-only loading refuses, as one string."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint (legacy format): torch's message is all there is
        return ""
    names = [n for n in names if n not in {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}]
    return ", ".join(sorted(names))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic writes (see `atomic_torch_save`), and resume loads
    through `load_checkpoint_file` (`trust`: the run's `trust_checkpoint`)."""

    def __init__(self, trust: bool = False):
        super().__init__()
        self.trust = trust

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options}")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return load_checkpoint_file(path, trust=self.trust, map_location=map_location or "cpu")


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str, task_dir: str) -> str | None:
    """Turn the `ckpt_path` config value into a file, or None for a fresh run.

    `last` means `<run_dir>/checkpoints/last.ckpt` when this run folder has one, else the
    newest `last.ckpt` of any earlier run of the same task under `task_dir`.
    """
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        own = Path(run_dir) / "checkpoints" / "last.ckpt"
        if own.is_file():
            return str(own)
        found = glob.glob(os.path.join(task_dir, "*", "checkpoints", "last.ckpt"))
        if not found:
            raise FileNotFoundError(
                f"ckpt_path=last found no checkpoint: looked for {own} and "
                f"{task_dir}/*/checkpoints/last.ckpt. Start without ckpt_path, or pass a file."
            )
        return max(found, key=os.path.getmtime)
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"ckpt_path={ckpt_path} is not a file (or use ckpt_path=last)")
    return ckpt_path


def find_export(path: str | os.PathLike, name: str) -> Path:
    """Where a trained `name` ("vae" | "dit") lives: a `save_pretrained` folder, a run folder
    (its exported `<run>/<name>/`) or a Lightning `.ckpt`; a clear error otherwise."""
    path = Path(path)
    if path.is_dir() and (path / name / "config.json").is_file():
        return path / name
    if path.is_dir() or path.is_file():
        return path
    raise FileNotFoundError(
        f"{name.upper()} checkpoint {path} does not exist: give a save_pretrained folder "
        f"(config.json + model.safetensors), a run folder with {name}/, or a .ckpt file"
    )


def read_module_state(
    path: str | os.PathLike, name: str, prefer_ema: bool = True, trust: bool = False
) -> tuple[dict, dict]:
    """(hyper_parameters, state dict of the LightningModule's submodule `name`) from a vidgen
    `.ckpt`; with `prefer_ema`, the EMA weights the run kept replace the raw ones."""
    ckpt = load_checkpoint_file(path, trust=trust)
    hp = ckpt.get("hyper_parameters", {})
    if name not in hp:
        raise ValueError(f"{path} is not a vidgen {name.upper()} checkpoint (no hyper_parameters.{name})")
    prefix = name + "."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    ema = ckpt.get("vidgen", {}).get("ema")
    if prefer_ema and ema:
        state.update({k: v.to(state[k].dtype) for k, v in ema["shadow"].items() if k in state})
    return hp, state
