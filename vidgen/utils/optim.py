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

import torch
from hydra.utils import instantiate

from vidgen.utils.config import checked_options

ADAMW = {"_target_": "torch.optim.AdamW", "_partial_": True, "betas": [0.9, 0.999], "eps": 1.0e-8,
         "weight_decay": 0.0}

# Every optim key and its default when a module is built without Hydra (configs/optim/*.yaml
# set them all). lr has none: it must be given.
OPTIM_DEFAULTS = {
    "lr": None,
    "optimizer": ADAMW,
    "disc_lr": None,           # None: lr
    "disc_optimizer": None,    # None: optimizer
    "warmup_steps": 0,
    "decay": "constant",
    "decay_steps": None,
    "min_lr_ratio": 0.0,
    "grad_clip": None,
}

# Keys of the flat AdamW config before optimizers became specs: where they live now.
_MOVED = {"betas": "optim.optimizer.betas", "weight_decay": "optim.optimizer.weight_decay",
          "eps": "optim.optimizer.eps"}


def optim_options(given: Mapping | None) -> dict:
    """The ``optim`` config with its defaults; unknown keys, a missing lr or an optimizer spec
    without ``_target_`` are errors naming the key."""
    given = dict(given or {})
    moved = sorted(set(given) & set(_MOVED))
    if moved:
        raise ValueError(
            f"optim.{moved[0]} is a setting of the optimizer now: set {_MOVED[moved[0]]} "
            f"(optim.optimizer is a Hydra _partial_ spec, configs/optim/adamw.yaml)"
        )
    o = checked_options("optim", given, OPTIM_DEFAULTS)
    if o["lr"] is None:
        raise ValueError("optim.lr is required (the peak learning rate the schedule multiplies)")
    for key in ("optimizer", "disc_optimizer"):
        spec = o[key]
        if spec is not None and not (isinstance(spec, Mapping) and "_target_" in spec):
            raise ValueError(f"optim.{key} must be a Hydra spec with _target_ (e.g. torch.optim.AdamW), "
                             f"got {spec!r}")
    return o


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
