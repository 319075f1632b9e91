"""The text (and image) to video pipeline that ``vidgen.sample``, evaluation and training's
validation share: captions -> text embeddings -> the flow ODE in latent space (``generate_latents``)
-> VAE decode; and what an exported DiT records for it (``pipeline.json``: the VAE, the text
encoder, the flow settings and the latent statistics), read and checked here.

    videos = generate(dit, vae, text_encoder, captions, num_frames=17, height=64, width=64,
                      steps=30, solver="euler", cfg_scale=5.0, seed=0)   # [B, 3, T, H, W] in [-1, 1]
    pipeline = read_pipeline("outputs/dit_stage2/<run>")                # {} when none is kept
    check_decoding_vae(vae, vae_path, pipeline, allow_identity=False, allow_mismatch=False)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from vidgen.data.latents import INFO_NAME
from vidgen.diffusion.generate import PIPELINE_NAME, generate_latents, sampling_shift
from vidgen.i2v import encode_condition
from vidgen.models.vae.stats import check_not_identity, check_same_stats, stats_of
from vidgen.text import trim_padding
from vidgen.utils.checkpoint import load_checkpoint_file


def check_latent_grid(latent_shape: Sequence[int], patch_size: Sequence[int], height: int, width: int, vae):
    """Raise when the latent (t, h, w) is not divisible by the DiT patch (names valid sizes)."""
    _, t, h, w = latent_shape
    pt, ph, pw = patch_size
    s = vae.spatial_compression
    bad = []
    if t % pt:
        bad.append(f"latent frames {t} not a multiple of {pt}")
    if h % ph or w % pw:
        bad.append(f"height/width must be multiples of {s * ph}/{s * pw} pixels "
                   f"(VAE {s}x times patch {ph}x{pw}), got {height}x{width}")
    if bad:
        raise ValueError("; ".join(bad))


@torch.no_grad()
def generate(
    dit,
    vae,
    text_encoder,
    captions: Sequence[str],
    num_frames: int,
    height: int,
    width: int,
    steps: int = 30,
    solver: str = "euler",
    cfg_scale: float = 5.0,
    seed: int = 0,
    shift: float | None = None,
    negative_prompt: str = "",
    flow: dict | None = None,
    images: Tensor | None = None,
    image_encoder=None,
    image_cfg_scale: float = 1.0,
) -> Tensor:
    """Text (and image) to video: [B, 3, num_frames, height, width] in [-1, 1] (float32, on the
    DiT's device).

    ``images``: [B, 3, height, width] in [-1, 1], the first frames of an I2V DiT (required
    exactly when the DiT has conditioning channels); ``image_encoder`` gives their tokens
    (required exactly when the DiT has ``image_dim``).
    ``num_frames`` must be a length the VAE decodes to (1 + 4k for the Wan VAE; the error
    names the nearest valid ones), height / width multiples of VAE compression x patch size.
    ``shift``: schedule shift; None derives it from the training ``flow`` settings (see
    ``sampling_shift``), 1.0 when those are unknown.
    """
    if isinstance(captions, str) or not captions:
        raise ValueError("captions must be a non-empty list of strings")
    latent_shape = vae.latent_shape(num_frames, height, width)  # validates the frame count
    if latent_shape[0] != dit.out_channels:
        raise ValueError(
            f"the VAE makes {latent_shape[0]}-channel latents but the DiT expects {dit.out_channels}"
        )
    cond, image_tokens = i2v_inputs(dit, vae, image_encoder, images, len(captions), num_frames, height, width)
    check_latent_grid(latent_shape, dit.patch_size, height, width, vae)
    if text_encoder.dim != dit.config["text_dim"]:
        raise ValueError(
            f"the text encoder gives {text_encoder.dim}-d embeddings, the DiT expects "
            f"text_dim={dit.config['text_dim']}: use the encoder it was trained with"
        )
    emb, mask = text_encoder.encode([*captions, negative_prompt])
    texts = trim_padding(emb.float(), mask)
    if shift is None:
        tokens = math.prod(n // p for n, p in zip(latent_shape[1:], dit.patch_size))
        shift = sampling_shift(flow, tokens)
    z = generate_latents(
        dit, texts[:-1], texts[-1], latent_shape, steps=steps, solver=solver,
        cfg_scale=cfg_scale, shift=shift, seed=seed, cond=cond, image=image_tokens,
        image_cfg_scale=image_cfg_scale,
    )
    vae_device = next(vae.parameters()).device
    video = vae.decode(vae.denormalize(z.to(vae_device)))
    return video.float().clamp(-1, 1)


def i2v_inputs(dit, vae, image_encoder, images, batch, num_frames, height, width):
    """(cond, image tokens) of the first frames ``images`` for an I2V DiT; (None, None) for T2V."""
    if not dit.cond_channels:
        if images is not None:
            raise ValueError("image= given but this DiT is text-to-video (no conditioning channels)")
        return None, None
    if images is None:
        raise ValueError("this DiT is image-to-video: pass image=<png | jpg> (the first frame)")
    if tuple(images.shape) != (batch, 3, height, width):
        raise ValueError(f"images must be [B={batch}, 3, {height}, {width}], got {tuple(images.shape)}")
    if (image_encoder is None) != (dit.image_dim is None):
        raise ValueError(f"this DiT takes image tokens of width {dit.image_dim}; image encoder: "
                         f"{'none' if image_encoder is None else image_encoder.dim}")
    vae_device = next(vae.parameters()).device
    video = images.to(vae_device).float()[:, :, None].expand(-1, -1, num_frames, -1, -1)
    cond = encode_condition(vae, video)
    if cond.shape[1] != dit.cond_channels:
        raise ValueError(f"the VAE makes a {cond.shape[1]}-channel condition, the DiT takes "
                         f"{dit.cond_channels}")
    tokens = None if image_encoder is None else image_encoder.encode(images.to(vae_device))
    return cond, tokens


def read_pipeline(ckpt: str | os.PathLike, trust: bool = False) -> dict:
    """The pipeline.json next to an exported DiT (run folder or dit/ folder), or the record a
    .ckpt keeps (loaded weights-only unless ``trust``); {} when there is neither."""
    path = Path(ckpt)
    for candidate in (path / "dit" / PIPELINE_NAME, path / PIPELINE_NAME):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    if path.is_file():
        ckpt_data = load_checkpoint_file(path, trust=trust)
        return dict(ckpt_data.get("vidgen", {}).get("pipeline") or {})
    return {}


def recorded_latent_stats(pipeline: dict) -> tuple[dict, str] | None:
    """({"mean", "std"}, where they were read) the DiT's latents were normalised with, or None.

    Training records them in pipeline.json (``latent_stats``); older exports only name the
    latents folder, whose ``latents_info.json`` holds the encoding VAE's config.
    """
    if pipeline.get("latent_stats"):
        rec = pipeline["latent_stats"]
        return dict(mean=rec["mean"], std=rec["std"]), f"{PIPELINE_NAME}, from {rec.get('source')}"
    info = Path(pipeline["latents"]) / INFO_NAME if pipeline.get("latents") else None
    if info is not None and info.is_file():
        vae_config = json.loads(info.read_text())["vae_config"]
        return dict(mean=vae_config["latents_mean"], std=vae_config["latents_std"]), str(info)
    return None


def check_decoding_vae(
    vae, vae_ref: str | os.PathLike, pipeline: dict, *, allow_identity: bool, allow_mismatch: bool
) -> None:
    """Refuse a VAE whose latent statistics are the defaults or differ from the DiT's latents'.

    The opt-outs are ``allow_latent_stats_mismatch`` / ``allow_identity_latent_stats``.
    """
    stats = stats_of(vae)
    recorded = recorded_latent_stats(pipeline)
    if recorded is not None:
        trained = pipeline.get("vae")
        if trained and os.path.abspath(trained) == os.path.abspath(vae_ref):
            fix = ("Its statistics changed after the latents were made (latent_stats ran on it "
                   "again?): restore them, or re-encode the latents with it and retrain the DiT")
        else:
            fix = (f"Decode with the VAE the DiT's latents were made with ({trained}: drop or "
                   "change vae=), or re-encode the latents with this VAE and retrain the DiT")
        check_same_stats(*recorded, stats, vae_ref, allow=allow_mismatch, fix=fix)
    check_not_identity(stats, vae_ref, allow=allow_identity)
