"""Flow samplers as pure functions with one shared signature (k-diffusion style).

    ts = timesteps_schedule(50, shift=5.0)                    # [51], 1 -> 0
    model_fn = cfg_model_fn(model, cond={"context": c}, uncond={"context": u}, scale=5.0)
    x0 = sample_heun(model_fn, torch.randn(1, 16, 21, 60, 104), ts)

``model_fn(x, t, **extra_args)`` returns the velocity v = d x_t / dt = eps - x0 for
x: [B, ...] at times t: [B]; a ``WanDiT`` is such a function (extra_args: context,
context_mask). Integration runs from t = 1 (noise) to t = 0 (data).
``callback`` receives a dict: i, x (before the step), t, t_next, v, x0 (the predicted
clean sample x - t * v).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .flow import shift_timesteps

ModelFn = Callable[..., Tensor]


def timesteps_schedule(
    steps: int, shift: float = 1.0, device: torch.device | str | None = None
) -> Tensor:
    """[steps + 1] times from 1 to 0: uniform in t, then shifted (shift > 1 spends more steps near noise)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def _velocity(model_fn: ModelFn, x: Tensor, t: Tensor, extra_args: dict) -> Tensor:
    return model_fn(x, t.expand(x.shape[0]).to(x.device), **extra_args)


@torch.no_grad()
def sample_euler(
    model_fn: ModelFn,
    x: Tensor,
    ts: Tensor,
    extra_args: dict | None = None,
    callback: Callable | None = None,
) -> Tensor:
    """First-order Euler: x <- x + (t_next - t) * v(x, t). One model call per step."""
    extra_args = extra_args or {}
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        v = _velocity(model_fn, x, t, extra_args)
        if callback is not None:
            callback({"i": i, "x": x, "t": t, "t_next": t_next, "v": v, "x0": x - t * v})
        x = x + (t_next - t) * v
    return x


@torch.no_grad()
def sample_heun(
    model_fn: ModelFn,
    x: Tensor,
    ts: Tensor,
    extra_args: dict | None = None,
    callback: Callable | None = None,
) -> Tensor:
    """Second-order Heun (trapezoidal predictor-corrector). Two model calls per step.

    Unlike k-diffusion's sigma-space Heun, the last step to t = 0 is corrected too: the
    flow velocity stays finite at t = 0.
    """
    extra_args = extra_args or {}
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t
        v = _velocity(model_fn, x, t, extra_args)
        if callback is not None:
            callback({"i": i, "x": x, "t": t, "t_next": t_next, "v": v, "x0": x - t * v})
        x_pred = x + dt * v
        v_next = _velocity(model_fn, x_pred, t_next, extra_args)
        x = x + dt * (v + v_next) / 2
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun}  # integrate any given schedule ts


def unipc_scheduler(shift: float = 1.0):
    """diffusers' ``UniPCMultistepScheduler`` as ``WanPipeline`` uses it: flow prediction on flow
    sigmas shifted by ``shift`` (the Wan2.1 diffusers folders' scheduler_config.json; the
    rest are the scheduler's defaults: order 2, bh2, predict_x0, lower order at the end)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
        flow_shift=float(shift),
    )


@torch.no_grad()
def sample_unipc(
    model_fn: ModelFn,
    x: Tensor,
    steps: int,
    shift: float = 1.0,
    extra_args: dict | None = None,
    callback: Callable | None = None,
) -> Tensor:
    """Wan2.1's default sampler: UniPC (order 2) through diffusers' own scheduler, used as a
    library. It makes its own schedule from ``steps`` and ``shift`` (sigmas from 1 to 1/1000,
    shifted, then 0) and, as ``WanPipeline``, feeds the model the integer timesteps
    ``int(1000 * sigma)``, here as flow time ``t = timestep / 1000``. One model call per step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    extra_args = extra_args or {}
    scheduler = unipc_scheduler(shift)
    scheduler.set_timesteps(steps, device=x.device)
    sigmas = scheduler.sigmas
    for i, timestep in enumerate(scheduler.timesteps):
        t = timestep.float() / scheduler.config.num_train_timesteps
        v = _velocity(model_fn, x, t, extra_args)
        if callback is not None:
            callback({"i": i, "x": x, "t": t, "t_next": sigmas[i + 1], "v": v, "x0": x - t * v})
        x = scheduler.step(v, timestep, x, return_dict=False)[0]
    return x


SOLVERS = (*SAMPLERS, "unipc")  # every ``solver=`` generate_latents takes


def cfg_model_fn(model_fn: ModelFn, cond: dict, uncond: dict, scale: float) -> ModelFn:
    """Classifier-free guidance: v = v_uncond + scale * (v_cond - v_uncond).

    cond / uncond: keyword arguments of ``model_fn`` for the conditional and the
    unconditional branch (e.g. {"context": text_emb} and {"context": empty_caption_emb}).
    The branches run as two calls rather than one doubled batch: their text lengths may
    differ and two calls need no extra activation memory. scale == 1 skips the
    unconditional call.
    """

    def guided(x: Tensor, t: Tensor, **extra_args) -> Tensor:
        v_cond = model_fn(x, t, **extra_args, **cond)
        if scale == 1.0:
            return v_cond
        v_uncond = model_fn(x, t, **extra_args, **uncond)
        return v_uncond + scale * (v_cond - v_uncond)

    return guided


def i2v_cfg_model_fn(
    model_fn: ModelFn,
    full: dict,
    image_only: dict,
    neither: dict,
    text_scale: float,
    image_scale: float,
) -> ModelFn:
    """Guidance on text and image (InstructPix2Pix's two-scale form) for image-to-video:

        v = v_neither + image_scale * (v_image - v_neither) + text_scale * (v_full - v_image)

    full / image_only / neither: keyword arguments of the three branches (text and image;
    image with the empty caption; empty caption and dropped image). ``image_scale = 1`` is
    Wan2.1's guidance (the image stays in both branches; the ``neither`` call is skipped);
    both scales 1 is one call per step.
    """

    def guided(x: Tensor, t: Tensor, **extra_args) -> Tensor:
        v = model_fn(x, t, **extra_args, **full)
        if text_scale == 1.0 and image_scale == 1.0:
            return v
        v_image = model_fn(x, t, **extra_args, **image_only)
        v = v_image + text_scale * (v - v_image)
        if image_scale != 1.0:
            v = v + (image_scale - 1.0) * (v_image - model_fn(x, t, **extra_args, **neither))
        return v

    return guided
