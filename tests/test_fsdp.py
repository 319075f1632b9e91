"""FSDP2 (fully_shard per DiT block, Lightning ModelParallelStrategy) with 2 CPU processes (gloo).

Every run is `train.py` in a subprocess: distributed training never runs inside pytest.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_latents import _one_thread, cached_text_encoder, encode, make_tiny_vae  # noqa: F401, I001

from vidgen.models.dit import load_dit
from vidgen.utils.checkpoint import load_checkpoint_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def latents(tmp_path_factory, synthetic_data):
    import vidgen.text

    root = tmp_path_factory.mktemp("fsdp")
    vae = make_tiny_vae(root / "vae")
    original, vidgen.text.build_text_encoder = vidgen.text.build_text_encoder, cached_text_encoder
    try:
        for split in ("train", "val"):
            encode(vae, synthetic_data / split, root / split, "data.num_frames=9", "chunked=false",
                   "data.batch_size=8", "allow_identity_latent_stats=true")
    finally:
        vidgen.text.build_text_encoder = original
    return root


def _train(run_dir, latents, *extra, strategy="fsdp2", devices=2):
    cmd = [
        sys.executable, str(ROOT / "train.py"), "experiment=demo/dit_stage1", f"trainer={strategy}",
        "trainer.accelerator=cpu", f"trainer.devices={devices}", "trainer.precision=32-true",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=1", f"paths.run_dir={run_dir}",
        f"data.train.shards={latents}/train", f"data.val.shards={latents}/val", "model.vae_path=null",
        "data.num_workers=0", "data.train.buckets=null", "data.train.max_tokens=48",
        "data.train.batches_per_epoch=2", "model.val.num_samples=1", "model.val.steps=2",
        "model.dit.dim=32", "model.dit.ffn_dim=64", "model.dit.num_heads=2", "model.dit.num_layers=2",
        "model.dit.freq_dim=32", "model.dit.in_channels=4", "model.dit.out_channels=4",
        "model.allow_identity_latent_stats=true", *extra,
    ]
    env = {**os.environ, "VIDGEN_RUN_ID": f"fsdp-{Path(run_dir).name}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return load_checkpoint_file(Path(run_dir) / "checkpoints" / "last.ckpt")


def test_fsdp2_two_processes_train_checkpoint_and_export(tmp_path, latents):
    run = tmp_path / "fsdp"
    ckpt = _train(run, latents, "trainer.max_steps=4")
    assert ckpt["global_step"] == 4 and ckpt["vidgen"]["steps_done"] == 4
    # one full (gathered) checkpoint file: plain tensors with the model's full shapes
    dit = load_dit(run)
    for k, v in dit.state_dict().items():
        assert type(ckpt["state_dict"]["dit." + k]) is torch.Tensor
        assert ckpt["state_dict"]["dit." + k].shape == v.shape
        torch.testing.assert_close(v, ckpt["vidgen"]["ema"]["shadow"][k], rtol=0, atol=0)  # EMA export
    assert all(torch.isfinite(v).all() for v in dit.state_dict().values())
    assert json.loads((run / "dit" / "pipeline.json").read_text())["latent_channels"] == 4
    assert list((run / "samples").glob("val_samples_*.png")), "every rank sampled, rank 0 wrote"
    init = torch.zeros(())  # the zero-initialised head has moved
    assert not torch.equal(ckpt["state_dict"]["dit.proj_out.weight"].abs().sum(), init)


@pytest.mark.slow
def test_fsdp2_resume_is_exact_and_matches_ddp(tmp_path, latents):
    full = _train(tmp_path / "full", latents, "trainer.max_steps=6")
    _train(tmp_path / "part", latents, "trainer.max_steps=4")
    part = _train(tmp_path / "part", latents, "trainer.max_steps=6", "ckpt_path=last")
    ddp = _train(tmp_path / "ddp", latents, "trainer.max_steps=6", strategy="ddp")
    for k, v in full["state_dict"].items():
        torch.testing.assert_close(part["state_dict"][k], v, rtol=0, atol=0, msg=f"{k}: resume")
        # same data and noise per rank: sharded and replicated training agree up to float rounding
        torch.testing.assert_close(ddp["state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=f"{k}: ddp")
    for k, v in full["vidgen"]["ema"]["shadow"].items():
        torch.testing.assert_close(part["vidgen"]["ema"]["shadow"][k], v, rtol=0, atol=0)


def test_fsdp2_lora_trains_gathers_and_exports_the_adapters_only(tmp_path, latents):
    from vidgen.models.dit.lora import DIFFUSERS_FILE, read_lora

    base = tmp_path / "base"
    _train(base, latents, "trainer.max_steps=2", strategy="ddp")
    run = tmp_path / "lora"
    ckpt = _train(run, latents, "trainer.max_steps=3", f"model.init_from={base}",
                  "model.lora={rank: 4, alpha: 4.0}", "model.activation_checkpointing=true")
    keys = sorted(ckpt["state_dict"])
    assert len(keys) == 2 * 2 * 10 and all(".lora_" in k for k in keys)  # adapters only, full tensors
    assert all(type(ckpt["state_dict"][k]) is torch.Tensor for k in keys)
    assert sorted(ckpt["vidgen"]["ema"]["shadow"]) == [k[len("dit."):] for k in keys]
    lora = read_lora(run / "lora" / DIFFUSERS_FILE)
    assert len(lora) == 20 and all(torch.isfinite(b).all() and b.abs().max() > 0 for _, b in lora.values())
    before, after = load_dit(base).state_dict(), load_dit(base, lora=run / "lora").state_dict()
    changed = {k[: -len(".weight")] for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(lora)  # it fits the base it trained on, and merges where it adapts
