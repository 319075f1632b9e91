"""Image-to-video conditioning, Wan2.1 style: what the DiT's ``cond`` channels and image tokens hold.

    cond = encode_condition(vae, video)           # [B, 4 + z_dim, t, h, w]: mask + first-frame latent
    tokens = image_encoder.encode(video[:, :, 0])  # [B, Li, image_dim] (None with image_encoder=none)
    v = dit(x_t, t, text, cond=cond, image=tokens)

Tensor maths only (no model): the data layer builds training conditions with it. An I2V DiT
initialised from a trained T2V one is ``vidgen.models.dit.expand_t2v(t2v_dit, image_dim=1280)``.

The conditioning video is the first frame followed by zero frames, as long as the clip; the
causal VAE encodes it to ``cond_latent`` (normalised like the training latents), whose first
latent frame is the image alone. The mask (diffusers' ``WanImageToVideoPipeline`` layout):
one value per pixel frame, 1 on the conditioning frame and 0 elsewhere, the first repeated
``temporal_compression`` times so that the ``1 + f*(t-1)`` frames fill ``f*t`` slots, folded
into ``f`` channels per latent frame: with first-frame conditioning, all ``f`` mask channels are
1 on latent frame 0 and 0 on the others.

A dropped image (classifier-free guidance on the image) is ``cond`` all zero (mask 0 too: "no
frame given") and image tokens all zero; sampling's image-unconditional branch uses the same.
"""

from __future__ import annotations

import torch
from torch import Tensor


def condition_video(video: Tensor) -> Tensor:
    """video [B, 3, F, H, W] -> its first frame followed by F - 1 zero frames (same shape)."""
    if video.ndim != 5:
        raise ValueError(f"video must be [B, 3, F, H, W], got {tuple(video.shape)}")
    out = torch.zeros_like(video)
    out[:, :, 0] = video[:, :, 0]
    return out


def first_frame_mask(latent_frames: int, height: int, width: int, temporal: int, batch: int = 1,
                     device=None) -> Tensor:
    """[batch, temporal, latent_frames, height, width]: the mask of a first-frame condition."""
    num_frames = 1 + temporal * (latent_frames - 1)
    per_frame = torch.zeros(num_frames, device=device)
    per_frame[0] = 1.0
    # the first pixel frame repeated `temporal` times, then one slot per remaining frame
    slots = torch.cat([per_frame[:1].repeat(temporal), per_frame[1:]])
    mask = slots.view(latent_frames, temporal).t()  # [temporal, latent_frames]
    return mask[None, :, :, None, None].expand(batch, -1, -1, height, width).contiguous()


def with_mask(cond_latent: Tensor, temporal: int) -> Tensor:
    """cond_latent [B, C, t, h, w] or [C, t, h, w] -> the DiT's ``cond``: mask channels first."""
    single = cond_latent.ndim == 4
    z = cond_latent[None] if single else cond_latent
    b, _, t, h, w = z.shape
    cond = torch.cat([first_frame_mask(t, h, w, temporal, b, z.device).to(z), z], 1)
    return cond[0] if single else cond


@torch.no_grad()
def encode_condition_latent(vae, video: Tensor, chunked: bool = True) -> Tensor:
    """video [B, 3, F, H, W] in [-1, 1] -> normalised latent of (first frame, zeros) [B, C, t, h, w]."""
    mu, _ = vae.encode(condition_video(video), chunked=chunked)
    return vae.normalize(mu).float()


def encode_condition(vae, video: Tensor, chunked: bool = True) -> Tensor:
    """video [B, 3, F, H, W] -> the DiT's ``cond`` [B, temporal + C, t, h, w] (mask, latent)."""
    return with_mask(encode_condition_latent(vae, video, chunked), vae.temporal_compression)


def drop_condition(cond: Tensor, image: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The image-unconditional inputs: zeros shaped like ``cond`` and the image tokens."""
    return torch.zeros_like(cond), None if image is None else torch.zeros_like(image)
