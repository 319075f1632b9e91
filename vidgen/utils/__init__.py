"""Training utilities that know nothing of Hydra or Lightning: weight EMA, NaN/Inf guards."""

from vidgen.utils.ema import EMA
from vidgen.utils.guards import NonFiniteGuard, grads_finite

__all__ = ["EMA", "NonFiniteGuard", "grads_finite"]
