"""Every experiment composes, every group option composes, and CLI overrides land."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vidgen.utils.rundir import register_resolvers

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(
    str(p.relative_to(CONFIGS / "experiment").with_suffix(""))
    for p in (CONFIGS / "experiment").rglob("*.yaml")
)
REQUIRED = {"init_from": "model.init_from=/some/run"}


def _compose(overrides):
    register_resolvers()
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_resolves(experiment):
    cfg = _compose([f"experiment={experiment}", *REQUIRED.values()])
    cfg_no_hydra = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.resolve(cfg_no_hydra)  # every interpolation resolves
    assert cfg.model._target_ and cfg.data._target_ and cfg.trainer._target_
    assert cfg.task_name in str(cfg.paths.run_dir)


@pytest.mark.parametrize(
    "group,option",
    [(g.name, p.stem) for g in CONFIGS.iterdir() if g.is_dir() and g.name not in ("experiment",)
     for p in g.glob("*.yaml")],
)
def test_group_options_compose(group, option):
    cfg = _compose([f"{group}={option}"])
    assert cfg is not None


def test_cli_overrides_reach_the_model():
    cfg = _compose(["experiment=vae/stage1", "optim.lr=3e-4", "trainer.max_steps=10",
                    "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"])
    assert cfg.model.optim.lr == 3e-4  # model.optim interpolates the top-level optim group
    assert cfg.trainer.max_steps == 10 and cfg.trainer.devices == 8 and cfg.trainer.num_nodes == 2
    assert cfg.model.vae.temporal is False and cfg.data.train.mode == "image"


def test_later_stages_require_init_from():
    for stage in ("vae/stage2", "vae/stage3", "demo/vae_stage2", "demo/vae_stage3",
                  "dit/stage2", "demo/dit_stage2"):
        cfg = _compose([f"experiment={stage}"])
        assert cfg.model.require_init_from and cfg.model.init_from is None


def test_run_dir_is_shared_across_ranks(monkeypatch):
    monkeypatch.setenv("VIDGEN_RUN_ID", "job-1234")
    cfg = _compose(["experiment=vae/stage1"])
    assert str(cfg.paths.run_dir).endswith("vae_stage1/job-1234")


def test_slurm_launcher_config():
    cfg = _compose(["launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=4"])
    assert "submitit" in cfg.hydra.launcher._target_
    assert cfg.hydra.launcher.nodes == 4 and cfg.hydra.launcher.tasks_per_node == 8
