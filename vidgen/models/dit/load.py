"""Loading a DiT from what training and conversion write: an exported folder
(``save_pretrained``: config.json + model.safetensors), a run folder (its ``dit/``) or a
Lightning ``.ckpt``, optionally with a LoRA merged in; and starting a model from an earlier
stage's weights.

    dit = load_dit("outputs/dit_stage1/<run>")                    # its exported dit/
    dit = load_dit("base/", lora="outputs/dit_lora/<run>/lora")   # LoRA merged at scale 1
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vidgen.models.dit.lora import merge_lora, read_lora
from vidgen.models.dit.model import WanDiT, build_wan_dit, expand_t2v
from vidgen.utils.checkpoint import find_export, read_module_state


def init_weights_from(dit: WanDiT, init_from: str, trust: bool = False) -> None:
    """Load an earlier stage's DiT into ``dit``: the same config, or a text-to-video DiT that
    ``dit`` (image-to-video, otherwise the same) expands (``vidgen.models.dit.expand_t2v``)."""
    src = load_dit(init_from, trust=trust)
    ours = dict(dit.config)
    if src.config != ours and src.cond_channels == 0 and dit.cond_channels > 0:
        src = expand_t2v(src, cond_channels=dit.cond_channels, image_dim=dit.image_dim)
    if src.config != ours:
        diff = {k: (src.config.get(k), ours.get(k)) for k in {*src.config, *ours}
                if ours.get(k) != src.config.get(k)}
        fix = ", ".join(f"model.dit.{k}={v[0]}" for k, v in sorted(diff.items()))
        raise ValueError(f"init_from={init_from}: its DiT differs from this model's config as "
                         f"(theirs, ours): {diff}; to start from it set {fix}")
    dit.load_state_dict(src.state_dict())


def load_dit(path: str | os.PathLike, prefer_ema: bool = True, trust: bool = False,
             lora: str | os.PathLike | None = None, lora_scale: float = 1.0) -> WanDiT:
    """A DiT from a ``save_pretrained`` folder, a run folder (its ``dit/``) or a Lightning ``.ckpt``
    (weights-only unless ``trust``: see ``vidgen.utils.checkpoint.load_checkpoint_file``), with
    the LoRA ``lora`` (a LoRA run's ``lora/`` folder or a LoRA file, any key format) merged in at
    ``lora_scale``."""
    model = _load_base_dit(path, prefer_ema, trust)
    if lora:
        merge_lora(model, read_lora(lora), lora_scale)
    return model


def _load_base_dit(path: str | os.PathLike, prefer_ema: bool, trust: bool) -> WanDiT:
    given = Path(path)
    if given.is_dir() and (given / "lora").is_dir() and not (given / "dit").is_dir():
        raise ValueError(f"{given} is a LoRA run: it exported adapters (lora/), not a DiT. Sample the "
                         f"base with them: ckpt=<its base> lora={given / 'lora'}")
    path = find_export(path, "dit")
    if path.is_dir():
        return WanDiT.from_pretrained(path)
    hp, state = read_module_state(path, "dit", prefer_ema, trust=trust)
    if hp.get("lora"):
        raise ValueError(f"{path} is a LoRA run's checkpoint: it holds the adapters, not the base. Sample "
                         f"its export instead: ckpt={hp.get('init_from')} lora=<its run>/lora")
    with torch.device("meta"):  # the state dict supplies every tensor: skip random init
        model = build_wan_dit(hp.get("size"), **hp["dit"])
    model.load_state_dict(state, assign=True)
    return model
