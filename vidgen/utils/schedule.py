"""Learning-rate schedules: linear warm-up, then constant, cosine or linear decay.

The factor multiplies `optim.lr` (a `torch.optim.lr_scheduler.LambdaLR` lambda of the
optimizer step)::

    warm-up   step < W:        (step + 1) / W
    constant  afterwards:      1
    cosine    W <= step < D:   r + (1 - r) * (1 + cos(pi * (step - W) / (D - W))) / 2
    linear    W <= step < D:   r + (1 - r) * (1 - (step - W) / (D - W))
              step >= D:       r

with W = `warmup_steps`, D = `decay_steps` (the trainer's `max_steps` when null) and
r = `min_lr_ratio`. A resumed run gets the same factor at the same step: it is a pure
function of the step count, which the scheduler's state carries.
"""

from __future__ import annotations

import math
from collections.abc import Callable

DECAYS = ("constant", "cosine", "linear")


def lr_lambda(
    warmup_steps: int = 0,
    decay: str = "constant",
    decay_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> Callable[[int], float]:
    """The lr factor of each optimizer step (see the module docstring)."""
    if decay not in DECAYS:
        raise ValueError(f"optim.decay={decay!r}; choose from {DECAYS}")
    if warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps={warmup_steps} must be >= 0")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio={min_lr_ratio} must be in [0, 1]")
    if decay != "constant" and (decay_steps is None or decay_steps <= warmup_steps):
        raise ValueError(
            f"optim.decay={decay!r} needs decay_steps (or trainer.max_steps) > warmup_steps="
            f"{warmup_steps}, got {decay_steps}"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (decay_steps - warmup_steps))
        shape = (1 + math.cos(math.pi * progress)) / 2 if decay == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return factor


def optim_lr_lambda(o, max_steps: int | None) -> Callable[[int], float]:
    """`lr_lambda` from the `optim` settings (`vidgen.utils.optim.OptimOptions`): warmup_steps,
    decay, decay_steps (None: max_steps, as `trainer_max_steps` gives it: None when the run has
    no step limit), min_lr_ratio."""
    return lr_lambda(
        warmup_steps=o.warmup_steps,
        decay=o.decay,
        decay_steps=max_steps if o.decay_steps is None else o.decay_steps,
        min_lr_ratio=o.min_lr_ratio,
    )


def trainer_max_steps(module) -> int | None:
    """The attached Lightning trainer's `max_steps`, or None (no trainer, or -1: no limit)."""
    trainer = getattr(module, "_trainer", None)
    steps = getattr(trainer, "max_steps", None)
    return steps if steps is not None and steps > 0 else None
