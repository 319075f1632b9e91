"""The sampling loop shared by training (validation samples), ``vidgen.sample`` and
evaluation: caption embeddings and noise -> the flow ODE with classifier-free guidance ->
normalised latents; and the schedule shift that matches training.

An exported DiT folder's ``pipeline.json`` (``PIPELINE_NAME``) records what sampling needs
to reproduce training: the flow settings, the VAE, the text encoder, the latent statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from vidgen.diffusion.flow import FlowOptions
from vidgen.diffusion.sampling import (
    SAMPLERS,
    SOLVERS,
    cfg_model_fn,
    i2v_cfg_model_fn,
    sample_unipc,
    timesteps_schedule,
)
from vidgen.i2v import drop_condition
from vidgen.utils.config import typed_options

PIPELINE_NAME = "pipeline.json"
_FORMER_NAMES = {"base_tokens": "base_shift_tokens", "max_tokens": "max_shift_tokens"}  # FlowOptions before 12/2026


def pad_texts(texts: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-caption embeddings [L_i, D] -> context [B, L, D] (zero-padded) and mask [B, L] bool."""
    length = max(t.shape[0] for t in texts)
    context = texts[0].new_zeros(len(texts), length, texts[0].shape[1])
    mask = torch.zeros(len(texts), length, dtype=torch.bool, device=texts[0].device)
    for i, t in enumerate(texts):
        context[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return context, mask


def sampling_shift(flow: FlowOptions | Mapping | None, num_tokens: int) -> float:
    """The schedule shift matching training: the per-size resolution shift, else the constant one.

    flow: the training run's ``FlowOptions`` or a pipeline.json's ``flow`` dict, where a missing
    ``resolution_shift`` means off (exports written before it existed), missing anchors are
    ``FlowOptions``' defaults and the anchors' former names (base_tokens, max_tokens) are read.
    """
    if flow is None:
        return 1.0
    if isinstance(flow, Mapping):
        flow = {_FORMER_NAMES.get(k, k): v for k, v in flow.items()}
        flow = typed_options("pipeline.json flow", {"resolution_shift": False, **flow}, FlowOptions)
    return float(flow.shifts(num_tokens))


@torch.no_grad()
def generate_latents(
    dit,
    texts: Sequence[Tensor],
    empty_text: Tensor,
    latent_shape: Sequence[int],
    *,
    steps: int = 30,
    solver: str = "euler",
    cfg_scale: float = 5.0,
    shift: float = 1.0,
    seed: int = 0,
    cond: Tensor | None = None,
    image: Tensor | None = None,
    image_cfg_scale: float = 1.0,
) -> Tensor:
    """Integrate the flow ODE from noise to latents for each caption embedding.

    Args:
        dit: a WanDiT (or any model_fn(x, t, context, context_mask[, cond, image])).
        texts: B caption embeddings [L_i, D]; empty_text: [L0, D] for the CFG branch (a DiT
            with ``text_len`` pads both branches to it itself).
        solver: euler | heun (our schedule, ``timesteps_schedule(steps, shift)``) | unipc
            (diffusers' UniPC with its own Wan schedule, ``sample_unipc``).
        latent_shape: (C, T, h, w) of every sample (normalised latent space).
        cond: [B, C_cond, T, h, w] I2V condition (``vidgen.i2v.encode_condition``), or None.
        image: [B, Li, D_img] image-encoder tokens, or None. image_cfg_scale: guidance on
            the image (with cond; 1.0 keeps the image in every branch, as Wan2.1 does).
    Returns:
        [B, C, T, h, w] normalised latents (apply ``vae.denormalize`` before decoding).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
    param = next(dit.parameters())
    device = param.device
    noise = [
        torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(seed + i))
        for i in range(len(texts))
    ]
    x = torch.stack(noise).to(device)
    context, mask = pad_texts([t.to(device) for t in texts])
    uncond = empty_text.to(device)[None].expand(len(texts), -1, -1)
    if cond is None:
        model_fn = cfg_model_fn(
            dit, cond={"context": context, "context_mask": mask}, uncond={"context": uncond},
            scale=float(cfg_scale),
        )
    else:
        given = dict(cond=cond.to(device), image=None if image is None else image.to(device))
        dropped = dict(zip(("cond", "image"), drop_condition(given["cond"], given["image"])))
        model_fn = i2v_cfg_model_fn(
            dit, full={"context": context, "context_mask": mask, **given},
            image_only={"context": uncond, **given}, neither={"context": uncond, **dropped},
            text_scale=float(cfg_scale), image_scale=float(image_cfg_scale),
        )
    if solver == "unipc":  # diffusers' scheduler makes its own (Wan's) schedule
        return sample_unipc(model_fn, x, steps, shift).float()
    ts = timesteps_schedule(steps, shift, device=device)
    return SAMPLERS[solver](model_fn, x, ts).float()
