"""Latent statistics are checked by every entry point that makes or decodes latents.

A VAE still at the defaults (mean 0 / std 1: latent_stats never ran) is refused by
encode_latents, DiT training (latent and on-the-fly video mode), sampling and eval dit_gen
unless ``allow_identity_latent_stats``; a decoding VAE whose statistics differ from those the
latents were normalised with is refused unless ``allow_latent_stats_mismatch``.
(`python -m vidgen.sample` itself: tests/test_sample.py.)
"""

import json
import re

import pytest
from test_dit_train import _cfg, _video_cfg
from test_latents import _one_thread, cached_text_encoder, compose_tool, encode, make_tiny_vae  # noqa: F401, I001

from vidgen.evaluate import evaluate
from vidgen.models.vae import WanVAE
from vidgen.models.vae.stats import check_same_stats, is_identity
from vidgen.run import train

MEAN, STD = [0.1, -0.2, 0.3, 0.05], [0.5, 1.5, 2.0, 1.2]
ONE_STEP = ["trainer.max_steps=1", "trainer.limit_val_batches=0"]


@pytest.fixture(autouse=True)
def _one_text_encoder(monkeypatch):
    import vidgen.text

    monkeypatch.setattr(vidgen.text, "build_text_encoder", cached_text_encoder)


@pytest.fixture(scope="module")
def root(tmp_path_factory, synthetic_data):
    """One tiny VAE three ways: vae/ (stats MEAN, STD), plain/ (none), other/ (other stats);
    latents of vae/ in train/ and val/, latents of plain/ (opted out) in plain_latents/."""
    import vidgen.text

    root = tmp_path_factory.mktemp("checks")
    make_tiny_vae(root / "plain")
    for name, std in (("vae", STD), ("other", [0.5, 1.5, 2.0, 1.0])):
        vae = WanVAE.from_pretrained(root / "plain")
        vae.set_latent_stats(MEAN, std)
        vae.save_pretrained(root / name)
    original, vidgen.text.build_text_encoder = vidgen.text.build_text_encoder, cached_text_encoder
    try:
        for split in ("train", "val"):
            encode(root / "vae", synthetic_data / split, root / split, "chunked=false", "data.batch_size=8")
        encode(root / "plain", synthetic_data / "train", root / "plain_latents", "chunked=false",
               "data.batch_size=8", "allow_identity_latent_stats=true")
    finally:
        vidgen.text.build_text_encoder = original
    return root


def _pipeline(run):
    return json.loads((run / "dit" / "pipeline.json").read_text())


def test_identity_and_mismatch_detection():
    assert is_identity(dict(mean=[0.0, 0.0], std=[1.0, 1.0]))
    assert not is_identity(dict(mean=[0.0, 1e-7], std=[1.0, 1.0]))  # measured: never exactly 0 / 1
    same = dict(mean=MEAN, std=STD)
    check_same_stats(same, "here", dict(mean=[m + 1e-8 for m in MEAN], std=STD), "vae", allow=False, fix="x")
    with pytest.raises(ValueError, match=r"max abs difference mean 0\.5; .* Fix it, or pass k=true"):
        check_same_stats(same, "here", dict(mean=[0.6, *MEAN[1:]], std=STD), "vae", allow=False,
                         fix="Fix it", knob="k")
    with pytest.raises(ValueError, match="has 3 latent channels but the latents recorded in here have 4"):
        check_same_stats(same, "here", dict(mean=MEAN[:3], std=STD[:3]), "vae", allow=False, fix="x")


def test_encode_latents_refuses_a_vae_without_stats(tmp_path, root, synthetic_data):
    with pytest.raises(ValueError, match=r"has no latent statistics \(mean 0 / std 1\)") as err:
        encode(root / "plain", synthetic_data / "val", tmp_path / "lat")
    assert f"`python -m vidgen.tools.latent_stats ckpt={root / 'plain'} data.shards=" in str(err.value)
    assert "or pass allow_identity_latent_stats=true" in str(err.value)
    assert not list((tmp_path / "lat").iterdir())
    # opted out (the fixture): written, with the statistics recorded in latents_info.json
    info = json.loads((root / "plain_latents" / "latents_info.json").read_text())
    assert is_identity(dict(mean=info["vae_config"]["latents_mean"], std=info["vae_config"]["latents_std"]))
    info = json.loads((root / "train" / "latents_info.json").read_text())
    assert info["vae_config"]["latents_std"] == pytest.approx(STD)


def test_dit_training_refuses_latents_without_stats(tmp_path, root):
    plain = [f"data.train.shards={root}/plain_latents", f"data.val.shards={root}/plain_latents",
             "model.vae_path=null", *ONE_STEP]
    with pytest.raises(ValueError, match=re.escape(f"the latents in {root / 'plain_latents'} were "
                                                   f"encoded by the VAE at {root / 'plain'} without")) as err:
        train(_cfg(tmp_path / "refused", root, "demo/dit_stage1", *plain))
    assert f"python -m vidgen.tools.latent_stats ckpt={root / 'plain'} data.shards=" in str(err.value)
    assert "or pass model.allow_identity_latent_stats=true" in str(err.value)
    run = tmp_path / "allowed"
    train(_cfg(run, root, "demo/dit_stage1", *plain, "model.allow_identity_latent_stats=true"))
    assert is_identity(_pipeline(run)["latent_stats"])


def test_dit_training_refuses_a_decoding_vae_with_other_stats(tmp_path, root):
    with pytest.raises(ValueError, match=r"other latent statistics .* max abs difference std 0\.2;") as err:
        train(_cfg(tmp_path / "other", root, "demo/dit_stage1", f"model.vae_path={root}/other", *ONE_STEP))
    assert str(root / "train" / "latents_info.json") in str(err.value)
    assert "or pass model.allow_latent_stats_mismatch=true" in str(err.value)
    with pytest.raises(ValueError, match="latent_stats never ran on it"):
        train(_cfg(tmp_path / "plain", root, "demo/dit_stage1", f"model.vae_path={root}/plain", *ONE_STEP))
    run = tmp_path / "allowed"
    train(_cfg(run, root, "demo/dit_stage1", f"model.vae_path={root}/other", *ONE_STEP,
               "model.allow_latent_stats_mismatch=true"))
    recorded = _pipeline(run)["latent_stats"]  # what sampling compares its VAE with
    assert recorded["mean"] == pytest.approx(MEAN) and recorded["std"] == pytest.approx(STD)
    assert recorded["source"] == str(root / "train" / "latents_info.json")


def test_video_mode_refuses_a_vae_without_stats(tmp_path, root, synthetic_data):
    with pytest.raises(ValueError, match=r"has no latent statistics .* model.allow_identity_latent_stats=true"):
        train(_video_cfg(tmp_path / "refused", root, synthetic_data, f"model.vae_path={root}/plain", *ONE_STEP))
    run = tmp_path / "allowed"
    train(_video_cfg(run, root, synthetic_data, f"model.vae_path={root}/plain", *ONE_STEP,
                     "model.allow_identity_latent_stats=true"))
    recorded = _pipeline(run)["latent_stats"]
    assert is_identity(recorded) and recorded["source"].endswith("(encoded on the fly)")


def test_eval_dit_gen_checks_the_decoding_vae(tmp_path, root):
    from vidgen.models.dit.model import wan_tiny

    wan_tiny(in_channels=4, out_channels=4, text_dim=384).save_pretrained(tmp_path / "dit")
    pipeline = dict(vae=str(root / "vae"), text_encoder="minilm",
                    latent_stats=dict(mean=MEAN, std=STD, source="latents_info.json"))
    (tmp_path / "dit" / "pipeline.json").write_text(json.dumps(pipeline))

    def cfg(*extra):  # 9 frames: past the checks, the FVD's 16-frame requirement stops the run
        return compose_tool("eval", ["task=dit_gen", f"ckpt={tmp_path / 'dit'}", "data.num_frames=9",
                                     "metrics.lpips=false", "metrics.random_backbones=true",
                                     f"out={tmp_path / 'report'}", *extra])

    with pytest.raises(ValueError, match=r"max abs difference std 0\.2;.*allow_latent_stats_mismatch=true"):
        evaluate(cfg(f"vae={root / 'other'}"))
    with pytest.raises(ValueError, match="FVD uses 16-frame clips"):
        evaluate(cfg(f"vae={root / 'other'}", "allow_latent_stats_mismatch=true"))
    with pytest.raises(ValueError, match="FVD uses 16-frame clips"):
        evaluate(cfg())  # the VAE the latents were made with
    (tmp_path / "dit" / "pipeline.json").unlink()  # nothing recorded: only the identity check
    plain = [f"vae={root / 'plain'}", "text_encoder=minilm"]
    with pytest.raises(ValueError, match=r"has no latent statistics .* allow_identity_latent_stats=true"):
        evaluate(cfg(*plain))
    with pytest.raises(ValueError, match="FVD uses 16-frame clips"):
        evaluate(cfg(*plain, "allow_identity_latent_stats=true"))
