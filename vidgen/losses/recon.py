"""VAE reconstruction losses: L1, KL to N(0, I), LPIPS per frame, and their weighted sum.

Reduction convention (the README quotes this):

    P = C*T*H*W, the number of input elements of one clip (channels included)
    l1    = mean over all elements of |x - recon|                      = sum_P |x - recon| / P
    kl    = sum over latent elements of KL(N(mu, sigma^2) || N(0, 1)) / P, averaged over the batch
    lpips = mean over the scored frames (and the batch) of LPIPS(x_t, recon_t)
    total = l1_weight * l1 + kl_weight * kl + lpips_weight * lpips

Every term is "per input element", so the weights keep the meaning they have in the summed
recipe of LDM / Wan2.1, where L1 and KL are summed per sample and the per-image LPIPS is
added at every pixel (so it is summed P times). Dividing that whole sum by P gives exactly
the terms above, so the published weights carry over unchanged:

    Wan2.1 paper (summed):  3 * L1_sum + 3e-6 * KL_sum + 3 * LPIPS * P
    vidgen (this module):   l1_weight=3, kl_weight=3e-6, lpips_weight=3   (the same loss / P)

i.e. the KL weight is a per-pixel ratio: kl_weight / l1_weight = 1e-6 in both conventions.
The overall 1/P factor only rescales the loss (Adam is invariant to it, up to its epsilon).
"""

from __future__ import annotations

import torch


def _as_video(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 4:  # images [B, C, H, W] are 1-frame clips
        return x.unsqueeze(2)
    if x.dim() != 5:
        raise ValueError(f"{name} must be [B, C, T, H, W] or [B, C, H, W], got {tuple(x.shape)}")
    return x


def l1_loss(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all elements. x, recon: [B, C, T, H, W] (or [B, C, H, W])."""
    if x.shape != recon.shape:
        raise ValueError(f"x and recon shapes differ: {tuple(x.shape)} vs {tuple(recon.shape)}")
    return (x - recon).abs().mean()


def kl_loss(mu: torch.Tensor, logvar: torch.Tensor, num_elements: int) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over a sample's latent, / num_elements, batch mean.

    mu, logvar: [B, z, ...]. num_elements: input elements per sample (C*T*H*W), see the module
    docstring; pass 1 to get the plain per-sample sum.
    """
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar shapes differ: {tuple(mu.shape)} vs {tuple(logvar.shape)}")
    if num_elements < 1:
        raise ValueError(f"num_elements must be >= 1, got {num_elements}")
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean() / num_elements


def lpips_loss(
    x: torch.Tensor,
    recon: torch.Tensor,
    lpips_fn: torch.nn.Module,
    frames: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean LPIPS over frames and batch. x, recon: [B, 3, T, H, W] in [-1, 1].

    frames: score at most this many frames per clip, the same random subset for every clip in
    the batch (drawn with `generator`); None scores every frame. Clips with T <= frames are
    scored on all their frames.
    """
    x, recon = _as_video(x, "x"), _as_video(recon, "recon")
    t = x.shape[2]
    if frames is not None:
        if frames < 1:
            raise ValueError(f"lpips_frames must be >= 1 or None (all frames), got {frames}")
        if frames < t:
            device = generator.device if generator is not None else "cpu"
            idx = torch.randperm(t, generator=generator, device=device)[:frames]
            idx = idx.sort().values.to(x.device)
            x, recon = x.index_select(2, idx), recon.index_select(2, idx)
    # [B, C, T', H, W] -> [B*T', C, H, W]: LPIPS scores images
    per_frame = lpips_fn(x.transpose(1, 2).flatten(0, 1), recon.transpose(1, 2).flatten(0, 1))
    return per_frame.mean()


def vae_loss(
    x: torch.Tensor,
    recon: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    l1_weight: float,
    kl_weight: float,
    lpips_weight: float,
    lpips_fn: torch.nn.Module | None = None,
    lpips_frames: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """total = l1_weight * l1 + kl_weight * kl + lpips_weight * lpips (reductions: module doc).

    x, recon: [B, C, T, H, W] (or [B, C, H, W]); mu, logvar: [B, z, t, h, w].
    lpips_fn is required when lpips_weight > 0 (e.g. vidgen.losses.lpips.build_lpips()).
    Returns (total, logs) with detached logs "l1", "kl", "lpips" (when computed) and "total".
    """
    x, recon = _as_video(x, "x"), _as_video(recon, "recon")
    if min(l1_weight, kl_weight, lpips_weight) < 0:
        raise ValueError(
            f"loss weights must be >= 0, got l1={l1_weight}, kl={kl_weight}, lpips={lpips_weight}"
        )
    l1 = l1_loss(x, recon)
    kl = kl_loss(mu, logvar, num_elements=x[0].numel())
    total = l1_weight * l1 + kl_weight * kl
    logs = {"l1": l1.detach(), "kl": kl.detach()}
    if lpips_weight > 0:
        if lpips_fn is None:
            raise ValueError(
                f"lpips_weight={lpips_weight} needs lpips_fn (vidgen.losses.lpips.build_lpips()); "
                "set lpips_weight=0 to train without it"
            )
        lp = lpips_loss(x, recon, lpips_fn, lpips_frames, generator)
        total = total + lpips_weight * lp
        logs["lpips"] = lp.detach()
    logs["total"] = total.detach()
    return total, logs
