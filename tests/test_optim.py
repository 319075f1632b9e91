"""Optimisers as Hydra _partial_ specs (vidgen/utils/optim.py, configs/optim/): each option of
the optim group builds what it says, for the VAE, its discriminator and the DiT."""

import pytest
import torch
from omegaconf import OmegaConf
from test_configs import _compose
from test_vae_stages import _module

from vidgen.lit.dit import DiTModule
from vidgen.models.dit.model import wan_tiny
from vidgen.utils.optim import ADAMW, build_optimizer, optim_options

DISC = dict(in_channels=3, base_channels=8, num_layers=2)


def _optim(*overrides):
    return OmegaConf.to_container(_compose(["experiment=vae/stage3", *overrides]).model.optim, resolve=True)


def _settings(opt):
    g = opt.param_groups[0]
    return type(opt).__name__, g["initial_lr"], tuple(g["betas"]), g["eps"], g["weight_decay"]


@pytest.mark.parametrize("choice, disc_betas", [("adamw", (0.9, 0.999)), ("adamw_gan", (0.5, 0.9))])
def test_optim_choices_build_the_generator_and_discriminator_optimizers(choice, disc_betas):
    optim = _optim(f"optim={choice}", "optim.lr=3e-4", "optim.disc_lr=1e-3")
    (opt_g, opt_d), _ = _module(disc=DISC, optim=optim).configure_optimizers()
    assert _settings(opt_g) == ("AdamW", 3e-4, (0.9, 0.999), 1e-8, 0.0)
    assert _settings(opt_d) == ("AdamW", 1e-3, disc_betas, 1e-8, 0.0)
    # The schedule multiplies optim.lr: step 0 of the stage-3 warm-up.
    assert opt_g.param_groups[0]["lr"] == pytest.approx(3e-4 / optim["warmup_steps"])


def test_the_optimizer_is_any_class_from_the_command_line():
    optim = _optim("optim.optimizer._target_=torch.optim.SGD", "~optim.optimizer.betas", "~optim.optimizer.eps",
                   "+optim.optimizer.momentum=0.9", "optim.optimizer.weight_decay=0.1")
    opt = build_optimizer(optim_options(optim).optimizer, [torch.nn.Parameter(torch.zeros(2))], 0.5)
    assert type(opt) is torch.optim.SGD
    assert (opt.defaults["lr"], opt.defaults["momentum"], opt.defaults["weight_decay"]) == (0.5, 0.9, 0.1)
    dit = DiTModule(dit=dict(wan_tiny().config), flow={}, optim=optim)
    (opt,), _ = dit.configure_optimizers()
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0.9


def test_bad_optim_configs_name_the_key():
    with pytest.raises(ValueError, match=r"optim.optimizer \(torch.optim.SGD\) does not take its settings: .*betas"):
        _module(optim=_optim("optim.optimizer._target_=torch.optim.SGD")).configure_optimizers()
    with pytest.raises(ValueError, match=r"optim.betas is a setting of the optimizer now: set optim.optimizer.betas"):
        _module(optim=dict(lr=1e-4, betas=[0.9, 0.95]))
    with pytest.raises(ValueError, match=r"optim has unknown keys \['warmup'\]; valid: .*'warmup_steps'"):
        _module(optim=dict(lr=1e-4, warmup=10))
    with pytest.raises(ValueError, match=r"optim.lr is required"):
        DiTModule(dit=dict(wan_tiny().config), flow={}, optim=dict(warmup_steps=3))
    with pytest.raises(ValueError, match=r"optim.disc_optimizer must be a Hydra spec with _target_"):
        _module(optim=dict(lr=1e-4, disc_optimizer=dict(betas=[0.5, 0.9])))


def test_a_module_built_without_an_optimizer_gets_the_spec_of_optim_adamw():
    """vidgen.utils.optim.ADAMW (for modules built by hand) and configs/optim/adamw.yaml agree."""
    assert _optim("optim=adamw")["optimizer"] == ADAMW
    assert optim_options({"lr": 1e-3}).optimizer == ADAMW
