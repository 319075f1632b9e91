"""Every experiment composes, every group option composes, and CLI overrides land."""

import json
import tarfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vidgen.run import register_configs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(
    str(p.relative_to(CONFIGS / "experiment").with_suffix(""))
    for p in (CONFIGS / "experiment").rglob("*.yaml")
)


def _compose(overrides):
    register_configs()
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


LATENT_EXPERIMENTS = {e for e in EXPERIMENTS if "dit" in e}
MIXTURE_EXPERIMENTS = {"demo/dit_lora"}  # data.train.sources, not shards
# parameter counts of the DiT presets (Wan2.1 1.3B / 14B, text_dim 4096)
PRESET_PARAMS = {"1.3B": 1.42e9, "14B": 14.3e9}


def _resolved(overrides):
    """The composed config (hydra node dropped) with every interpolation resolved."""
    cfg = _compose(overrides)
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.resolve(cfg)
    return cfg


def _instantiate_model(cfg):
    """The LightningModule; DiTs on the meta device (the 14B preset allocates nothing)."""
    if "dit" not in cfg.model:
        return instantiate(cfg.model)
    with torch.device("meta"):
        return instantiate(cfg.model)


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """A minimal latent folder (what LatentDataModule reads at construction)."""
    from safetensors.torch import save_file

    from vidgen.data.latents import EMPTY_NAME, FORMAT, INFO_NAME

    root = tmp_path_factory.mktemp("latents")
    info = {"format": FORMAT, "vae": "vae", "vae_config": {"z_dim": 16}, "text_encoder": "minilm",
            "text_dim": 384, "buckets": ["17x256x256"]}
    (root / INFO_NAME).write_text(json.dumps(info))
    save_file({"text": torch.zeros(1, 384)}, root / EMPTY_NAME)
    tarfile.open(root / "shard-000000.tar", "w").close()  # construction reads no sample
    return root


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_resolves_and_instantiates(experiment, latents):
    data = [f"data.train.shards={latents}", f"data.val.shards={latents}"] if experiment in LATENT_EXPERIMENTS else []
    if experiment in MIXTURE_EXPERIMENTS:  # a weighted mixture of latent folders instead of one
        data = [f"data.train.sources=[{{name: a, shards: {latents}, weight: 1.0}}]", "data.train.shards=null",
                f"data.val.shards={latents}"]
    cfg = _resolved([f"experiment={experiment}", "model.require_init_from=false",
                     "model.loss.lpips_random_backbone=true" if "vae" in experiment else "seed=42", *data])
    assert cfg.task_name in str(cfg.paths.run_dir) and cfg.task_name.replace("demo_", "") in experiment.replace("/", "_").replace("demo_", "")
    model = _instantiate_model(cfg)
    datamodule = instantiate(cfg.data)
    if experiment in LATENT_EXPERIMENTS:
        assert type(model).__name__ == "DiTModule" and type(datamodule).__name__ == "LatentDataModule"
        size = cfg.model.size
        n = sum(p.numel() for name, p in model.dit.named_parameters() if ".lora_" not in name)
        if cfg.model.lora:  # the adapters only train: rank x (in + out) per adapted linear
            from vidgen.models.dit.lora import adapted_modules

            modules = dict(model.dit.named_modules())
            expected = sum(cfg.model.lora.rank * (modules[m].in_features + modules[m].out_features)
                           for m in adapted_modules(model.dit))
            trainable = sum(p.numel() for p in model.dit.parameters() if p.requires_grad)
            assert trainable == expected and len(adapted_modules(model.dit)) == 10 * model.dit.config["num_layers"]
        if size in PRESET_PARAMS and not model.dit.cond_channels:
            assert abs(n / PRESET_PARAMS[size] - 1) < 0.02, (size, n)
        if size in PRESET_PARAMS:  # exactly diffusers' WanTransformer3DModel of that config (I2V too)
            diffusers = pytest.importorskip("diffusers")
            from vidgen.tools.convert_dit import config_to_diffusers

            config = {k: v for k, v in config_to_diffusers(model.dit.config).items() if k != "_class_name"}
            with torch.device("meta"):
                theirs = diffusers.WanTransformer3DModel(**config)
            assert n == sum(p.numel() for p in theirs.parameters()), experiment
    else:
        assert type(model).__name__ == "VAEModule" and type(datamodule).__name__ == "VideoDataModule"
        assert model.vae.config["temporal"] is (cfg.data.train.mode == "video")
        assert (model.disc is not None) == ("stage3" in experiment)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    loggers = [instantiate(c) for c in cfg.logger.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, default_root_dir="unused")
    assert trainer.max_steps == cfg.trainer.max_steps > 0
    every = callbacks[0]._every_n_train_steps
    assert every == cfg.data.train.batches_per_epoch, "checkpoints fall on data-epoch ends"


GROUPS = [(g.name, p.stem) for g in sorted(CONFIGS.iterdir()) if g.is_dir() and g.name != "experiment"
          for p in sorted(g.glob("*.yaml"))]


@pytest.mark.parametrize("group,option", GROUPS)
def test_group_option_resolves_and_instantiates(group, option, latents):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "latents":
        overrides += ["model=dit", f"data.train.shards={latents}", f"data.val.shards={latents}"]
    if group == "model":
        overrides += ["model.loss.lpips_random_backbone=true"] if option == "vae" else ["data=latents", f"data.train.shards={latents}"]
    if group == "trainer":
        overrides += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    cfg = _resolved(overrides)
    if group == "model":
        module = _instantiate_model(cfg)
        assert type(module).__name__ == {"vae": "VAEModule", "dit": "DiTModule"}[option]
    elif group == "data":
        dm = instantiate(cfg.data)
        assert type(dm).__name__ == {"video": "VideoDataModule", "latents": "LatentDataModule"}[option]
    elif group == "trainer":
        trainer_cfg = cfg.trainer
        if "strategy" in trainer_cfg:
            strategy = instantiate(trainer_cfg.strategy)
            assert type(strategy).__name__ == trainer_cfg.strategy._target_.rsplit(".", 1)[1]
        else:
            trainer = instantiate(trainer_cfg, logger=False, default_root_dir="unused")
            assert trainer.max_steps == trainer_cfg.max_steps
    elif group in ("callbacks", "logger"):
        objs = [instantiate(c) for c in cfg[group].values()]
        assert objs and all(type(o).__name__ == c._target_.rsplit(".", 1)[1]
                            for o, c in zip(objs, cfg[group].values()))
    elif group == "optim":
        assert cfg.model.optim.lr == cfg.optim.lr > 0  # the model reads the optim group
    elif group == "paths":
        assert str(cfg.paths.run_dir).startswith(str(cfg.paths.task_dir))
    elif group == "debug":
        assert cfg.data.num_workers == 0 and (cfg.trainer.get("fast_dev_run") or cfg.trainer.max_steps <= 10)
    elif group == "launcher":
        full = _compose(overrides)
        assert "submitit" in full.hydra.launcher._target_
    else:
        raise AssertionError(f"no check for config group {group!r}: add one")


def test_cli_overrides_reach_the_model():
    cfg = _compose(["experiment=vae/stage1", "optim.lr=3e-4", "trainer.max_steps=10",
                    "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"])
    assert cfg.model.optim.lr == 3e-4  # model.optim interpolates the top-level optim group
    assert cfg.trainer.max_steps == 10 and cfg.trainer.devices == 8 and cfg.trainer.num_nodes == 2
    assert cfg.model.vae.temporal is False and cfg.data.train.mode == "image"


def test_later_stages_require_init_from():
    for stage in ("vae/stage2", "vae/stage3", "demo/vae_stage2", "demo/vae_stage3",
                  "dit/stage2", "demo/dit_stage2", "dit/lora", "dit/finetune_wan"):
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


# the typed blocks (schema/*) and where the composed config puts them
TYPED_BLOCKS = {"model.flow": "flow", "model.val": "dit_val", "model.fsdp": "fsdp", "model.loss": "vae_loss",
                "model.gan": "gan", "model.lora": "lora", "optim": "optim"}


def test_typed_blocks_hold_their_defaults_once_and_compose_in_full():
    """Each typed block's defaults are its dataclass's alone: the model YAML files do not spell
    them out, yet the composed config (what --cfg job prints) holds every key of the block."""
    from dataclasses import fields

    from vidgen.run import SCHEMAS

    for name in ("dit", "vae"):
        raw = OmegaConf.load(CONFIGS / "model" / f"{name}.yaml")
        assert not {"flow", "val", "fsdp", "loss"} & set(raw), name
    seen = set()
    for experiment in EXPERIMENTS:
        cfg = _resolved([f"experiment={experiment}"])
        for path, schema in TYPED_BLOCKS.items():
            block = OmegaConf.select(cfg, path)
            if block is None:
                continue
            seen.add(path)
            assert set(block) == {f.name for f in fields(SCHEMAS[schema])}, (experiment, path)
    assert seen == set(TYPED_BLOCKS)


def test_the_lora_experiment_trains_the_lora_defaults():
    from dataclasses import asdict

    from vidgen.models.dit.lora import LoraOptions

    lora = _resolved(["experiment=dit/lora"]).model.lora
    assert OmegaConf.to_container(lora) == asdict(LoraOptions())


@pytest.mark.parametrize("override, message", [
    ("model.flow.shfit=2", "Key 'shfit' not in 'FlowOptions'"),
    ("model.flow.resolution_shift=maybe", "is not a valid bool"),
    ("model.val.steps=2.5", "could not be converted to Integer"),
    ("optim.lr=fast", "could not be converted to Float"),
])
def test_a_misspelt_or_mistyped_override_fails_at_compose_naming_it(override, message):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        _compose(["experiment=dit/stage1", override])
    text = f"{info.value} {info.value.__cause__}"
    assert override.split("=")[0] in text and message in text, text


def test_a_mistyped_value_given_to_a_module_is_an_error_naming_the_key():
    """Built without Hydra (a notebook), the same dataclasses check the dicts."""
    from vidgen.lit.dit import DiTModule

    tiny = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=1, freq_dim=16, text_dim=8)
    with pytest.raises(ValueError, match=r"model.flow.logit_std='wide': .*could not be converted to Float"):
        DiTModule(dit=tiny, flow=dict(logit_std="wide"), optim=dict(lr=1e-4), size="tiny")
    with pytest.raises(ValueError, match=r"model.val.timesteps\[1\]=.*could not be converted to Float"):
        DiTModule(dit=tiny, flow={}, val=dict(timesteps=[0.5, "late"]), optim=dict(lr=1e-4), size="tiny")
    with pytest.raises(ValueError, match=r"model.fsdp.param_dtype='bf16'; valid: null, float32"):
        DiTModule(dit=tiny, flow={}, fsdp=dict(param_dtype="bf16"), optim=dict(lr=1e-4), size="tiny")
    m = DiTModule(dit=tiny, flow=dict(shift=3), optim=dict(lr=1), size="tiny")  # ints where floats go
    assert m.flow.shift == 3.0 and isinstance(m.flow.shift, float) and m.optim_cfg.lr == 1.0


def test_a_misspelt_vae_loss_key_is_an_error_naming_the_valid_ones():
    from vidgen.lit.vae import VAEModule

    with pytest.raises(ValueError, match=r"model.loss has unknown keys \['lpips_wieght'\]; valid: .*lpips_weight"):
        VAEModule(vae=dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temporal_downsample=[False]),
                  loss=dict(lpips_wieght=0.0), optim=dict(lr=1e-4))
