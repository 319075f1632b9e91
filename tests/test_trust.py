"""Files from others are data: a `.ckpt` whose pickle runs code is refused by every entry
point that loads one (sample, eval, train's init_from / vae_path / ckpt_path, the tools), its
code never runs, and the project's own checkpoints (EMA, guard state) load weights-only."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from test_dit_train import _cfg as dit_cfg
from test_dit_train import setup  # noqa: F401  (the latents fixture)
from test_latents import cached_text_encoder, compose_tool
from test_train import _cfg as vae_cfg

from vidgen.diffusion.pipeline import read_pipeline
from vidgen.models.dit import load_dit
from vidgen.models.vae import load_vae
from vidgen.run import train
from vidgen.utils.checkpoint import (
    AtomicCheckpointIO,
    UntrustedCheckpointError,
    load_checkpoint_file,
)

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs a shell command that creates `marker`: what a hostile .ckpt does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(autouse=True)
def _one_text_encoder(monkeypatch):
    import vidgen.text

    monkeypatch.setattr(vidgen.text, "build_text_encoder", cached_text_encoder)


@pytest.fixture(scope="module")
def own(tmp_path_factory, synthetic_data, setup):  # noqa: F811
    """Checkpoints vidgen writes: a 3D VAE run and a DiT run of 2 steps each, EMA on."""
    root = tmp_path_factory.mktemp("own")
    train(vae_cfg(root / "vae_run", synthetic_data, "demo/vae_stage2", "model.require_init_from=false",
                  "trainer.max_steps=2", "data.train.batches_per_epoch=2", "data.val.num_frames=5",
                  "trainer.limit_val_batches=0"))
    train(dit_cfg(root / "dit_run", setup, "demo/dit_stage1", "trainer.max_steps=2",
                  "trainer.limit_val_batches=0"))
    return dict(vae=root / "vae_run" / "checkpoints" / "last.ckpt",
                dit=root / "dit_run" / "checkpoints" / "last.ckpt",
                vae_dir=setup / "vae", dit_run=root / "dit_run", data=synthetic_data,
                latents=setup)


@pytest.fixture
def hostile(tmp_path, own):
    """(VAE .ckpt, DiT .ckpt, marker): our own checkpoints with a payload slipped in."""
    marker = tmp_path / "payload-ran"
    paths = {}
    for name in ("vae", "dit"):
        ckpt = load_checkpoint_file(own[name])
        ckpt["hyper_parameters"]["note"] = Payload(marker)
        paths[name] = tmp_path / f"{name}-hostile.ckpt"
        torch.save(ckpt, paths[name])
    return paths["vae"], paths["dit"], marker


def test_own_checkpoints_load_weights_only_with_ema_and_guard(own):
    for name, load in (("vae", load_vae), ("dit", load_dit)):
        ckpt = torch.load(own[name], map_location="cpu", weights_only=True)  # no allow-list needed
        shadow = ckpt["vidgen"]["ema"]["shadow"]
        assert shadow and ckpt["global_step"] == 2
        assert "guard" in ckpt["vidgen"], sorted(ckpt["vidgen"])
        model = load(own[name])  # the EMA weights, as sample / eval / init_from use them
        for k, v in model.state_dict().items():
            if k in shadow:
                torch.testing.assert_close(v, shadow[k], rtol=0, atol=0)
    assert read_pipeline(own["dit"])["text_encoder"] == "minilm"
    resumed = AtomicCheckpointIO().load_checkpoint(own["dit"])
    assert resumed["global_step"] == 2 and "optimizer_states" in resumed


def _sample(own, vae, dit, *extra):
    from vidgen.sample import run

    return run(compose_tool("sample", [f"ckpt={dit}", f"vae={vae}", "prompt=a cat", "num_frames=9",
                                       "height=32", "width=32", "steps=1", "device=cpu",
                                       f"out={own['dit_run'] / 'samples-out'}", *extra]))


def _eval(own, task, ckpt, *extra):
    from vidgen.evaluate import evaluate

    return evaluate(compose_tool("eval", [
        f"task={task}", f"ckpt={ckpt}", f"data.shards={own['data']}/val", "data.num_frames=9",
        "data.height=32", "data.width=32", "data.num_workers=0", "metrics.lpips=false",
        "metrics.random_backbones=true", "device=cpu", f"out={own['dit_run'] / 'eval-out'}", *extra]))


def _latent_stats(own, vae, tmp):
    from vidgen.tools import latent_stats

    return latent_stats.run(compose_tool("latent_stats", [
        f"ckpt={vae}", f"out={tmp / 'stats'}", f"data.shards={own['data']}/train", "data.num_frames=9",
        "data.height=32", "data.width=32", "data.num_workers=0", "data.max_videos=2", "device=cpu"]))


def _encode_latents(own, vae, tmp):
    from vidgen.tools import encode_latents

    return encode_latents.run(compose_tool("encode_latents", [
        f"vae={vae}", f"data.shards={own['data']}/val", f"out={tmp / 'latents'}", "data.num_frames=9",
        "data.height=32", "data.width=32", "device=cpu", "allow_identity_latent_stats=true"]))


def _convert(vae, tmp, *flags):
    from vidgen.tools import convert_vae

    convert_vae.main(["--to-diffusers", str(vae), "--out", str(tmp / "diffusers"), *flags])


def _vae_init_from(own, vae, tmp, *extra):
    return instantiate(vae_cfg(tmp / "run", own["data"], "demo/vae_stage2", f"model.init_from={vae}",
                               *extra).model)


def _dit_cfg(own, tmp, *extra):
    return dit_cfg(tmp / "run", own["latents"], "demo/dit_stage1", *extra)


# entry point -> call(own, hostile VAE .ckpt, hostile DiT .ckpt, tmp); the good files elsewhere
ENTRY_POINTS = {
    "sample ckpt=": lambda own, v, d, tmp: _sample(own, own["vae_dir"], d),
    "sample vae=": lambda own, v, d, tmp: _sample(own, v, own["dit"]),
    "eval task=vae_recon ckpt=": lambda own, v, d, tmp: _eval(own, "vae_recon", v),
    "eval task=dit_gen ckpt=": lambda own, v, d, tmp: _eval(own, "dit_gen", d, f"vae={own['vae_dir']}"),
    "eval task=dit_gen vae=": lambda own, v, d, tmp: _eval(own, "dit_gen", own["dit"], f"vae={v}"),
    "train VAE model.init_from=": lambda own, v, d, tmp: _vae_init_from(own, v, tmp),
    "train DiT model.init_from=": lambda own, v, d, tmp: instantiate(
        _dit_cfg(own, tmp, f"model.init_from={d}").model),
    "train DiT model.vae_path=": lambda own, v, d, tmp: instantiate(
        _dit_cfg(own, tmp, f"model.vae_path={v}").model)._vae(),
    "train ckpt_path=": lambda own, v, d, tmp: train(_dit_cfg(own, tmp, f"ckpt_path={d}",
                                                              "trainer.max_steps=3")),
    "latent_stats ckpt=": lambda own, v, d, tmp: _latent_stats(own, v, tmp),
    "encode_latents vae=": lambda own, v, d, tmp: _encode_latents(own, v, tmp),
    "convert_vae --to-diffusers": lambda own, v, d, tmp: _convert(v, tmp),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_a_hostile_checkpoint_is_refused_and_never_runs(tmp_path, own, hostile, entry):
    vae, dit, marker = hostile
    with pytest.raises(Exception) as err:  # Hydra wraps what instantiate raises
        ENTRY_POINTS[entry](own, vae, dit, tmp_path)
    assert not marker.exists(), f"{entry} ran the checkpoint's code"
    chain, e = [], err.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(c, UntrustedCheckpointError) for c in chain), repr(err.value)
    msg = str(err.value)
    assert "posix.system" in msg and "would run that code" in msg, msg
    assert "trust_checkpoint=true" in msg


def test_each_entry_point_still_loads_our_own_checkpoints(tmp_path, own):
    """The same entry points on the files vidgen wrote: each gets past loading and does its job."""
    assert len(_sample(own, own["vae_dir"], own["dit"])) == 1
    _vae_init_from(own, own["vae"], tmp_path)
    instantiate(_dit_cfg(own, tmp_path, f"model.init_from={own['dit']}").model)
    instantiate(_dit_cfg(own, tmp_path, f"model.vae_path={own['vae']}").model)._vae()
    metrics = train(_dit_cfg(own, tmp_path, f"ckpt_path={own['dit']}", "trainer.max_steps=3",
                             "trainer.limit_val_batches=0"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert (_latent_stats(own, own["vae"], tmp_path) / "config.json").is_file()
    assert _encode_latents(own, own["vae"], tmp_path)
    _convert(own["vae"], tmp_path)
    assert (tmp_path / "diffusers" / "config.json").is_file()
    report = _eval(own, "vae_recon", own["vae"], "metrics.fvd=false")
    assert (report / "report.json").is_file()


def test_trust_checkpoint_true_is_an_explicit_opt_in(tmp_path, own, hostile):
    vae, _, marker = hostile
    _convert(vae, tmp_path, "--trust-checkpoint")  # the user vouches for the file: it loads ...
    assert marker.exists() and (tmp_path / "diffusers" / "config.json").is_file()  # ... and runs
    marker.unlink()
    module = _vae_init_from(own, vae, tmp_path, "trust_checkpoint=true")
    assert marker.exists() and module.hparams.trust_checkpoint is True


def test_the_sample_cli_refuses_a_hostile_checkpoint(tmp_path, own, hostile):
    """As a user runs it: `python -m vidgen.sample ckpt=that.ckpt ...` in a fresh process."""
    _, dit, marker = hostile
    cmd = [sys.executable, "-m", "vidgen.sample", f"ckpt={dit}", f"vae={own['vae_dir']}", "prompt=a cat",
           "num_frames=9", "height=32", "width=32", "steps=1", f"out={tmp_path / 'out'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and not marker.exists()
    assert "UntrustedCheckpointError" in proc.stderr and "posix.system" in proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------- shards are data too


def _add_pickles(src_tar: Path, dst_tar: Path, marker: Path) -> int:
    """Copy a shard, giving every sample `.pth` and `.pickle` members that run code when
    unpickled (webdataset's default decoders would unpickle them)."""
    import io
    import pickle
    import tarfile

    payload = pickle.dumps(Payload(marker))
    keys = set()
    with tarfile.open(src_tar) as src, tarfile.open(dst_tar, "w") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
            keys.add(member.name.split(".", 1)[0])
        for key in sorted(keys):
            for ext in ("pth", "pickle"):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                dst.addfile(info, io.BytesIO(payload))
    return len(keys)


def test_video_shards_with_pickled_members_train_and_never_unpickle(tmp_path, own):
    from vidgen.data.pipeline import build_video_dataset

    marker = tmp_path / "payload-ran"
    src = sorted((own["data"] / "train").glob("*.tar"))[0]
    n = _add_pickles(src, tmp_path / "hostile.tar", marker)
    batches = list(build_video_dataset(str(tmp_path / "hostile.tar"), resampled=False, num_frames=5,
                                       height=32, width=32, batch_size=4))
    assert sum(len(b["key"]) for b in batches) == n and not marker.exists()


def test_latent_shards_with_pickled_members_train_and_never_unpickle(tmp_path, own):
    import shutil

    from vidgen.data.latents import EMPTY_NAME, INFO_NAME, LatentDataModule

    marker = tmp_path / "payload-ran"
    folder = tmp_path / "latents"
    folder.mkdir()
    for name in (INFO_NAME, EMPTY_NAME):
        shutil.copy(own["latents"] / "train" / name, folder / name)
    for src in sorted((own["latents"] / "train").glob("*.tar")):
        _add_pickles(src, folder / src.name, marker)
    dm = LatentDataModule(train=dict(shards=str(folder), max_tokens=40, batches_per_epoch=3),
                          patch_size=(1, 2, 2), seed=0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and all(b["packed"].num_tokens > 0 for b in batches)
    assert not marker.exists()
