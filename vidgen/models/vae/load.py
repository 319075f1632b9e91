"""Loading a VAE from what training and conversion write: an exported folder
(``save_pretrained``), a run folder (its ``vae/``) or a Lightning ``.ckpt``.

    vae = load_vae("outputs/vae_stage3/<run>")     # its exported vae/
"""

from __future__ import annotations

import os

from vidgen.models.vae.vae import WanVAE, build_wan_vae
from vidgen.utils.checkpoint import find_export, read_module_state


def load_vae(path: str | os.PathLike, prefer_ema: bool = True, trust: bool = False) -> WanVAE:
    """A VAE from a `save_pretrained` folder, a run folder, or a Lightning `.ckpt`.

    A run folder resolves to its exported `<run>/vae/` (written at the end of training). A
    `.ckpt` uses the EMA weights when the run kept them and `prefer_ema` is set; it is loaded
    weights-only unless `trust` (see `vidgen.utils.checkpoint.load_checkpoint_file`).
    """
    path = find_export(path, "vae")
    if path.is_dir():
        return WanVAE.from_pretrained(path)
    hp, state = read_module_state(path, "vae", prefer_ema, trust=trust)
    vae = build_wan_vae(hp.get("size"), **dict(hp["vae"]))
    vae.load_state_dict(state)
    return vae
