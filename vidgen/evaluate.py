"""Evaluation tasks behind `eval.py`: stream a dataset, accumulate metrics, write a report.

Every statistic streams batch by batch and is summed over ranks (launch with torchrun for
several GPUs: each rank reads its own shards), so any number of videos fits.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from vidgen import text as text_encoders  # module attribute: tests swap build_text_encoder
from vidgen.data.pipeline import build_video_dataset
from vidgen.diffusion.pipeline import check_decoding_vae, generate, read_pipeline
from vidgen.image_encoder import build_image_encoder
from vidgen.losses.lpips import build_lpips
from vidgen.metrics.caption import CaptionAccuracy
from vidgen.metrics.fvd import FVD
from vidgen.metrics.i3d import InceptionI3d, load_i3d
from vidgen.metrics.report import write_report
from vidgen.metrics.video import VideoMetrics
from vidgen.models.dit import load_dit
from vidgen.models.vae import load_vae
from vidgen.models.vae.tiling import tiled_decode, tiled_encode

log = logging.getLogger(__name__)
TASKS = ("vae_recon", "dit_gen", "dit_i2v")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _maybe_init_distributed(device: torch.device) -> int:
    """Join the process group when launched by torchrun; returns this rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _loader(cfg: DictConfig) -> torch.utils.data.DataLoader:
    d = cfg.data
    dataset = build_video_dataset(
        d.shards, mode="video", num_frames=d.num_frames, height=d.height, width=d.width,
        batch_size=d.batch_size, resampled=False, deterministic=True, seed=cfg.seed, shard_retry=d.shard_retry,
    )
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=d.num_workers)


def _metric_models(cfg: DictConfig, device: torch.device):
    """The LPIPS net and FVD accumulator the config asks for (errors when weights are absent)."""
    m = cfg.metrics
    lpips_model = None
    if m.lpips:
        lpips_model = build_lpips(m.lpips_net, m.lpips_weights, random_backbone=m.random_backbones)
        lpips_model = lpips_model.to(device)
    fvd = None
    if m.fvd:
        if cfg.data.num_frames < 16:
            raise ValueError(
                f"FVD uses 16-frame clips but data.num_frames={cfg.data.num_frames}; set "
                "data.num_frames>=16 (17 for a 4x causal VAE) or metrics.fvd=false"
            )
        # random_backbones: the seeded He-initialised test I3D (features vary with the input)
        i3d = InceptionI3d(seed=0) if m.random_backbones else load_i3d(m.i3d_weights)
        fvd = FVD(i3d.to(device).eval(), batch_size=m.fvd_batch_size)
    return lpips_model, fvd


CAPTION_PROTOCOL = (
    "synthetic captions checked from pixels with the generator's palette and motion table "
    "(vidgen.metrics.caption): background colour, one blob of the shape colour, its direction; "
    "reference_*: the same check on the real clips"
)


def _caption_metrics(acc: CaptionAccuracy, metrics: dict, missing: dict, prefix: str = "") -> None:
    """caption_accuracy and its parts into `metrics`, or why not into `missing`."""
    result = acc.compute()
    if result["caption_clips"] == 0:
        missing[f"{prefix}caption_accuracy"] = (
            f"none of the {result['caption_unparsed']} captions is of the synthetic form "
            "('a red circle moving left to right on a blue striped background')"
        )
        return
    for k, v in result.items():
        metrics[f"{prefix}{k}"] = v


def _compute_fvd(fvd: FVD, metrics: dict, missing: dict) -> dict:
    """FVD into `metrics`, or the reason it cannot be computed into `missing` (fewer than 2
    clips a side: no covariance), so the report is still written. Returns its protocol."""
    value, protocol = fvd.compute(allow_missing=True)
    if value is None:
        missing["fvd"] = protocol["missing"]
        log.warning("FVD not computed: %s", protocol["missing"])
    else:
        metrics["fvd"] = value
    return protocol


@torch.no_grad()
def eval_vae_recon(cfg: DictConfig, device: torch.device, rank: int) -> dict:
    """Reconstruct held-out clips through the VAE (chunked causal path) and score them."""
    vae = load_vae(cfg.ckpt, trust=cfg.trust_checkpoint).to(device).eval()
    vae.check_frames(cfg.data.num_frames)
    lpips_model, fvd = _metric_models(cfg, device)
    scores = VideoMetrics(psnr=cfg.metrics.psnr, ssim=cfg.metrics.ssim, lpips_model=lpips_model)
    captions = (CaptionAccuracy(), CaptionAccuracy()) if cfg.metrics.caption else None  # real, recon
    grids, seen = [], 0
    limit = cfg.data.max_videos
    bar = tqdm(_loader(cfg), desc="vae_recon", unit="batch", disable=rank != 0)
    for batch in bar:
        x = batch["video"].to(device)
        if limit is not None:
            x = x[: max(0, limit - seen)]
            if len(x) == 0:
                break
        if max(x.shape[-2:]) > cfg.tiling.tile:  # large frames: overlapping spatial tiles
            mu, _ = tiled_encode(vae, x, cfg.tiling.tile, cfg.tiling.overlap)
            recon = tiled_decode(vae, mu, cfg.tiling.tile, cfg.tiling.overlap)
        else:
            mu, _ = vae.encode(x)
            recon = vae.decode(mu)
        recon = recon.clamp(-1, 1)
        scores.update(x, recon)
        if captions is not None:
            names = list(batch["caption"])[: len(x)]
            captions[0].update(x, names)
            captions[1].update(recon, names)
        if fvd is not None:
            fvd.update_real(x)
            fvd.update_fake(recon)
        for i in range(min(len(x), cfg.grid_videos - len(grids))):
            grids.append((batch["key"][i], x[i].cpu(), recon[i].cpu()))
        seen += len(x)
        bar.set_postfix(videos=seen)
    if seen == 0:
        raise ValueError(f"no clips of {cfg.data.num_frames} frames were read from {cfg.data.shards}")
    result = scores.compute()
    metrics = {k: result[k] for k in ("psnr", "ssim", "lpips") if k in result}
    if "psnr_t" in result:  # the frame index whose mean PSNR over the clips is lowest
        metrics["psnr_worst_frame"] = min(result["psnr_t"])
        metrics["psnr_worst_frame_index"] = min(range(len(result["psnr_t"])), key=result["psnr_t"].__getitem__)
    warnings, missing = [], {}
    if captions is not None:
        _caption_metrics(captions[1], metrics, missing)
        _caption_metrics(captions[0], metrics, missing, prefix="reference_")
    protocol = {
        "task": "vae_recon",
        "num_videos": result["num_videos"],
        "frames": cfg.data.num_frames,
        "resolution": [cfg.data.height, cfg.data.width],
        "psnr_ssim": "per frame on [0,1], mean over frames then videos; SSIM 11x11 Gaussian sigma 1.5",
        "lpips": f"{cfg.metrics.lpips_net}, per frame on [-1,1]" if lpips_model is not None else None,
        "inference": "chunked causal encode (1, 4, 4, ... frames), posterior mean, decode",
        "tiling": f"tiles of {cfg.tiling.tile}px, overlap {cfg.tiling.overlap}px, when a side exceeds the tile",
        "caption": CAPTION_PROTOCOL if captions is not None else None,
    }
    if cfg.metrics.random_backbones:
        warnings.append("random LPIPS/I3D backbones (test mode): LPIPS and FVD figures are meaningless")
    if fvd is not None:  # its warnings travel in protocol["fvd"]; write_report collects them
        protocol["fvd"] = _compute_fvd(fvd, metrics, missing)
    curves = {f"{k}_t": result[f"{k}_t"] for k in ("psnr", "ssim") if f"{k}_t" in result}
    return dict(metrics=metrics, protocol=protocol, curves=curves, grids=grids, warnings=warnings,
                missing=missing)


I2V_PROTOCOL = (
    "each reference clip's frame 0 is the condition (Wan2.1 I2V: VAE latent of the frame with "
    "zero frames after it + mask, and image-encoder tokens when the DiT takes them) and its "
    "caption the prompt; the generated clip is compared frame by frame with the reference: "
    "frame 0 measures how faithfully the condition is kept, later frames how the motion follows"
)


@torch.no_grad()
def eval_dit(cfg: DictConfig, device: torch.device, rank: int) -> dict:
    """Generate a video for each reference clip's caption (``task=dit_i2v``: and its first
    frame) and report FVD against the clips, caption accuracy, and for I2V PSNR / SSIM of
    frame 0 and over time against the reference."""
    i2v = cfg.task == "dit_i2v"
    if not i2v and not cfg.metrics.fvd and not cfg.metrics.caption:
        raise ValueError(
            "task=dit_gen reports FVD of generated vs reference clips and/or the caption accuracy "
            "of the generated clips: set metrics.fvd=true or metrics.caption=true"
        )
    pipeline = read_pipeline(cfg.ckpt, trust=cfg.trust_checkpoint)
    vae_path = cfg.vae or pipeline.get("vae")
    encoder_name = cfg.text_encoder or pipeline.get("text_encoder")
    if not vae_path or not encoder_name:
        raise ValueError(
            f"ckpt={cfg.ckpt} names no VAE / text encoder (no dit/pipeline.json): pass "
            "vae=<VAE folder> and text_encoder=minilm|<local T5 dir>"
        )
    vae = load_vae(vae_path, trust=cfg.trust_checkpoint).to(device).eval()
    check_decoding_vae(vae, vae_path, pipeline, allow_identity=cfg.allow_identity_latent_stats,
                       allow_mismatch=cfg.allow_latent_stats_mismatch)
    vae.check_frames(cfg.data.num_frames)
    dit = load_dit(cfg.ckpt, trust=cfg.trust_checkpoint, lora=cfg.lora, lora_scale=cfg.lora_scale)
    dit = dit.to(device).eval()
    if i2v != bool(dit.cond_channels):
        raise ValueError(f"task={cfg.task} but ckpt={cfg.ckpt} is a "
                         f"{'image' if dit.cond_channels else 'text'}-to-video DiT: use task="
                         f"{'dit_i2v' if dit.cond_channels else 'dit_gen'}")
    text_encoder = text_encoders.build_text_encoder(encoder_name, device=device)
    image_encoder, image_encoder_name = None, None
    if i2v and dit.image_dim is not None:
        image_encoder_name = cfg.image_encoder or (pipeline.get("i2v") or {}).get("image_encoder")
        if not image_encoder_name:
            raise ValueError(f"ckpt={cfg.ckpt} takes image tokens but names no image encoder: pass "
                             "image_encoder=<CLIP vision dir>")
        image_encoder = build_image_encoder(image_encoder_name, device=device)
    lpips_model, fvd = _metric_models(OmegaConf.merge(cfg, {"metrics": {"lpips": i2v and cfg.metrics.lpips}}),
                                      device)
    scores = (VideoMetrics(psnr=cfg.metrics.psnr, ssim=cfg.metrics.ssim, lpips_model=lpips_model)
              if i2v else None)
    captions_acc = CaptionAccuracy() if cfg.metrics.caption else None
    s = cfg.sampling
    grids, seen = [], 0
    limit = cfg.data.max_videos
    bar = tqdm(_loader(cfg), desc=cfg.task, unit="batch", disable=rank != 0)
    for batch in bar:
        x = batch["video"].to(device)
        captions = list(batch["caption"])
        if limit is not None:
            x, captions = x[: max(0, limit - seen)], captions[: max(0, limit - seen)]
            if len(x) == 0:
                break
        # Seeds follow the clip's position in this rank's stream: reproducible, distinct.
        fake = generate(
            dit, vae, text_encoder, captions, cfg.data.num_frames, cfg.data.height, cfg.data.width,
            steps=s.steps, solver=s.solver, cfg_scale=s.cfg_scale,
            seed=cfg.seed + 1_000_000 * rank + seen, flow=pipeline.get("flow"),
            **(dict(images=x[:, :, 0], image_encoder=image_encoder, image_cfg_scale=s.image_cfg_scale)
               if i2v else {}),
        )
        if scores is not None:
            scores.update(x, fake)
        if fvd is not None:
            fvd.update_real(x)
            fvd.update_fake(fake)
        if captions_acc is not None:
            captions_acc.update(fake, captions)
        for i in range(min(len(x), cfg.grid_videos - len(grids))):
            grids.append((f"{seen + i:03d} {captions[i][:40]}", x[i].cpu(), fake[i].cpu()))  # unique
        seen += len(x)
        bar.set_postfix(videos=seen)
    if seen == 0:
        raise ValueError(f"no clips of {cfg.data.num_frames} frames were read from {cfg.data.shards}")
    metrics, missing, curves = {}, {}, None
    if scores is not None:
        result = scores.compute()
        curves = {f"{k}_t": result[f"{k}_t"] for k in ("psnr", "ssim") if f"{k}_t" in result}
        for k in ("psnr", "ssim"):
            if f"{k}_t" in result:
                metrics[f"{k}_frame0"] = result[f"{k}_t"][0]
                metrics[f"{k}_later_frames"] = sum(result[f"{k}_t"][1:]) / max(1, len(result[f"{k}_t"]) - 1)
        metrics.update({k: result[k] for k in ("psnr", "ssim", "lpips") if k in result})
    fvd_protocol = _compute_fvd(fvd, metrics, missing) if fvd is not None else None
    if captions_acc is not None:
        _caption_metrics(captions_acc, metrics, missing)
    sampling = {**OmegaConf.to_container(s), "seed": cfg.seed, "vae": str(vae_path),
                "text_encoder": str(encoder_name)}
    if not i2v:
        sampling.pop("image_cfg_scale", None)
    protocol = {
        "task": cfg.task,
        "num_videos": seen,
        "frames": cfg.data.num_frames,
        "resolution": [cfg.data.height, cfg.data.width],
        "sampling": sampling,
        "fvd": fvd_protocol,
        "caption": CAPTION_PROTOCOL if captions_acc is not None else None,
    }
    if i2v:
        protocol.update(
            condition=I2V_PROTOCOL, image_encoder=image_encoder_name,
            psnr_ssim="per frame on [0,1] against the reference clip, mean over clips; "
                      "psnr_frame0 / ssim_frame0: the conditioning frame, *_later_frames: the mean of "
                      "frames 1.., psnr / ssim: all frames; SSIM 11x11 Gaussian sigma 1.5",
        )
    warnings = []  # FVD's own warnings travel in protocol["fvd"]
    if cfg.metrics.random_backbones and fvd is not None:
        warnings.append("random I3D (test mode): the FVD figure is meaningless")
    return dict(metrics=metrics, protocol=protocol, curves=curves, grids=grids, warnings=warnings,
                missing=missing, other_label="generated")


def evaluate(cfg: DictConfig) -> Path:
    """Run `cfg.task` and write the report folder; returns it."""
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r} is not an evaluation task; valid: {list(TASKS)}")
    torch.manual_seed(cfg.seed)
    device = _device(cfg.device)
    rank = _maybe_init_distributed(device)
    task = {"vae_recon": eval_vae_recon, "dit_gen": eval_dit, "dit_i2v": eval_dit}[cfg.task]
    result = task(cfg, device, rank)
    out = Path(cfg.out)
    if rank == 0:
        write_report(
            out,
            metrics=result["metrics"],
            protocol=result["protocol"],
            config=OmegaConf.to_container(cfg, resolve=True),
            checkpoint=str(cfg.ckpt),
            curves=result["curves"],
            grids=[(k, a, b) for k, a, b in result["grids"]],
            warnings=result["warnings"],
            missing=result.get("missing"),
            other_label=result.get("other_label", "reconstruction"),
        )
        log.info("report written to %s", out)
    return out
