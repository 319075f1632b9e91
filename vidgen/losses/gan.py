"""Adversarial losses for VAE stage 3: hinge, LeCam, R1, adaptive weight, start gating.

Conventions (stated once, used everywhere):
- Logits are the raw patch outputs of the discriminator, any shape [B, 1, T', H', W'];
  every loss here is a *mean* over all logits (and over the batch), so its size does not
  depend on the clip size or the number of patches.
- The GAN term of the generator loss is composed by the caller as
      g_total = nll + gan_start_factor(step, start) * disc_weight * adaptive_weight(...) * hinge_g_loss(...)
  and the discriminator loss as
      d_total = gan_start_factor(step, start) * (hinge_d_loss(...) + lecam_weight * lecam(...)
                                                + r1_gamma / 2 * r1_penalty(...))
  with the weights (disc_weight, lecam_weight, r1_gamma) coming from the config.

References: taming-transformers (hinge + adaptive weight), Tseng et al. 2021 "Regularizing
GANs under limited data" (LeCam), Mescheder et al. 2018 (R1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidgen.utils.distributed import all_reduce_mean_

__all__ = [
    "hinge_d_loss",
    "hinge_g_loss",
    "LeCam",
    "gradient_penalty",
    "r1_penalty",
    "adaptive_weight",
    "gan_start_factor",
]


# --------------------------------------------------------------------------- hinge


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(G(z)))).

    logits_real, logits_fake: any shape (need not match). Returns a scalar. The 0.5 makes
    the loss 1.0 at the undecided point D = 0, as in taming-transformers.
    """
    loss_real = F.relu(1.0 - logits_real.float()).mean()
    loss_fake = F.relu(1.0 + logits_fake.float()).mean()
    return 0.5 * (loss_real + loss_fake)


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -mean D(G(z)). logits_fake: any shape -> scalar."""
    return -logits_fake.float().mean()


# --------------------------------------------------------------------------- LeCam


class LeCam(nn.Module):
    """LeCam regulariser (Tseng et al. 2021) with EMA anchors kept as buffers.

        R = mean relu(D(x) - ema_fake)^2 + mean relu(ema_real - D(G(z)))^2

    It pulls real logits down towards the running mean of fake logits and fake logits up
    towards the running mean of real logits, which keeps the discriminator from running
    away when data are scarce (the relu form of the authors' code: only logits beyond
    the anchor are penalised). Added to the discriminator loss with a small weight
    (e.g. 1e-3 .. 1e-2).

    The anchors `ema_real` / `ema_fake` are fp32 scalar buffers, so they are saved in the
    state_dict and a resumed run continues exactly. With torch.distributed initialised
    (and `sync_ranks=True`) `update` averages the logit means over ranks (on the device the
    backend serves); a non-finite mean on any rank leaves the anchors unchanged, so every rank
    holds the same anchors and the rank-0 checkpoint is valid for all.

    Usage per discriminator step (all ranks, in the same order):
        lecam.update(logits_real, logits_fake)
        loss_d = hinge_d_loss(...) + lecam_weight * lecam(logits_real, logits_fake)
    """

    def __init__(self, decay: float = 0.999, init: float = 0.0, sync_ranks: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"LeCam decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.sync_ranks = sync_ranks
        self.register_buffer("ema_real", torch.tensor(float(init)))
        self.register_buffer("ema_fake", torch.tensor(float(init)))

    def _apply(self, fn, *args, **kwargs):
        # Keep the anchors in fp32 even if the owner is cast with .half() / .bfloat16():
        # a 0.999 EMA in bf16 would stop moving (the update is below bf16 resolution).
        super()._apply(fn, *args, **kwargs)
        self.ema_real.data = self.ema_real.data.float()
        self.ema_fake.data = self.ema_fake.data.float()
        return self

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        """ema <- decay * ema + (1 - decay) * mean(logits), for real and fake (no grad)."""
        means = torch.stack(
            [logits_real.detach().float().mean(), logits_fake.detach().float().mean()]
        )
        if self.sync_ranks:
            all_reduce_mean_([means])
        means = means.to(self.ema_real.device)
        # A non-finite batch (skipped by the training step's guard) must not poison the
        # anchors for good: keep them where any rank saw NaN/Inf (no device sync).
        keep = ~torch.isfinite(means).all()
        self.ema_real.copy_(torch.where(keep, self.ema_real, self.ema_real.lerp(means[0], 1.0 - self.decay)))
        self.ema_fake.copy_(torch.where(keep, self.ema_fake, self.ema_fake.lerp(means[1], 1.0 - self.decay)))

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """logits_real, logits_fake: any shape -> scalar regulariser (differentiable in D)."""
        reg_real = F.relu(logits_real.float() - self.ema_fake).pow(2).mean()
        reg_fake = F.relu(self.ema_real - logits_fake.float()).pow(2).mean()
        return reg_real + reg_fake

    def extra_repr(self) -> str:
        return f"decay={self.decay}"


# --------------------------------------------------------------------------- R1


def gradient_penalty(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||d sum(logits) / d inputs||^2 (squared L2 per sample).

    logits: D(inputs), any shape; inputs: [B, ...] with requires_grad=True. The graph
    is kept (create_graph=True) so the penalty trains the discriminator.
    """
    if not inputs.requires_grad:
        raise ValueError(
            "gradient_penalty: `inputs` must require grad (call .requires_grad_() before D)"
        )
    (grad,) = torch.autograd.grad(logits.float().sum(), inputs, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


def r1_penalty(discriminator: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """R1 penalty: E_x ||grad_x D(x)||^2 on real clips (Mescheder et al. 2018).

    real: [B, C, T, H, W]. Runs its own forward of D on a detached copy of `real`.
    Returns a scalar without the gamma / 2 factor; the caller adds `r1_gamma / 2 * r1`.
    Under fp16 autocast with a GradScaler the penalty is not scaled; prefer bf16 or fp32.
    """
    real = real.detach().requires_grad_(True)
    return gradient_penalty(discriminator(real), real)


# --------------------------------------------------------------------------- weighting


def adaptive_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Balance the GAN term against the reconstruction term (taming-transformers).

        w = ||d nll / d W_last|| / (||d g / d W_last|| + eps), clamped to [0, max_weight]

    nll_loss, g_loss: scalars with a graph to `last_layer` (the weight of the decoder's
    final conv). Uses torch.autograd.grad with retain_graph=True, so the caller's later
    backward of the total loss still works and no .grad is touched. Returns a detached
    fp32 scalar tensor; multiply it by the configured discriminator weight.

    Only callable where gradients exist (training step). In validation, use a fixed
    weight instead: calling this under no_grad raises a ValueError.
    """
    if not (nll_loss.requires_grad and g_loss.requires_grad):
        raise ValueError(
            "adaptive_weight needs nll_loss and g_loss with a graph (training, grad enabled); "
            "in validation log the GAN term with a fixed weight instead"
        )
    (nll_grad,) = torch.autograd.grad(nll_loss, last_layer, retain_graph=True, allow_unused=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True, allow_unused=True)
    if nll_grad is None or g_grad is None:
        which = "nll_loss" if nll_grad is None else "g_loss"
        raise ValueError(
            f"adaptive_weight: {which} does not depend on `last_layer`; pass the decoder's last weight"
        )
    weight = nll_grad.float().norm() / (g_grad.float().norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


def gan_start_factor(step: int, start_step: int) -> float:
    """1.0 from `start_step` on (inclusive), 0.0 before: switches the GAN terms on late."""
    return 1.0 if step >= start_step else 0.0
