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

Every consumer checks them (``check_not_identity`` / ``check_same_stats`` in
``vidgen.models.vae.stats``):
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

from vidgen.data.pipeline import build_video_dataset
from vidgen.models.export import CONFIG_NAME, WEIGHTS_NAME
from vidgen.models.vae import WanVAE, load_vae
from vidgen.models.vae.stats import vae_folder
from vidgen.utils.rundir import register_resolvers

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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg) -> Path:
    """The CLI body (cfg: the composed ``configs/latent_stats.yaml``); returns the VAE folder written."""
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

    register_resolvers()
    config_dir = str(Path(__file__).resolve().parents[2] / "configs")
    hydra.main(version_base="1.3", config_path=config_dir, config_name="latent_stats")(run)()


if __name__ == "__main__":
    main()
