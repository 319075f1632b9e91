"""Exponential moving average (EMA) of model weights.

    shadow <- d * shadow + (1 - d) * param          (fp32, after each optimiser step)

EMA is a plain object, not an nn.Module, on purpose: its shadow copies must not show up in
`model.parameters()` (optimisers), be broadcast by DDP, or be sharded by FSDP. The training
glue saves `ema.state_dict()` in the checkpoint next to the model.

What is tracked:
- Parameters with `requires_grad=True` at construction: fp32 shadow copies, averaged.
- Parameters frozen at construction are skipped: they do not change, so the model's own
  values already are their average, and we save the memory. (A parameter unfrozen later
  is not tracked; build the EMA after the final freezing decisions.)
- Persistent buffers (e.g. norm statistics, step counters): copied as they are at each
  update, so the EMA state is self-contained. Non-persistent buffers (caches, RoPE
  tables) are left alone.

Decay schedule (`decay_at`): `decay` is per optimiser step. During the first
`warmup_steps` steps the averaging horizon h = 1 / (1 - d) grows linearly from 1 step
(d = 0: the shadow copies the weights) to 1 / (1 - decay), so the EMA is not dragged
towards the random init:
    h(step) = 1 + (1 / (1 - decay) - 1) * min(step / warmup_steps, 1),   d = 1 - 1 / h.
With `update_every = k > 1` an update applies d ** k, so the horizon in optimiser steps
does not depend on k.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["EMA"]


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """named_buffers() minus those registered with persistent=False."""
    for mod_name, mod in model.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{name}" if mod_name else name), buf


class EMA:
    """fp32 EMA of a model's trainable parameters (plus copies of its persistent buffers).

    Args:
        model: the model whose weights are averaged; later calls must pass a model with
            the same parameter names (the same object, typically).
        decay: target decay per optimiser step (0.999 ~ 1000-step horizon).
        warmup_steps: steps over which the horizon ramps up from 1 (see module doc);
            0 uses `decay` from the first step.
        update_every: update only on steps divisible by this (saves time on big models).
        device: where the shadow copies live (default: next to each parameter); "cpu"
            saves accelerator memory at the cost of a device-to-host copy per update.

    Typical use:
        ema = EMA(model, decay=0.999, warmup_steps=1000)
        ...after optimizer.step():  ema.update(model, global_step)
        with ema.swap_into(model):  validate(model)
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.999,
        warmup_steps: int = 0,
        update_every: int = 1,
        device: torch.device | str | None = None,
    ):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if warmup_steps < 0 or update_every < 1:
            raise ValueError(
                f"need warmup_steps >= 0 and update_every >= 1, got {warmup_steps}, {update_every}"
            )
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.update_every = update_every
        self.device = torch.device(device) if device is not None else None
        self.num_updates = 0
        self.last_step: int | None = None
        with torch.no_grad():
            self.shadow: dict[str, torch.Tensor] = {
                name: p.detach().to(device=self.device or p.device, dtype=torch.float32, copy=True)
                for name, p in model.named_parameters()
                if p.requires_grad
            }
            self.buffers: dict[str, torch.Tensor] = {
                name: b.detach().to(device=self.device or b.device, copy=True)
                for name, b in _persistent_buffers(model)
            }
        if not self.shadow:
            raise ValueError("EMA: the model has no parameter with requires_grad=True to average")

    # ------------------------------------------------------------------ schedule

    def decay_at(self, step: int) -> float:
        """Decay applied by an update at optimiser step `step` (per-update, incl. update_every)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            horizon = 1.0 + (1.0 / (1.0 - self.decay) - 1.0) * max(step, 0) / self.warmup_steps
            d = 1.0 - 1.0 / horizon
        else:
            d = self.decay
        return d**self.update_every

    # ------------------------------------------------------------------ update

    def _check_names(self, params: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.shadow if n not in params]
        if missing:
            raise KeyError(
                f"EMA: model lacks tracked parameters {missing[:5]} (wrapped/renamed model?)"
            )

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float | None:
        """Average the model's current weights into the shadow; call after optimizer.step().

        step: the global optimiser step (drives warm-up and update_every).
        Returns the decay used, or None when this step is skipped by update_every.
        """
        if step % self.update_every != 0:
            return None
        d = self.decay_at(step)
        params = dict(model.named_parameters())
        self._check_names(params)
        names = list(self.shadow)
        shadows = [self.shadow[n] for n in names]
        news = [
            params[n].detach().to(device=s.device, dtype=torch.float32)
            for n, s in zip(names, shadows)
        ]
        # One fused kernel per device for all tensors: shadow += (1 - d) * (param - shadow).
        torch._foreach_lerp_(shadows, news, 1.0 - d)
        for name, buf in _persistent_buffers(model):
            if name in self.buffers:
                self.buffers[name].copy_(buf)
        self.num_updates += 1
        self.last_step = step
        return d

    # ------------------------------------------------------------------ apply

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's tracked parameters and persistent buffers with the EMA ones."""
        params = dict(model.named_parameters())
        self._check_names(params)
        for name, s in self.shadow.items():
            params[name].copy_(s)  # copy_ casts fp32 -> the parameter's dtype and device
        buffers = dict(_persistent_buffers(model))
        for name, b in self.buffers.items():
            if name in buffers:
                buffers[name].copy_(b)

    @contextmanager
    def swap_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load EMA weights into `model` (e.g. for validation).

        The original parameters and buffers are restored on exit, also when the body
        raises. Costs one extra copy of the tracked weights while inside.
        """
        with torch.no_grad():
            params = dict(model.named_parameters())
            buffers = dict(_persistent_buffers(model))
            backup_p = {n: params[n].detach().clone() for n in self.shadow if n in params}
            backup_b = {n: buffers[n].detach().clone() for n in self.buffers if n in buffers}
        try:
            self.copy_to(model)
            yield model
        finally:
            with torch.no_grad():
                for n, v in backup_p.items():
                    params[n].copy_(v)
                for n, v in backup_b.items():
                    buffers[n].copy_(v)

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        """Everything needed to resume exactly (tensors are the live ones, not copies)."""
        return {
            "shadow": self.shadow,
            "buffers": self.buffers,
            "num_updates": self.num_updates,
            "last_step": self.last_step,
            "decay": self.decay,
            "warmup_steps": self.warmup_steps,
            "update_every": self.update_every,
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a state from `state_dict()` into this EMA (strict on names and shapes).

        Tensors are copied into the existing shadow (keeping its device and fp32 dtype).
        The schedule (decay, warmup_steps, update_every) stays as constructed: the current
        config wins over the saved values, so a resumed run may change them on purpose.
        """
        for kind in ("shadow", "buffers"):
            mine, theirs = getattr(self, kind), state[kind]
            if set(mine) != set(theirs):
                extra, missing = sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs))
                raise KeyError(
                    f"EMA {kind} mismatch: unexpected {extra[:5]}, missing {missing[:5]}"
                )
            for name, t in theirs.items():
                if t.shape != mine[name].shape:
                    raise ValueError(
                        f"EMA {kind} {name}: shape {tuple(t.shape)} != {tuple(mine[name].shape)}"
                    )
                mine[name].copy_(t)
        self.num_updates = int(state["num_updates"])
        self.last_step = state["last_step"]

    def __repr__(self) -> str:
        n = sum(t.numel() for t in self.shadow.values())
        return (
            f"EMA(decay={self.decay}, warmup_steps={self.warmup_steps}, "
            f"update_every={self.update_every}, tracked={n / 1e6:.2f}M params, updates={self.num_updates})"
        )


class ValidateWithEMA:
    """LightningModule mixin: validation epochs run on the EMA weights.

    The module sets ``self.ema`` (an ``EMA`` or None) and defines ``ema_model()``, the
    module the EMA tracks; the raw weights come back when the validation epoch ends.
    """

    _ema_ctx = None

    def ema_model(self) -> nn.Module:
        raise TypeError(f"{type(self).__name__} must define ema_model() to use ValidateWithEMA")

    def on_validation_epoch_start(self) -> None:
        if self.ema is not None:
            self._ema_ctx = self.ema.swap_into(self.ema_model())
            self._ema_ctx.__enter__()

    def on_validation_epoch_end(self) -> None:
        ctx, self._ema_ctx = self._ema_ctx, None
        if ctx is not None:
            ctx.__exit__(None, None, None)
