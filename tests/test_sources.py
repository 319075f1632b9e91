"""Weighted mixtures (`data.train.sources`): samples drawn from each source in proportion to
its weight, deterministically per (seed, rank, worker, epoch), resumed exactly, counted per
source in the batches and the training logs; bad specs are errors naming the source."""

import csv
import math

import pytest
from test_dit_train import _cfg as dit_cfg
from test_dit_train import _one_text_encoder, setup  # noqa: F401  (fixtures)
from test_train import _cfg as vae_cfg

from vidgen.data.datamodule import VideoDataModule
from vidgen.data.latents import LatentDataModule
from vidgen.data.pipeline import build_video_dataset
from vidgen.data.sources import parse_sources
from vidgen.data.synthetic import make_synthetic_dataset
from vidgen.run import train


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Two synthetic video sets, "a" (24 clips) and "b" (8 clips), 32 px, 9 frames."""
    root = tmp_path_factory.mktemp("sources")
    make_synthetic_dataset(root / "a", num_videos=24, size=32, frames=9, fps=8, val_videos=0, seed=1)
    make_synthetic_dataset(root / "b", num_videos=8, size=32, frames=9, fps=8, val_videos=0, seed=2)
    return root


def _video_mixture(two_sets, weights=(3, 1), **kwargs):
    sources = [dict(name="a", shards=str(two_sets / "a" / "train"), weight=weights[0]),
               dict(name="b", shards=str(two_sets / "b" / "train"), weight=weights[1])]
    return build_video_dataset(sources=sources, num_frames=5, height=32, width=32, batch_size=4,
                               shuffle_buffer=8, batches_per_epoch=24, seed=5, rank=0, world_size=1, **kwargs)


def _source_of(meta):
    return "a" if "/a/" in meta["shard"] else "b"


def test_samples_follow_the_weights_and_are_counted_per_source(two_sets):
    batches = list(_video_mixture(two_sets).iterate())
    drawn = [_source_of(m) for b in batches for m in b["meta"]]
    n, share = len(drawn), drawn.count("a") / len(drawn)
    assert n == 96 and abs(share - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n), share  # binomial, 4 sigma
    for b in batches:  # each batch counts its samples per source
        counts = {k: v for k, v in b["counts"].items() if k.startswith("source/")}
        expect = {f"source/{s}/samples": [_source_of(m) for m in b["meta"]].count(s) for s in "ab"}
        assert counts == {k: v for k, v in expect.items() if v}


def test_the_mixture_is_a_function_of_seed_rank_worker_epoch_and_resumes_exactly(two_sets):
    ds = _video_mixture(two_sets)

    def keys(batches):
        return [(m["shard"], k) for b in batches for m, k in zip(b["meta"], b["key"])]

    full = list(ds.iterate(worker=1, num_workers=2, epoch=3))
    assert keys(full) == keys(ds.iterate(worker=1, num_workers=2, epoch=3))
    assert keys(full) != keys(ds.iterate(worker=0, num_workers=2, epoch=3))
    assert keys(full) != keys(ds.iterate(worker=1, num_workers=2, epoch=4))
    # a pass resumed at batch 9 of the epoch: loader worker 0 plays stream 1 from its 5th batch
    resumed = list(ds.iterate(worker=0, num_workers=2, epoch=3, start_batch=9))
    assert keys(resumed) == keys(full[4:])
    for a, b in zip(resumed, full[4:]):
        assert a["counts"] == b["counts"]


def test_bad_sources_are_errors_naming_them(two_sets):
    good = dict(name="a", shards=str(two_sets / "a" / "train"), weight=1)
    with pytest.raises(ValueError, match=r"data.train.sources\[1\] \(b\): weight must be a finite number > 0, got 0"):
        parse_sources([good, dict(name="b", shards=str(two_sets / "b" / "train"), weight=0)], None)
    with pytest.raises(ValueError, match=r"sources\[0\] \(a\): weight .* got -1"):
        parse_sources([dict(good, weight=-1)], None)
    with pytest.raises(FileNotFoundError, match=r"sources\[1\] \(gone\): shard pattern .*nothing.*matches no shards"):
        parse_sources([good, dict(name="gone", shards=str(two_sets / "nothing" / "*.tar"))], None)
    with pytest.raises(ValueError, match="give shards or sources, not both.*shards=null"):
        parse_sources([good], str(two_sets / "a" / "train"))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['weigth'\]"):
        parse_sources([dict(name="a", shards=good["shards"], weigth=2)], None)
    with pytest.raises(ValueError, match="used twice"):
        parse_sources([good, good], None)
    with pytest.raises(ValueError, match=r"sources\[1\] \(b\): weight"):  # at construction, as Hydra builds it
        VideoDataModule(train=dict(sources=[good, dict(name="b", shards=good["shards"], weight=0)]))
    with pytest.raises(ValueError, match="only apply to resampled"):
        build_video_dataset(sources=[good], resampled=False)


def test_latent_sources_mix_into_packs_and_are_counted(setup):  # noqa: F811
    dm = LatentDataModule(
        train=dict(sources=[dict(name="clips", shards=str(setup / "train"), weight=1),
                            dict(name="more", shards=str(setup / "val"), weight=1)],
                   max_tokens=40, batches_per_epoch=12),
        patch_size=(1, 2, 2), seed=0)
    batches = list(dm.train_dataset(rank=0, world_size=1).iterate())
    per_source = {s: sum(b["counts"].get(f"source/{s}/samples", 0) for b in batches) for s in ("clips", "more")}
    assert sum(per_source.values()) == sum(b["packed"].num_samples for b in batches)
    n = sum(per_source.values())
    assert abs(per_source["clips"] / n - 0.5) < 4 * math.sqrt(0.25 / n), per_source
    again = list(dm.train_dataset(rank=0, world_size=1).iterate())
    assert [m["key"] for b in again for m in b["packed"].meta] == [m["key"] for b in batches for m in b["packed"].meta]


def test_vae_and_dit_train_on_mixtures_and_log_per_source_counts(tmp_path, two_sets, synthetic_data, setup):  # noqa: F811
    sources = (f"[{{name: a, shards: '{two_sets}/a/train', weight: 3}},"
               f" {{name: b, shards: '{two_sets}/b/train', weight: 1}}]")
    metrics = train(vae_cfg(tmp_path / "vae", synthetic_data, "demo/vae_stage1", "data.train.shards=null",
                            f"data.train.sources={sources}", "trainer.max_steps=3",
                            "data.train.batches_per_epoch=3"))
    a, b = metrics["data/source/a/samples"], metrics.get("data/source/b/samples", 0.0)
    assert a + b == 3 * 4  # every trained clip is counted once, under its source
    lat = f"[{{name: clips, shards: '{setup}/train', weight: 1}}, {{name: more, shards: '{setup}/val', weight: 1}}]"
    metrics = train(dit_cfg(tmp_path / "dit", setup, "demo/dit_stage1", "data.train.shards=null",
                            f"data.train.sources={lat}", "trainer.max_steps=3", "trainer.limit_val_batches=0",
                            "trainer.log_every_n_steps=1"))
    with open(tmp_path / "dit" / "csv" / "metrics.csv") as f:
        trained = sum(float(r["train/samples"]) for r in csv.DictReader(f) if r.get("train/samples"))
    counted = metrics.get("data/source/clips/samples", 0.0) + metrics.get("data/source/more/samples", 0.0)
    assert counted == trained


def test_remote_latent_shards_are_a_clear_error():
    with pytest.raises(ValueError, match="latent shards are read from local or mounted folders.*http://h/x.tar"):
        LatentDataModule(train=dict(shards="http://h/x.tar", max_tokens=8), patch_size=(1, 2, 2))
