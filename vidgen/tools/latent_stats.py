"""Per-channel latent statistics of a VAE over a dataset, stored with the VAE.

    python -m vidgen.tools.latent_stats ckpt=outputs/vae_stage3/<run> \
        "data.shards='shards/{00000..00099}.tar'" data.num_frames=17 data.height=256 data.width=256 \
        data.max_videos=2000 [out=<folder>]

Streams clips through the VAE encoder (chunked causal path), takes the posterior mean mu
[B, C, t, h, w] and accumulates, per channel c, the count, sum and sum of squares of
``mu[:, c]`` in float64 (shifted by the first batch's channel means so that the sums do not
cancel catastrophically). Then

    mean_c = E[mu_c]        std_c = sqrt(E[(mu_c - mean_c)^2])      (population std)

are written into the VAE (``WanVAE.set_latent_stats``) and the VAE is saved back with
``save_pretrained``: by default into the VAE folder itself (in place), else into ``out``.

Convention: ``WanVAE.normalize(mu) = (mu - mean) / std`` per channel is the ONLY place the
statistics are applied (encode_latents stores normalised latents; sampling calls
``denormalize`` before decoding). The statistics are always computed on the raw posterior
mean, so running this tool again on a VAE that already has statistics gives the same values.

In-place writes are atomic per file: the new files are written into a temporary folder next
to the target, then renamed over the old ones, weights first (the weights file holds the
statistics as buffers, ``config.json`` repeats them for reading). ``latent_stats.json`` records
what the statistics were computed on.

Every consumer checks them (``check_not_identity`` / ``check_same_stats`` below):
encode_latents, DiT training and sampling refuse a VAE still at the defaults (mean 0 / std 1)
unless ``allow_identity_latent_stats=true``, and decoding refuses a VAE whose statistics differ
from those the DiT's latents were normalised with (``latents_info.json`` / ``dit/pipeline.json``)
unless ``allow_latent_stats_mismatch=true``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm import tqdm

from vidgen.models.vae import WanVAE
from vidgen.models.vae.vae import CONFIG_NAME, WEIGHTS_NAME

log = logging.getLogger(__name__)
STATS_NAME = "latent_stats.json"


@torch.no_grad()
def compute_latent_stats(
    vae: WanVAE,
    videos: Iterable[torch.Tensor],
    max_videos: int | None = None,
    chunked: bool = True,
    progress: bool = True,
) -> dict:
    """Per-channel mean / std of the posterior mean over ``videos``.

    Args:
        vae: the encoder (its current latent statistics are ignored: raw mu is measured).
        videos: batches [B, 3, T, H, W] in [-1, 1] (any mix of shapes).
        max_videos: stop after this many clips (None: all).
    Returns:
        dict(mean=[C] float list, std=[C] float list, num_videos, num_values per channel).
    """
    device = next(vae.parameters()).device
    count = 0
    shift = total = total_sq = None
    seen = 0
    bar = tqdm(desc="latent stats", unit="clip", disable=not progress, total=max_videos)
    for x in videos:
        if max_videos is not None:
            x = x[: max_videos - seen]
        if len(x) == 0:
            break
        mu, _ = vae.encode(x.to(device), chunked=chunked)
        m = mu.transpose(0, 1).flatten(1).double()  # [C, B*t*h*w]
        if shift is None:
            shift = m.mean(dim=1, keepdim=True)
            total = torch.zeros_like(shift[:, 0])
            total_sq = torch.zeros_like(shift[:, 0])
        d = m - shift
        total += d.sum(dim=1)
        total_sq += d.square().sum(dim=1)
        count += m.shape[1]
        seen += len(x)
        bar.update(len(x))
        if max_videos is not None and seen >= max_videos:
            break
    bar.close()
    if count == 0:
        raise ValueError("no clips were read: check data.shards and that the clip size fits the videos")
    mean_d = total / count
    var = (total_sq / count - mean_d.square()).clamp_min(0)
    mean = (shift[:, 0] + mean_d).cpu()
    std = var.sqrt().cpu()
    if (std <= 0).any():
        dead = [i for i, s in enumerate(std.tolist()) if s <= 0]
        raise ValueError(f"latent channels {dead} are constant over {seen} clips (std 0); "
                         "normalising by them is undefined. Is the VAE trained?")
    return dict(mean=mean.tolist(), std=std.tolist(), num_videos=seen, num_values=count)


def vae_folder(ckpt: str | os.PathLike) -> Path | None:
    """The save_pretrained folder behind ``ckpt`` (folder or run folder), None for a .ckpt file."""
    path = Path(ckpt)
    if path.is_dir() and (path / "vae" / CONFIG_NAME).is_file():
        return path / "vae"
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return path
    return None


def save_vae_atomically(vae: WanVAE, out: str | os.PathLike, extra: dict | None = None) -> Path:
    """``vae.save_pretrained(out)``, replacing existing files by atomic renames (weights first)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".latent_stats.", dir=out))
    try:
        vae.save_pretrained(tmp)
        names = [WEIGHTS_NAME, CONFIG_NAME]
        if extra is not None:
            (tmp / STATS_NAME).write_text(json.dumps(extra, indent=2) + "\n")
            names.append(STATS_NAME)
        for name in names:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg) -> Path:
    """The CLI body (cfg: the composed ``configs/latent_stats.yaml``); returns the VAE folder written."""
    from vidgen.data.pipeline import build_video_dataset
    from vidgen.lit.vae import load_vae

    src = vae_folder(cfg.ckpt)
    out = Path(cfg.out) if cfg.out else src
    if out is None:
        raise ValueError(
            f"ckpt={cfg.ckpt} is not a VAE folder (config.json + model.safetensors) or a run "
            "folder with vae/, so the statistics cannot be written in place: pass out=<folder>"
        )
    device = _device(cfg.device)
    vae = load_vae(cfg.ckpt, trust=cfg.trust_checkpoint).to(device).eval()
    d = cfg.data
    if d.buckets is None:
        vae.latent_shape(d.num_frames, d.height, d.width)  # clear error for invalid clip sizes
    dataset = build_video_dataset(
        d.shards, mode="video", num_frames=d.num_frames, height=d.height, width=d.width,
        buckets=d.buckets, batch_size=d.batch_size, resampled=False, deterministic=True,
        seed=0, rank=0, world_size=1, shard_retry=d.shard_retry,
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=d.num_workers)
    stats = compute_latent_stats(
        vae, (b["video"] for b in loader), max_videos=d.max_videos, chunked=cfg.chunked
    )
    vae.set_latent_stats(stats["mean"], stats["std"])
    record = dict(
        stats, convention="normalize(mu) = (mu - mean) / std per channel (WanVAE.normalize)",
        source=str(cfg.ckpt), shards=str(d.shards),
        clip=d.buckets if d.buckets is not None else f"{d.num_frames}x{d.height}x{d.width}",
    )
    save_vae_atomically(vae.cpu(), out, extra=record)
    fmt = lambda v: "[" + ", ".join(f"{x:.4g}" for x in v) + "]"  # noqa: E731
    print(f"latent stats over {stats['num_videos']} clips ({stats['num_values']} values per channel)")
    print(f"  mean {fmt(stats['mean'])}\n  std  {fmt(stats['std'])}")
    print(f"written to {out} ({WEIGHTS_NAME}, {CONFIG_NAME}, {STATS_NAME})")
    return out


def main() -> None:
    import hydra

    from vidgen.utils.rundir import register_resolvers

    register_resolvers()
    config_dir = str(Path(__file__).resolve().parents[2] / "configs")
    hydra.main(version_base="1.3", config_path=config_dir, config_name="latent_stats")(run)()


if __name__ == "__main__":
    main()
