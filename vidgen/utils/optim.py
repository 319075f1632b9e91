"""Optimisers from config: ``optim.optimizer`` (and, for the VAE's discriminator,
``optim.disc_optimizer``) is a Hydra ``_partial_`` spec of any optimizer class, ``torch.optim``
or another importable one. The training module calls it with its parameters and the lr
(``optim.lr``, ``optim.disc_lr``); the schedule (``vidgen.utils.schedule``) multiplies that lr::

    optim:
      lr: 1.0e-4
      optimizer: {_target_: torch.optim.AdamW, _partial_: true, betas: [0.9, 0.999], eps: 1.0e-8}
      disc_lr: 1.0e-4
      disc_optimizer: null          # null: the same spec as optimizer

``configs/optim/adamw.yaml`` is the default, ``optim=adamw_gan`` gives the discriminator its
own betas (0.5, 0.9), as GAN discriminators are usually trained. The models' Hydra configs
are ``_recursive_: false``, so these specs reach the module as plain dicts (checkpoints keep
only builtins) and are built here, once the parameters exist.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate

from vidgen.utils.config import typed_options
from vidgen.utils.schedule import DECAYS

# The optimizer of a module built without one (by hand; configs/optim/adamw.yaml writes the same
# spec for Hydra runs). It is not the schema's default: a default dict would be merged into
# the spec a user gives (optim.optimizer._target_=torch.optim.SGD would keep AdamW's betas).
ADAMW = {"_target_": "torch.optim.AdamW", "_partial_": True, "betas": [0.9, 0.999], "eps": 1.0e-8,
         "weight_decay": 0.0}


@dataclass
class OptimOptions:
    """``optim``: the optimizers, their lrs, the lr schedule (vidgen/utils/schedule.py) and
    gradient clipping. ``configs/optim/<name>.yaml`` picks the optimizer specs."""

    lr: float | None = None            # required: the peak lr the schedule multiplies
    optimizer: Any = None              # a Hydra _partial_ spec; None: AdamW (ADAMW)
    disc_lr: float | None = None       # VAE stage 3's discriminator; None: lr
    disc_optimizer: Any = None         # None: the same spec as optimizer
    warmup_steps: int = 0
    decay: str = "constant"            # constant | cosine | linear: after warm-up, to min_lr_ratio * lr
    decay_steps: int | None = None     # the step the decay ends at (None: trainer.max_steps)
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None     # global gradient-norm clip; None: none

    def __post_init__(self):
        if self.lr is None:
            raise ValueError("optim.lr is required (the peak learning rate the schedule multiplies)")
        if self.optimizer is None:
            self.optimizer = dict(ADAMW)
        for key in ("optimizer", "disc_optimizer"):
            spec = getattr(self, key)
            if spec is not None and not (isinstance(spec, Mapping) and "_target_" in spec):
                raise ValueError(f"optim.{key} must be a Hydra spec with _target_ (e.g. torch.optim.AdamW), "
                                 f"got {spec!r}")
        if self.decay not in DECAYS:
            raise ValueError(f"optim.decay={self.decay!r}; valid: {', '.join(DECAYS)}")


# Keys of the flat AdamW config before optimizers became specs: where they live now.
_MOVED = {"betas": "optim.optimizer.betas", "weight_decay": "optim.optimizer.weight_decay",
          "eps": "optim.optimizer.eps"}


def optim_options(given: Mapping | OptimOptions | None) -> OptimOptions:
    """The ``optim`` config, typed; unknown keys, wrong types, a missing lr or an optimizer spec
    without ``_target_`` are errors naming the key."""
    moved = sorted(set(given or {}) & set(_MOVED)) if isinstance(given, Mapping) or given is None else []
    if moved:
        raise ValueError(
            f"optim.{moved[0]} is a setting of the optimizer now: set {_MOVED[moved[0]]} "
            f"(optim.optimizer is a Hydra _partial_ spec, configs/optim/adamw.yaml)"
        )
    return typed_options("optim", given, OptimOptions)


def build_optimizer(spec: Mapping, params: Iterable[torch.nn.Parameter], lr: float,
                    name: str = "optim.optimizer") -> torch.optim.Optimizer:
    """``spec`` (a ``_partial_`` optimizer spec) called with ``params`` and ``lr``; a keyword the
    optimizer does not take is an error naming ``name`` and the keyword."""
    spec = {k: v for k, v in spec.items() if k != "lr"}  # lr is optim.lr's, schedules scale it
    make = instantiate({**spec, "_partial_": True}, _convert_="all")
    try:
        return make(params, lr=lr)
    except TypeError as exn:
        raise ValueError(f"{name} ({spec['_target_']}) does not take its settings: {exn}") from exn
