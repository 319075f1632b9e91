"""Exported models: one folder format and one loader for every vidgen model (WanVAE, WanDiT).

A folder holds ``config.json`` (the constructor's keyword arguments and ``_class_name``) and
``model.safetensors`` (the state dict)::

    model.save_pretrained("out/dit")
    WanDiT.from_pretrained("out/dit", dtype=torch.bfloat16, device="cuda")

Both classes load with the same keyword-only ``dtype`` and ``device`` (weights keep their
stored dtype unless ``dtype``), strictly (every key must match); the DiT is built on the meta
device first, so a large model is never randomly initialised only to be overwritten (the
VAE's constructor checks its latent statistics, which needs real tensors).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def save_model(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model.config`` (with ``_class_name``) and the weights to ``directory``; -> it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": type(model).__name__, **model.config}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def load_model(cls: type[nn.Module], directory: str | os.PathLike, *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", meta_init: bool = True, **overrides) -> nn.Module:
    """A ``cls`` from what ``save_model`` wrote. ``overrides`` replace config values that do not
    change weight shapes (e.g. a DiT's attn_backend). A missing file, or a folder of another
    class, is an error naming the folder and what it should hold."""
    from safetensors.torch import load_file

    directory = Path(directory)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} is not a saved {cls.__name__}: missing {', '.join(missing)} "
            f"({directory / missing[0]} not found; expected {CONFIG_NAME} and {WEIGHTS_NAME} "
            f"written by {cls.__name__}.save_pretrained)"
        )
    config = json.loads((directory / CONFIG_NAME).read_text())
    name = config.pop("_class_name", cls.__name__)  # folders written before it was recorded
    if name != cls.__name__:
        raise ValueError(f"{directory / CONFIG_NAME} describes a {name!r}, not a {cls.__name__!r}")
    with torch.device("meta") if meta_init else contextlib.nullcontext():
        model = cls(**{**config, **overrides})
    state = load_file(str(directory / WEIGHTS_NAME), device=str(device))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model
