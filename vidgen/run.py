"""Hydra-free training entry: build everything from a composed config and fit.

`train.py` is the `@hydra.main` wrapper; tests call `train(cfg)` with a config from Hydra's
compose API. Ranks: under DDP every rank runs this function; only rank 0 writes the config.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from vidgen.diffusion import FlowOptions
from vidgen.lit.dit import ValOptions
from vidgen.lit.vae import GanOptions, LossOptions
from vidgen.models.dit.lora import LoraOptions
from vidgen.models.dit.parallelize import FsdpOptions
from vidgen.utils.checkpoint import AtomicCheckpointIO, load_checkpoint_file, resolve_ckpt_path
from vidgen.utils.optim import OptimOptions
from vidgen.utils.rundir import register_resolvers

log = logging.getLogger(__name__)

# The typed settings (vidgen/utils/config.py), as configs/ names them: schema/<name>, which the
# model and optim YAMLs (and the experiments that switch on LoRA or the GAN) take as defaults.
SCHEMAS = {"flow": FlowOptions, "dit_val": ValOptions, "fsdp": FsdpOptions, "lora": LoraOptions,
           "vae_loss": LossOptions, "gan": GanOptions, "optim": OptimOptions}

# Lightning suggests keeping pre-step weights for manual optimisation (the VAE); our
# checkpoints are meant to hold the post-step state that resume continues from.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def register_configs() -> None:
    """Everything configs/ needs before Hydra composes it: the ``${run_id:}`` resolver and the
    ``schema/*`` structured configs. Idempotent; train.py and the config tests call it."""
    register_resolvers()
    store = ConfigStore.instance()
    for name, cls in SCHEMAS.items():
        store.store(group="schema", name=name, node=cls)


def _instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a group like `callbacks` or `logger` that has a _target_."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


@rank_zero_only
def _save_config(cfg: DictConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    log.info("run folder: %s", run_dir)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit `cfg.model` on `cfg.data` with `cfg.trainer`; returns the final logged metrics."""
    OmegaConf.resolve(cfg)  # resolve the run id once, before anything forks
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    run_dir = Path(cfg.paths.run_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), str(run_dir), cfg.paths.task_dir)
    if ckpt_path and not cfg.trust_checkpoint:  # refuse code before any strategy reads the file:
        load_checkpoint_file(ckpt_path, mmap=True)  # FSDP's full-file reader unpickles in full
    _save_config(cfg, run_dir)

    cp = cfg.get("context_parallel", 1)
    if cp != 1 and "context_parallel" not in cfg.model:
        raise ValueError(f"context_parallel={cp}: only the DiT (model=dit) splits sequences across "
                         f"ranks; {cfg.model.get('_target_')} trains with data parallelism only")
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    trainer = instantiate(
        cfg.trainer,
        callbacks=_instantiate_group(cfg.get("callbacks")),
        logger=_instantiate_group(cfg.get("logger")) or False,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO(trust=cfg.trust_checkpoint)],
    )
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=not cfg.trust_checkpoint)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
