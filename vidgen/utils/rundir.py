"""One run directory per run, shared by every rank.

Hydra evaluates `${now:...}` in each process, so ranks started by torchrun or srun a second
apart would write to different folders. The run id therefore comes from what the launcher
shares with all ranks (an explicit VIDGEN_RUN_ID, SLURM's job id, torchrun's rendezvous id),
and only falls back to a timestamp for a single process. The id is exported so processes
that Lightning spawns later inherit it.
"""

from __future__ import annotations

import os
import time

from omegaconf import OmegaConf

RUN_ID_ENV = "VIDGEN_RUN_ID"


def run_id() -> str:
    """The id naming this run's folder; identical on every rank of one launch."""
    rid = os.environ.get(RUN_ID_ENV)
    if not rid:
        if os.environ.get("SLURM_JOB_ID"):
            rid = "slurm-" + os.environ["SLURM_JOB_ID"]
        elif os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
            rid = time.strftime("%Y-%m-%d_%H-%M-%S_") + os.environ["TORCHELASTIC_RUN_ID"][:8]
        else:
            rid = time.strftime("%Y-%m-%d_%H-%M-%S")
        os.environ[RUN_ID_ENV] = rid
    return rid


def register_resolvers() -> None:
    """`${run_id:}` for config files; idempotent."""
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", run_id, use_cache=True)
