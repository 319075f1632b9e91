"""Guards that keep NaN / Inf out of the weights.

The training loop checks each loss before backward (and, optionally, the gradients
before the optimiser step); on a non-finite value it skips the step instead of writing
NaN into the weights and the optimiser state. A few isolated skips are harmless (a bad
clip, an fp16 overflow); many in a row mean the run has diverged, and the guard stops it
with an error that says which loss and which knob to change.

    guard = NonFiniteGuard(max_consecutive=5)
    if not guard.check(loss, "g_loss", step=global_step):
        return None                       # Lightning: skip backward + optimiser step
    loss.backward()
    if not grads_finite(model):
        optimizer.zero_grad()             # skip the step, keep the weights clean
"""

from __future__ import annotations

import torch
from torch import nn

from vidgen.utils.distributed import all_ranks_true

__all__ = ["NonFiniteGuard", "grads_finite", "grads_finite_flag"]


def grads_finite_flag(module: nn.Module) -> torch.Tensor:
    """0-d bool tensor on the gradients' device: every existing .grad of `module` is
    finite (no device sync). Parameters without a gradient are ignored."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        param = next(module.parameters(), None)
        return torch.ones((), dtype=torch.bool, device=param.device if param is not None else None)
    device = grads[0].device
    return torch.stack([torch.isfinite(g).all().to(device) for g in grads]).all()


def grads_finite(module: nn.Module, sync_ranks: bool = False) -> bool:
    """True when every existing .grad of `module` is finite (one device sync in total).

    After DDP's all-reduce the gradients are the same on all ranks, so no sync is needed;
    with sharded gradients (FSDP) pass sync_ranks=True and call it on every rank.
    """
    flag = grads_finite_flag(module)
    return all_ranks_true(flag) if sync_ranks else bool(flag.item())


class NonFiniteGuard:
    """Counts non-finite losses and stops the run after too many in a row.

    Args:
        max_consecutive: how many consecutive non-finite checks of one loss are tolerated
            (skipped); the next one raises. 0 raises on the first.
        knob: the config key users should change, quoted in the error message.
        sync_ranks: whenever a torch.distributed process group is up (world size 1
            included), agree across ranks (a loss counts as non-finite if it is on any
            rank) so all ranks skip the same steps. Every rank must then call `check` for
            the same losses in the same order. The flag is reduced on the device the
            backend serves (CUDA under NCCL), see `vidgen.utils.distributed`.

    Counters are kept per loss name (the consecutive count of "d_loss" is not reset by a
    finite "g_loss"; `nonfinite[name]` totals each name), saved by `state_dict` so a
    resumed run keeps counting.
    """

    def __init__(
        self, max_consecutive: int = 5, knob: str = "max_consecutive", sync_ranks: bool = True
    ):
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.knob = knob
        self.sync_ranks = sync_ranks
        self.num_checks = 0  # all calls to check(), all names
        self.total_nonfinite = 0  # all non-finite checks, all names
        self.consecutive: dict[str, int] = {}  # per name, reset by a finite value
        self.nonfinite: dict[str, int] = {}  # per name, all non-finite checks

    def check(self, loss: torch.Tensor, name: str = "loss", step: int | None = None) -> bool:
        """True when `loss` (any shape) is finite everywhere; False means: skip this step.

        Raises RuntimeError when `name` has now been non-finite more than
        `max_consecutive` times in a row. Costs one device sync (.item()).
        """
        return self.check_flag(torch.isfinite(loss.detach()).all(), name, step)

    def check_flag(self, finite: torch.Tensor, name: str = "loss", step: int | None = None) -> bool:
        """`check` for a precomputed 0-d bool tensor (e.g. loss and gradients finite)."""
        self.num_checks += 1
        if self.sync_ranks:
            finite = all_ranks_true(finite)
        else:
            finite = bool(finite.item())
        if finite:
            self.consecutive[name] = 0
            return True
        self.total_nonfinite += 1
        self.nonfinite[name] = self.nonfinite.get(name, 0) + 1
        run = self.consecutive.get(name, 0) + 1
        self.consecutive[name] = run
        if run > self.max_consecutive:
            at = f" at global step {step}" if step is not None else ""
            raise RuntimeError(
                f"Loss '{name}' was non-finite (NaN/Inf){at} for {run} consecutive steps, "
                f"more than {self.knob}={self.max_consecutive} allows "
                f"({self.total_nonfinite} non-finite of {self.num_checks} checks so far). "
                f"The run has likely diverged: lower the learning rate or the GAN/KL weights, "
                f"check the data, or raise {self.knob} to tolerate longer streaks."
            )
        return False

    def state_dict(self) -> dict:
        return {
            "num_checks": self.num_checks,
            "total_nonfinite": self.total_nonfinite,
            "consecutive": dict(self.consecutive),
            "nonfinite": dict(self.nonfinite),
        }

    def load_state_dict(self, state: dict) -> None:
        self.num_checks = int(state["num_checks"])
        self.total_nonfinite = int(state["total_nonfinite"])
        self.consecutive = {str(k): int(v) for k, v in state["consecutive"].items()}
        self.nonfinite = {str(k): int(v) for k, v in state.get("nonfinite", {}).items()}

    def __repr__(self) -> str:
        return (
            f"NonFiniteGuard(max_consecutive={self.max_consecutive}, "
            f"nonfinite={self.total_nonfinite}/{self.num_checks})"
        )
