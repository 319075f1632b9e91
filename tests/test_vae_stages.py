"""The VAE module's stage logic, in-process on tiny models: the non-finite guard in every
stage, the GAN weighting (adaptive clamp, LeCam and R1 weights), option checks, and how
a stage takes the previous stage's VAE (inflation with this stage's temporal settings)."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from test_dit_train import _rows, _series

from vidgen.lit.vae import VAEModule
from vidgen.models.vae import WanVAE
from vidgen.run import register_configs, train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(base_dim=8, z_dim=4, num_res_blocks=1, dim_mult=[1, 2, 2])
STAGES = {"demo/vae_stage1": [], "demo/vae_stage2": ["model.require_init_from=false"],
          "demo/vae_stage3": ["model.require_init_from=false", "model.gan.start_step=0",
                              "model.disc.base_channels=8", "data.train.buckets=[5x32x32]",
                              "data.train.bucket_weights=null"]}


def _cfg(run_dir, data, experiment, *extra):
    register_configs()
    overrides = [
        f"experiment={experiment}", f"paths.run_dir={run_dir}",
        f"data.train.shards={data}/train", f"data.val.shards={data}/val",
        "data.train.height=32", "data.train.width=32", "data.train.num_frames=5",
        "data.num_workers=0", "data.batch_size=2", "data.train.shuffle_buffer=8",
        "data.train.batches_per_epoch=4", "trainer.enable_progress_bar=false",
        "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1",
        *[f"model.vae.{k}={v}" for k, v in TINY.items() if k != "dim_mult"], *STAGES[experiment], *extra,
    ]
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)


POISON = ["+callbacks.poison._target_=tests.callbacks.InjectNonFinite", "+callbacks.poison.rank=0"]


@pytest.mark.parametrize("experiment", sorted(STAGES))
def test_a_nonfinite_streak_stops_every_stage(tmp_path, synthetic_data, experiment):
    cfg = _cfg(tmp_path, synthetic_data, experiment, "trainer.max_steps=6",
               "model.max_consecutive_nonfinite=2", *POISON, "+callbacks.poison.batches=[1,2,3]")
    with pytest.raises(RuntimeError, match=r"Loss 'g' was non-finite .* at global step 1 for 3 "
                                           r"consecutive steps, more than model.max_consecutive_nonfinite=2"):
        train(cfg)


def _stage3(tmp_path, data, *extra):
    train(_cfg(tmp_path, data, "demo/vae_stage3", "trainer.max_steps=3", *extra))
    return tmp_path


def test_adaptive_weight_clamp_is_in_the_summed_loss_units(tmp_path, synthetic_data):
    """adaptive_max bounds the weight taming-transformers would compute on the summed loss;
    the logged adaptive_w is in those units, so a small clamp shows up exactly."""
    free = _series(_stage3(tmp_path / "free", synthetic_data), "train/adaptive_w")
    assert len(free) == 3 and all(1.0 < w < 1e4 for w in free), free  # default 1e4: not binding
    cap = min(free) / 2
    clamped = _series(_stage3(tmp_path / "cap", synthetic_data, f"model.gan.adaptive_max={cap}"),
                      "train/adaptive_w")
    assert clamped == pytest.approx([cap] * 3, rel=1e-5)


@pytest.mark.parametrize("reg,weight,factor", [("lecam", 0.5, 0.5), ("r1", 2.0, 1.0)])
def test_discriminator_regulariser_weights(tmp_path, synthetic_data, reg, weight, factor):
    """LeCam adds reg_weight * R; R1 adds gamma / 2 * E||grad D(x)||^2 with gamma = reg_weight."""
    run = _stage3(tmp_path, synthetic_data, f"model.gan.reg={reg}", f"model.gan.reg_weight={weight}")
    rows = [r for r in _rows(run) if r.get("train/d_loss")]
    assert len(rows) == 3
    for r in rows:
        d, hinge, penalty = (float(r[f"train/{k}"]) for k in ("d_loss", "d_hinge", "d_reg"))
        assert penalty > 1e-8  # the regulariser is live
        assert d == pytest.approx(hinge + factor * penalty, rel=1e-5, abs=1e-7)


def _module(**kwargs):
    base = dict(vae=dict(TINY, temporal=True, temporal_downsample=[True, True]), loss=dict(l1_weight=1.0, kl_weight=1e-6, lpips_weight=0.0), optim=dict(lr=1e-4))
    return VAEModule(**{**base, **kwargs})


def test_gan_options_are_checked():
    disc = dict(in_channels=3, base_channels=8, num_layers=2)
    with pytest.raises(ValueError, match=r"model.gan.reg='r2'; valid: lecam, r1, none"):
        _module(disc=disc, gan=dict(reg="r2"))
    with pytest.raises(ValueError, match=r"model.gan has unknown keys \['start_stpe'\]"):
        _module(disc=disc, gan=dict(start_stpe=10))


def test_inflation_takes_this_stage_temporal_settings(tmp_path):
    torch.manual_seed(0)
    WanVAE(**TINY, temporal=False, temporal_downsample=[True, True]).save_pretrained(tmp_path / "2d")
    module = _module(vae=dict(TINY, temporal=True, temporal_downsample=[False, True]),
                     init_from=str(tmp_path / "2d"))
    assert module.vae.config["temporal_downsample"] == [False, True]
    assert module.vae.temporal_compression == 2
    vae2d = WanVAE.from_pretrained(tmp_path / "2d").eval()
    x = torch.randn(1, 3, 1, 16, 16)
    with torch.no_grad():  # the inflated model on one frame is the 2D model
        torch.testing.assert_close(module.vae.eval().encode(x)[0], vae2d.encode(x)[0], rtol=0, atol=1e-6)


def test_a_3d_init_with_other_temporal_settings_names_both_values(tmp_path):
    WanVAE(**TINY, temporal=True, temporal_downsample=[True, True]).save_pretrained(tmp_path / "3d")
    with pytest.raises(ValueError, match=r"model.vae.temporal_downsample: init_from has \[True, True\], "
                                         r"this stage \[False, True\]"):
        _module(vae=dict(TINY, temporal=True, temporal_downsample=[False, True]),
                init_from=str(tmp_path / "3d"))
    with pytest.raises(InstantiationException, match=r"model.vae.base_dim: init_from has 8, this stage 16"):
        from hydra.utils import instantiate

        instantiate(_cfg(tmp_path / "r", tmp_path, "demo/vae_stage2", f"model.init_from={tmp_path / '3d'}",
                         "model.vae.base_dim=16").model)
