"""Rectified flow (flow matching with straight paths), as pure functions.

Time runs from t = 0 (data x0) to t = 1 (noise eps):

    x_t = (1 - t) * x0 + t * eps          d x_t / dt = eps - x0  (the model's target)

Training samples t per sample (logit-normal or uniform), optionally shifted towards
noise with ``t' = shift * t / (1 + (shift - 1) * t)``; larger samples (more tokens) need
more shift because their signal survives more noise (SD3, section 5.3.2), see
``resolution_shift``. The loss is the squared error to eps - x0, averaged per sample,
then weighted and averaged over samples, so a packed batch of differently sized samples
weighs each sample equally, as a padded batch does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

TIMESTEP_MODES = ("logit_normal", "uniform")


@dataclass
class FlowOptions:
    """``model.flow``: how training draws t, and the shift sampling uses to match it.

    The shift anchors say that a sample of ``base_shift_tokens`` patch tokens takes
    ``base_shift`` and one of ``max_shift_tokens`` takes ``max_shift`` (``resolution_shift``):
    1.0 for a 256-token image (256x256 px through an 8x VAE and 2x2 patches), 5.0 (Wan's
    sampling shift) for an 81-frame 480x832 clip (21 x 30 x 52 = 32760 tokens). (The packing
    budgets model.max_tokens and data.train.max_tokens are another thing.)
    """

    timestep_mode: str = "logit_normal"  # logit_normal | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0                   # the constant shift, used when resolution_shift is false
    resolution_shift: bool = True        # per-sample shift from its token count (SD3 5.3.2)
    base_shift_tokens: int = 256
    base_shift: float = 1.0
    max_shift_tokens: int = 32760
    max_shift: float = 5.0

    def __post_init__(self):
        if self.timestep_mode not in TIMESTEP_MODES:
            raise ValueError(f"model.flow.timestep_mode={self.timestep_mode!r}; valid: {', '.join(TIMESTEP_MODES)}")
        if self.shift <= 0:
            raise ValueError(f"model.flow.shift={self.shift}; it must be > 0")
        if not (0 < self.base_shift_tokens < self.max_shift_tokens) or self.base_shift <= 0 or self.max_shift <= 0:
            raise ValueError(
                "model.flow: need 0 < base_shift_tokens < max_shift_tokens and positive shifts, got "
                f"base_shift_tokens={self.base_shift_tokens}, max_shift_tokens={self.max_shift_tokens}, "
                f"base_shift={self.base_shift}, max_shift={self.max_shift}"
            )

    def shifts(self, num_tokens: int | Sequence[int] | Tensor) -> Tensor:
        """The shift of samples of ``num_tokens`` tokens: per size, or the constant one."""
        if self.resolution_shift:
            return resolution_shift(num_tokens, self.base_shift_tokens, self.base_shift,
                                    self.max_shift_tokens, self.max_shift)
        return torch.full_like(torch.as_tensor(num_tokens, dtype=torch.float32), self.shift)


def _expand_like(t: Tensor, x: Tensor) -> Tensor:
    """t: [B] (or [N] per token) -> [B, 1, ..., 1] broadcastable against x: [B, ...]."""
    if t.ndim > x.ndim or t.shape != x.shape[: t.ndim]:
        raise ValueError(
            f"t of shape {tuple(t.shape)} does not match the leading dims of x {tuple(x.shape)}"
        )
    return t.reshape(*t.shape, *([1] * (x.ndim - t.ndim)))


def interpolate(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t eps. x0, eps: [B, ...]; t: [B] (or [N] for packed tokens [N, P])."""
    t = _expand_like(t, x0).to(x0.dtype)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """The flow velocity d x_t / dt = eps - x0 the model learns to predict."""
    return eps - x0


def shift_timesteps(t: Tensor, shift: float | Tensor) -> Tensor:
    """t' = shift * t / (1 + (shift - 1) * t); shift > 1 moves mass towards noise (t = 1).

    Maps 0 -> 0 and 1 -> 1 and multiplies the noise-to-signal ratio t / (1 - t) by
    ``shift``: t'/(1 - t') = shift * t/(1 - t).
    ``shift`` may be a float or a tensor broadcastable against t (per-sample shifts).
    """
    shift = torch.as_tensor(shift, dtype=t.dtype, device=t.device)
    if bool((shift <= 0).any()):
        raise ValueError(f"shift must be > 0, got {shift.tolist()}")
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(
    num_tokens: int | Sequence[int] | Tensor,
    base_tokens: int = FlowOptions.base_shift_tokens,
    base_shift: float = FlowOptions.base_shift,
    max_tokens: int = FlowOptions.max_shift_tokens,
    max_shift: float = FlowOptions.max_shift,
) -> Tensor:
    """Timestep shift for samples of ``num_tokens`` patch tokens.

    log(shift) is interpolated linearly in log(num_tokens) between the anchors
    (base_tokens, base_shift) and (max_tokens, max_shift), and clamped to them so that
    very long clips do not get an unbounded shift. SD3's rule shift = sqrt(m / n) is the
    same power law with exponent 1/2. The default anchors are ``FlowOptions``'.

    Returns:
        [S] float32 shifts (0-d for a scalar input).
    """
    if not (0 < base_tokens < max_tokens) or base_shift <= 0 or max_shift <= 0:
        raise ValueError(
            f"need 0 < base_tokens < max_tokens and positive shifts, got base_tokens={base_tokens}, "
            f"max_tokens={max_tokens}, base_shift={base_shift}, max_shift={max_shift}"
        )
    n = torch.as_tensor(num_tokens, dtype=torch.float32)
    if bool((n <= 0).any()):
        raise ValueError(f"num_tokens must be positive, got {n.tolist()}")
    frac = (
        (n.log() - math.log(base_tokens)) / (math.log(max_tokens) - math.log(base_tokens))
    ).clamp(0, 1)
    return torch.exp(math.log(base_shift) + frac * (math.log(max_shift) - math.log(base_shift)))


def sample_timesteps(
    n: int,
    mode: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float | Tensor = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw n training times in (0, 1).

    logit_normal: t = sigmoid(mean + std * N(0, 1)) (SD3's default: most samples in the
    middle where the velocity is hardest to predict); uniform: t ~ U(0, 1). Then shifted by
    ``shift`` (float, or [n] per-sample shifts from ``resolution_shift``).
    """
    if mode not in TIMESTEP_MODES:
        raise ValueError(f"unknown timestep mode {mode!r}; valid: {', '.join(TIMESTEP_MODES)}")
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    if mode == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    else:
        t = torch.rand(n, generator=generator, device=device)
    if isinstance(shift, Tensor):
        shift = shift.to(device)
        if shift.ndim and shift.shape != (n,):
            raise ValueError(f"per-sample shift must have shape [{n}], got {tuple(shift.shape)}")
    return shift_timesteps(t, shift)


def flow_loss(
    pred: Tensor | Sequence[Tensor],
    x0: Tensor | Sequence[Tensor],
    eps: Tensor | Sequence[Tensor],
    weight: Tensor | None = None,
) -> Tensor:
    """Mean over samples of weight_i * mean_over_elements((pred_i - (eps_i - x0_i))**2).

    pred, x0, eps: [B, ...] tensors, or equal-length lists of per-sample tensors of any
    shapes (packed samples). weight: [B] per-sample loss weights (default 1). fp32 math.
    """
    if isinstance(pred, Tensor):
        if pred.shape != x0.shape or pred.shape != eps.shape:
            raise ValueError(
                f"shapes differ: pred {tuple(pred.shape)}, x0 {tuple(x0.shape)}, eps {tuple(eps.shape)}"
            )
        err = (pred.float() - velocity_target(x0.float(), eps.float())) ** 2
        per_sample = err.flatten(1).mean(1)
    else:
        if not len(pred) == len(x0) == len(eps) or not pred:
            raise ValueError(
                f"need equal, non-zero numbers of samples, got {len(pred)}, {len(x0)}, {len(eps)}"
            )
        per_sample = torch.stack(
            [
                ((p.float() - velocity_target(a.float(), e.float())) ** 2).mean()
                for p, a, e in zip(pred, x0, eps)
            ]
        )
    if weight is None:
        return per_sample.mean()
    if weight.shape != per_sample.shape:
        raise ValueError(
            f"weight must be [{per_sample.numel()}] (one per sample), got {tuple(weight.shape)}"
        )
    return (per_sample * weight.to(per_sample)).mean()


def token_flow_loss(pred: Tensor, x0: Tensor, eps: Tensor, token_weight: Tensor) -> Tensor:
    """sum_n token_weight_n * mean_d((pred_n - (eps_n - x0_n))**2) over tokens [N, D] (fp32).

    With the weights ``PackedBatch.loss_weights()`` this is ``flow_loss`` of the unpacked
    samples; on a slice of the tokens (context parallelism) it is that slice's share of it.
    """
    if not pred.shape == x0.shape == eps.shape or pred.ndim != 2 or token_weight.shape != pred.shape[:1]:
        raise ValueError(f"need pred, x0, eps [N, D] and token_weight [N], got {tuple(pred.shape)}, "
                         f"{tuple(x0.shape)}, {tuple(eps.shape)}, {tuple(token_weight.shape)}")
    err = (pred.float() - velocity_target(x0.float(), eps.float())) ** 2
    return (err.mean(-1) * token_weight.float()).sum()
