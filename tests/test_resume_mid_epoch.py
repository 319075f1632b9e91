"""Exact mid-epoch resume: the data streams (real loader workers) and whole training runs.

A pass that starts at batch s of an epoch must yield exactly the batches s, s+1, ... of the
pass that started at 0: same keys, buckets, pixels / packed tokens and skip counts.
"""

import dataclasses
import json
import shutil

import pytest
import torch
import webdataset as wds
from safetensors.torch import save as st_save
from test_data_pipeline import good, write_shard
from test_dit_train import _cfg as dit_cfg
from test_dit_train import _one_text_encoder, _series, setup  # noqa: F401 (fixtures)
from test_train import _cfg as vae_cfg
from test_train import _losses, _weights
from torch.utils.data import DataLoader

from vidgen.data.datamodule import VideoDataModule
from vidgen.data.latents import EMPTY_NAME, FORMAT, INFO_NAME, LatentDataModule, encode_sample
from vidgen.data.loader import EpochDataLoader
from vidgen.data.pipeline import build_video_dataset
from vidgen.run import train
from vidgen.utils.checkpoint import load_checkpoint_file

EPOCH_BATCHES = 7  # odd: the two workers' shares differ (4 and 3)


# ---------------------------------------------------------------- data
@pytest.fixture(scope="module")
def video_shards(tmp_path_factory, synthetic_data):
    """The synthetic clips plus a shard with a corrupt video and a sample without caption,
    so that some batches carry skip counts."""
    out = tmp_path_factory.mktemp("resume_video")
    for shard in (synthetic_data / "train").glob("*.tar"):
        shutil.copy(shard, out / shard.name)
    g0, g1 = good("bad0", height=32, width=32), good("bad1", height=32, width=32, seed=1)
    write_shard(out, [("garbage", b"\x00not an mp4" * 300, "c", g0[3]), g0,
                      ("nocap", g1[1], None, g1[3]), g1], prefix="zz-bad")
    return out


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory):
    """Hand-made latent shards (no VAE needed): 5x32x32 and 9x32x32 samples, one broken."""
    out = tmp_path_factory.mktemp("resume_latents")
    gen = torch.Generator().manual_seed(0)
    (out / INFO_NAME).write_text(json.dumps(dict(format=FORMAT, vae_config={}, text_encoder="test",
                                                 text_dim=8)))
    (out / EMPTY_NAME).write_bytes(st_save({"text": torch.zeros(1, 8)}))
    for shard in range(3):
        with wds.TarWriter(str(out / f"shard-{shard:06d}.tar"), encoder=False) as sink:
            for i in range(8):
                frames, bucket = (2, "5x32x32") if i % 2 else (3, "9x32x32")
                data = encode_sample(torch.randn(4, frames, 4, 4, generator=gen),
                                     torch.randn(2 + i % 3, 8, generator=gen))
                if shard == 1 and i == 3:
                    data = b"broken"
                sink.write({"__key__": f"s{shard}_{i}", "safetensors": data, "txt": b"a caption",
                            "json": json.dumps({"bucket": bucket}).encode()})
    return out


def video_dataset(shards):
    return build_video_dataset(
        str(shards), buckets=["1x32x32", "5x32x32", "9x32x32"], bucket_weights=[1, 2, 1],
        batch_size=2, batches_per_epoch=EPOCH_BATCHES, shuffle_buffer=8, seed=3, dtype="uint8",
        rank=0, world_size=1,
    )


def latent_dataset(shards):
    dm = LatentDataModule(
        train=dict(shards=str(shards), max_tokens=24, batches_per_epoch=EPOCH_BATCHES, cfg_dropout=0.3,
                   shuffle_buffer=8, pack_buffer=8, schedule=[{"step": 5, "max_tokens": 36}]),
        patch_size=(1, 2, 2), seed=3,
    )
    return dm.train_dataset(rank=0, world_size=1)


def passes(dataset, epoch, starts, num_workers=2):
    """Passes of a persistent 2-worker loader over ``epoch``, starting at each of ``starts``."""
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=True)
    out = {}
    for start in starts:
        dataset.set_epoch(epoch, start)
        out[start] = list(loader)
    return out


def assert_same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, va in a.items():
        vb = b[k]
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), k
        elif dataclasses.is_dataclass(va):  # PackedBatch
            for f in dataclasses.fields(va):
                x, y = getattr(va, f.name), getattr(vb, f.name)
                assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, f.name
        else:
            assert va == vb, k


@pytest.mark.parametrize("which, epoch", [("video", 1), ("latents", 0)])
def test_resumed_pass_is_the_tail_of_the_full_pass(which, epoch, video_shards, latent_shards):
    dataset = video_dataset(video_shards) if which == "video" else latent_dataset(latent_shards)
    got = passes(dataset, epoch=epoch, starts=(0, 3, 4))
    full = got[0]
    assert len(full) == EPOCH_BATCHES
    assert sum(int(b["num_skipped"]) for b in full) > 0, "the test data has skips to carry"
    if which == "video":
        assert len({b["bucket"] for b in full}) > 1
    else:  # the schedule switches stage at batch 5, after both resume points
        assert [b["stage"] for b in full] == [0] * 5 + [1] * 2
    for start in (3, 4):  # odd and even: worker 0 plays stream 1, resp. 0
        assert len(got[start]) == EPOCH_BATCHES - start
        for a, b in zip(got[start], full[start:]):
            assert_same_batch(a, b)


def test_resume_plan_for_every_start_and_worker_count(latent_shards):
    """The rotation arithmetic, simulated without processes (round-robin as the loader does)."""
    dataset = latent_dataset(latent_shards)

    def merged(num_workers, start):
        streams = [list(dataset.iterate(worker=w, num_workers=num_workers, epoch=0, start_batch=start))
                   for w in range(num_workers)]
        return [s[i] for i in range(EPOCH_BATCHES) for s in streams if i < len(s)]

    for num_workers in (1, 2, 3):
        full = merged(num_workers, 0)
        assert [b["stage"] for b in full] == [0] * 5 + [1] * 2  # schedule: stage 1 from batch 5
        for start in range(EPOCH_BATCHES + 1):
            tail = merged(num_workers, start)
            assert len(tail) == EPOCH_BATCHES - start, (num_workers, start)
            for a, b in zip(tail, full[start:]):
                assert_same_batch(a, b)


def test_changed_stream_layout_is_named_on_resume(synthetic_data):
    def loader(num_workers, **kwargs):
        dm = VideoDataModule(train=dict(shards=str(synthetic_data / "train"), num_frames=5, height=32,
                                        width=32, batches_per_epoch=4),
                             num_workers=num_workers, **kwargs)
        return dm.train_dataloader()

    saved = loader(2).state_dict()
    assert saved == dict(num_workers=2, world_size=1, batches_per_epoch=4, seed=0)
    assert isinstance(loader(2), EpochDataLoader)
    with pytest.warns(UserWarning, match=r"data.num_workers = 1, but the checkpoint was saved with 2"):
        loader(1).load_state_dict(saved)
    with pytest.warns(UserWarning, match=r"data.seed = 1, but the checkpoint was saved with 0"):
        loader(2, seed=1).load_state_dict(saved)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader(2).load_state_dict(saved)
        loader(0).load_state_dict(dict(saved, num_workers=1))  # 0 and 1 worker: the same stream


# ---------------------------------------------------------------- whole runs
CKPT_EVERY_STEP = ["callbacks.model_checkpoint.every_n_train_steps=1", "data.num_workers=2",
                   "trainer.limit_val_batches=0"]


def _resume_at_3_of_6(cfg_fn, full, part, *args):
    """An uninterrupted 6-step run, and one stopped after step 3 (mid-epoch) and resumed."""
    train(cfg_fn(full, *args, "trainer.max_steps=6"))
    train(cfg_fn(part, *args, "trainer.max_steps=3"))
    ckpt = load_checkpoint_file(part / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    layout = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert [{k: v for k, v in d.items() if k != "seed"} for d in layout] == [
        dict(num_workers=2, world_size=1, batches_per_epoch=5)]  # the stream layout, for the check
    train(cfg_fn(part, *args, "trainer.max_steps=6", "ckpt_path=last"))
    a, b = _weights(full)[0], _weights(part)[0]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")


def test_vae_stage1_resumed_mid_epoch_equals_uninterrupted(tmp_path, synthetic_data):
    full, part = tmp_path / "full", tmp_path / "part"
    _resume_at_3_of_6(
        lambda run, *extra: vae_cfg(run, synthetic_data, "demo/vae_stage1", *extra),
        full, part, "data.train.batches_per_epoch=5", *CKPT_EVERY_STEP,
    )
    losses = _losses(full)
    assert len(losses) == 6 and losses[3:] == _losses(part)  # the resumed run's csv restarts


def test_dit_resumed_mid_epoch_equals_uninterrupted(tmp_path, setup):  # noqa: F811
    full, part = tmp_path / "full", tmp_path / "part"
    _resume_at_3_of_6(
        lambda run, *extra: dit_cfg(run, setup, "demo/dit_stage1", *extra),
        full, part, "data.train.batches_per_epoch=5", "data.train.cfg_dropout=0.3",
        "model.ema.warmup_steps=0", "data.train.schedule=[{step: 4, max_tokens: 96}]", *CKPT_EVERY_STEP,
    )
    losses = _series(full, "train/loss")
    assert len(losses) == 6 and losses[3:] == _series(part, "train/loss")
    assert _series(part, "train/max_tokens") == [48.0, 96.0, 96.0]  # the stage switch at batch 4
