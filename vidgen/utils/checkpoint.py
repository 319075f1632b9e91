"""Atomic checkpoint writes and `ckpt_path=last` resolution."""

from __future__ import annotations

import glob
import os
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose writes are atomic (see `atomic_torch_save`)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options}")
        atomic_torch_save(checkpoint, path)


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


def read_module_state(path: str | os.PathLike, name: str, prefer_ema: bool = True) -> tuple[dict, dict]:
    """(hyper_parameters, state dict of the LightningModule's submodule `name`) from a vidgen
    `.ckpt`; with `prefer_ema`, the EMA weights the run kept replace the raw ones."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    hp = ckpt.get("hyper_parameters", {})
    if name not in hp:
        raise ValueError(f"{path} is not a vidgen {name.upper()} checkpoint (no hyper_parameters.{name})")
    prefix = name + "."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    ema = ckpt.get("vidgen", {}).get("ema")
    if prefer_ema and ema:
        state.update({k: v.to(state[k].dtype) for k, v in ema["shadow"].items() if k in state})
    return hp, state
