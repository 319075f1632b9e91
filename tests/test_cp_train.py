"""Context parallelism through `train.py` (2 and 4 CPU processes, gloo): each packed sequence is
split across a cp group, whose ranks read the same batches, and training equals training
without the split (losses, weights, EMA, resume).

The model-level invariants (outputs and gradients of `forward_packed(packed, cp)`) are in
test_context_parallel.py. Every run is `train.py` in a subprocess.
"""

import csv
from pathlib import Path

import pytest
import torch
from test_fsdp import _train, latents  # noqa: F401 (the latent shards fixture)

from vidgen.data.streams import dist_rank_world
from vidgen.lit.dit import DiTModule

STEPS = "trainer.max_steps=4"


def _losses(run_dir) -> list[float]:
    with open(Path(run_dir) / "csv" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def _assert_same_training(ours: dict, losses: list[float], ref: dict, ref_dir, what: str) -> None:
    assert ours["global_step"] == ref["global_step"] == 4
    # the same losses step by step: the cp group read the one-process batches and noise
    torch.testing.assert_close(losses, _losses(ref_dir), rtol=1e-5, atol=1e-6, msg=what)
    for k, v in ref["state_dict"].items():
        torch.testing.assert_close(ours["state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=f"{what}: {k}")
    for k, v in ref["vidgen"]["ema"]["shadow"].items():
        torch.testing.assert_close(ours["vidgen"]["ema"]["shadow"][k], v, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, latents):  # noqa: F811
    run = tmp_path_factory.mktemp("cp_ref") / "ref"
    return run, _train(run, latents, STEPS, strategy="cpu", devices=1)


def test_cp2_under_ddp_trains_like_one_process_and_resumes_exactly(tmp_path, latents, one_process):  # noqa: F811
    ref_dir, ref = one_process
    run = tmp_path / "cp2"
    _train(run, latents, "trainer.max_steps=2", "context_parallel=2", strategy="ddp")
    first = _losses(run)  # the resumed run's log starts again at step 3
    ckpt = _train(run, latents, STEPS, "context_parallel=2", "ckpt_path=last", strategy="ddp")
    _assert_same_training(ckpt, first + _losses(run), ref, ref_dir, "ddp cp=2, resumed at step 2")
    assert len(_losses(ref_dir)) == 4 and len(set(_losses(ref_dir))) == 4


def test_cp2_under_fsdp2_with_activation_checkpointing_trains_like_one_process(tmp_path, latents, one_process):  # noqa: F811
    ref_dir, ref = one_process
    run = tmp_path / "cp2_fsdp"
    ckpt = _train(run, latents, STEPS, "context_parallel=2", "model.activation_checkpointing=true")
    _assert_same_training(ckpt, _losses(run), ref, ref_dir, "fsdp2 cp=2 + activation checkpointing")


def test_dp2_x_cp2_on_four_processes_trains_like_dp2(tmp_path, latents):  # noqa: F811
    dp = _train(tmp_path / "dp2", latents, STEPS, strategy="ddp")
    both = _train(tmp_path / "dp2cp2", latents, STEPS, "context_parallel=2", strategy="ddp", devices=4)
    _assert_same_training(both, _losses(tmp_path / "dp2cp2"), dp, tmp_path / "dp2", "dp=2 x cp=2 vs dp=2")


def test_cp_size_errors_name_the_valid_values(monkeypatch):
    dit = dict(dim=32, ffn_dim=64, num_heads=4, num_layers=1, freq_dim=32, in_channels=4,
               out_channels=4, text_dim=16)
    with pytest.raises(ValueError, match=r"size 3 must divide the number of attention heads \(4\); valid sizes: \[1, 2, 4\]"):
        DiTModule(dit=dit, flow={}, optim=dict(lr=1e-3), context_parallel=3)
    with pytest.raises(ValueError, match="context_parallel must be an integer >= 1, got 0"):
        DiTModule(dit=dit, flow={}, optim=dict(lr=1e-3), context_parallel=0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert dist_rank_world(2) == (1, 2) and dist_rank_world(4) == (0, 1) and dist_rank_world() == (3, 4)
    with pytest.raises(ValueError, match="context_parallel=3 must divide the world size 4"):
        dist_rank_world(3)


def test_cp_on_a_vae_run_is_an_error(tmp_path):
    from hydra import compose, initialize_config_dir

    from vidgen.run import train

    root = Path(__file__).resolve().parents[1]
    with initialize_config_dir(str(root / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["context_parallel=2", f"paths.run_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"context_parallel=2: only the DiT \(model=dit\) splits sequences"):
        train(cfg)
