"""Checks every consumer of a VAE's latent statistics makes (encode_latents, DiT training,
sampling, evaluation), and where a VAE's exported folder is. The statistics themselves are
computed by ``python -m vidgen.tools.latent_stats`` (see there for the convention)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vidgen.models.export import CONFIG_NAME
from vidgen.models.vae.vae import WanVAE


def vae_folder(ckpt: str | os.PathLike) -> Path | None:
    """The save_pretrained folder behind ``ckpt`` (folder or run folder), None for a .ckpt file."""
    path = Path(ckpt)
    if path.is_dir() and (path / "vae" / CONFIG_NAME).is_file():
        return path / "vae"
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return path
    return None


# ---------------------------------------------------------------- checks for every latent consumer
# encode_latents, DiT training, sampling and eval call these: a VAE whose statistics were never
# computed (the WanVAE defaults) would silently feed the DiT unnormalised latents, and a VAE whose
# statistics differ from those the latents were made with would decode every sample wrongly.
IDENTITY_KNOB = "allow_identity_latent_stats"
MISMATCH_KNOB = "allow_latent_stats_mismatch"


def stats_of(vae: WanVAE) -> dict:
    """The VAE's current statistics as ``{"mean": [C], "std": [C]}`` float lists."""
    return dict(mean=vae.latents_mean.float().tolist(), std=vae.latents_std.float().tolist())


def is_identity(stats: dict) -> bool:
    """Mean exactly 0 and std exactly 1 on every channel: WanVAE's defaults, never computed.

    Measured statistics (this tool's, or Wan's own carried over by convert_vae) are never
    exactly these, so no flag in the VAE config is needed to tell them apart.
    """
    return all(m == 0 for m in stats["mean"]) and all(s == 1 for s in stats["std"])


def latent_stats_command(vae_ref: str | os.PathLike) -> str:
    """The command that computes the statistics of ``vae_ref`` (a .ckpt needs out=)."""
    out = "" if vae_folder(vae_ref) is not None else " out=<new VAE folder>"
    return f"python -m vidgen.tools.latent_stats ckpt={vae_ref}{out} data.shards=<video shards>"


def check_not_identity(
    stats: dict, vae_ref: str | os.PathLike, *, allow: bool, knob: str = IDENTITY_KNOB,
    latents: str | None = None,
) -> None:
    """Raise unless the statistics were computed (or ``allow``); names the command to run.

    latents: the latent folder made with these statistics (the fix then re-encodes it).
    """
    if allow or not is_identity(stats):
        return
    if latents is None:
        raise ValueError(
            f"the VAE at {vae_ref} has no latent statistics (mean 0 / std 1), so its latents "
            f"would not be normalised: run `{latent_stats_command(vae_ref)}` first, or pass "
            f"{knob}=true"
        )
    raise ValueError(
        f"the latents in {latents} were encoded by the VAE at {vae_ref} without latent statistics "
        f"(mean 0 / std 1), so they are not normalised: run `{latent_stats_command(vae_ref)}`, "
        f"then python -m vidgen.tools.encode_latents again into a new out= folder, or pass "
        f"{knob}=true"
    )


def _fmt(values: list[float]) -> str:
    shown = ", ".join(f"{v:.4g}" for v in values[:8])
    return f"[{shown}{', ...' if len(values) > 8 else ''}]"


def check_same_stats(
    recorded: dict, where: str, stats: dict, vae_ref: str | os.PathLike, *, allow: bool,
    fix: str, knob: str = MISMATCH_KNOB, rtol: float = 1e-5, atol: float = 1e-6,
) -> None:
    """Raise when the VAE's statistics differ from those the latents were normalised with.

    recorded: {"mean", "std"} the latents were made with, read from ``where`` (a file).
    stats: the decoding VAE's (``stats_of(vae)``). fix: what to do instead, for the message.
    """
    if allow:
        return
    if len(recorded["mean"]) != len(stats["mean"]):
        raise ValueError(
            f"the VAE at {vae_ref} has {len(stats['mean'])} latent channels but the latents "
            f"recorded in {where} have {len(recorded['mean'])}: {fix}, or pass {knob}=true"
        )
    diffs = {}
    for name in ("mean", "std"):
        a, b = torch.tensor(stats[name]).double(), torch.tensor(recorded[name]).double()
        if not torch.allclose(a, b, rtol=rtol, atol=atol):
            diffs[name] = (a - b).abs().max().item()
    if not diffs:
        return
    never = " (mean 0 / std 1: latent_stats never ran on it)" if is_identity(stats) else ""
    raise ValueError(
        f"the VAE at {vae_ref} has other latent statistics than those the DiT's latents were "
        f"normalised with ({where}): max abs difference "
        + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items())
        + f"; VAE mean {_fmt(stats['mean'])} std {_fmt(stats['std'])}{never}, recorded mean "
        f"{_fmt(recorded['mean'])} std {_fmt(recorded['std'])}. {fix}, or pass {knob}=true"
    )
