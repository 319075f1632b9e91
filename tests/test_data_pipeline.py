"""vidgen.data.pipeline: decoding, bucketing, skipping, and per-rank/worker streams."""

import io
import logging
import tarfile

import decord
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vidgen.data.pipeline import SKIP_REASONS, build_video_dataset, keep_batch
from vidgen.data.synthetic import make_synthetic_dataset
from vidgen.data.video import encode_mp4, probe_video, resize_crop, to_model_range


def clip_frames(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """Smooth frames that differ per frame and per seed: uint8 [T, H, W, 3]."""
    t, y, x = np.meshgrid(np.arange(num_frames), np.arange(height), np.arange(width), indexing="ij")
    r = 128 + 90 * np.sin(2 * np.pi * (x + 2 * t + seed * 7) / width)
    g = 128 + 90 * np.cos(2 * np.pi * y / height + seed)
    b = 40 + 6 * t + 3 * seed
    return np.clip(np.stack(np.broadcast_arrays(r, g, b), -1), 0, 255).astype(np.uint8)


def write_shard(out_dir, samples, prefix="shard"):
    """samples: (key, mp4 bytes | None, caption | None, meta | None); None members are left out."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{prefix}.tar"
    with tarfile.open(path, "w") as tar:
        for key, mp4, caption, meta in samples:
            import json

            members = {"mp4": mp4, "txt": caption.encode() if caption is not None else None,
                       "json": json.dumps(meta).encode() if meta is not None else None}
            for ext, data in members.items():
                if data is None:
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def good(key, num_frames=12, height=32, width=40, seed=0):
    mp4 = encode_mp4(clip_frames(num_frames, height, width, seed), fps=8, keyint=4)
    return key, mp4, f"caption {key}", probe_video(mp4)


def collect(dataset):
    batches = list(dataset)
    keys = [k for b in batches for k in b["key"]]
    skipped = {r: sum(b["skipped"][r] for b in batches) for r in SKIP_REASONS}
    return batches, keys, skipped


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """24 synthetic 32px, 9-frame videos in 3 shards (+ 4 val videos)."""
    out = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(out, num_videos=24, size=32, frames=9, val_videos=4, seed=0, shard_size=8)
    return out


# -- decoding ---------------------------------------------------------------------------


def test_round_trip_matches_decord_after_same_resize(tmp_path):
    samples = [good(f"v{i}", num_frames=20, height=48, width=64, seed=i) for i in range(3)]
    shard = write_shard(tmp_path, samples)
    ds = build_video_dataset(str(shard), resampled=False, num_frames=5, frame_stride=2,
                             height=32, width=32, batch_size=3)
    (batch,) = list(ds)
    assert batch["video"].shape == (3, 3, 5, 32, 32) and batch["video"].dtype == torch.float32
    assert batch["key"] == ["v0", "v1", "v2"] and batch["caption"][1] == "caption v1"
    # Centred clip: 5 frames at stride 2 span 9 of 20 -> start (20 - 9) // 2 = 5.
    expected_indices = [5, 7, 9, 11, 13]
    for i, (_, mp4, _, _) in enumerate(samples):
        assert batch["meta"][i]["frame_indices"] == expected_indices
        frames = decord.VideoReader(io.BytesIO(mp4), num_threads=1).get_batch(expected_indices).asnumpy()
        assert torch.equal(batch["video"][i], resize_crop(frames, 32, 32))
    assert int(batch["num_skipped"]) == 0


@pytest.mark.parametrize("size", [32, 24])  # the shards' own size (crop only), and a resize
def test_uint8_batches_give_the_float_batches_after_conversion(synth, size):
    kwargs = dict(num_frames=5, height=size, width=size, batch_size=4, batches_per_epoch=3,
                  shuffle_buffer=8, seed=3)
    as_float = list(build_video_dataset(str(synth / "train"), **kwargs))
    as_uint8 = list(build_video_dataset(str(synth / "train"), dtype="uint8", **kwargs))
    assert [b["key"] for b in as_uint8] == [b["key"] for b in as_float]
    for u, f in zip(as_uint8, as_float):
        assert u["video"].dtype == torch.uint8 and u["video"].shape == f["video"].shape
        # Channel-last bytes, as the decoders write them; the conversion makes them contiguous.
        assert u["video"].permute(0, 2, 3, 4, 1).is_contiguous() and not u["video"].is_contiguous()
        converted = to_model_range(u["video"])
        assert converted.dtype == torch.float32 and converted.is_contiguous()
        if size == 32:
            assert torch.equal(converted, f["video"])
        else:  # resized pixels are rounded to uint8: at most half a level apart
            assert (converted - f["video"]).abs().max() <= 0.5 / 127.5 + 1e-6
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_video_dataset(str(synth / "train"), dtype="float16")


def test_uint8_batches_through_worker_processes(synth):
    ds = build_video_dataset(str(synth / "train"), num_frames=5, height=32, width=32, batch_size=2,
                             batches_per_epoch=2, shuffle_buffer=4, dtype="uint8")
    batches = list(DataLoader(ds, batch_size=None, num_workers=1))
    assert len(batches) == 2 and all(b["video"].dtype == torch.uint8 for b in batches)
    assert max(int(b["video"].max()) for b in batches) > 128  # pixels, not [-1, 1]


def test_target_fps_spacing(tmp_path):
    mp4 = encode_mp4(clip_frames(16, 32, 32, 0), fps=16)
    shard = write_shard(tmp_path, [("a", mp4, "c", probe_video(mp4))])
    (batch,) = list(build_video_dataset(str(shard), resampled=False, num_frames=4, target_fps=8,
                                        height=32, width=32, batch_size=1))
    assert batch["meta"][0]["frame_indices"] == [4, 6, 8, 10]  # 16 -> 8 fps: every other frame, centred


def test_image_mode_one_frame(synth):
    ds = build_video_dataset(str(synth / "train"), mode="image", height=32, width=32, batch_size=4,
                             batches_per_epoch=3)
    batches = list(ds)
    assert len(batches) == 3
    assert all(b["video"].shape == (4, 3, 1, 32, 32) for b in batches)
    picked = {m["frame_indices"][0] for b in batches for m in b["meta"]}
    assert len(picked) > 1 and max(picked) <= 8  # random frames, within the 9-frame videos


# -- bad input --------------------------------------------------------------------------


def test_corrupt_and_truncated_videos_are_skipped_and_counted(tmp_path, caplog):
    g0, g1, g2 = good("g0", seed=0), good("g1", seed=1), good("g2", seed=2)
    garbage = ("garbage", b"\x00not an mp4" * 300, "c", g0[3])
    truncated = ("truncated", g1[1][: len(g1[1]) // 2], "c", g1[3])
    shard = write_shard(tmp_path, [g0, garbage, g1, truncated, g2])
    with caplog.at_level(logging.WARNING, logger="vidgen.data.pipeline"):
        batches, keys, skipped = collect(build_video_dataset(
            str(shard), resampled=False, num_frames=4, height=32, width=32, batch_size=1))
    assert keys == ["g0", "g1", "g2"]  # the rest of the shard survives
    assert skipped["decode_error"] == 2
    assert sum(int(b["num_skipped"]) for b in batches) == 2
    # Skips ride on the worker's next batch: garbage on g1's, truncated on g2's.
    assert [int(b["num_skipped"]) for b in batches] == [0, 1, 1]
    assert "garbage" in caplog.text and "truncated" in caplog.text and "decode_error" in caplog.text


def test_missing_members_and_bad_meta(tmp_path):
    g = good("ok")
    shard = write_shard(tmp_path, [
        ("nocap", g[1], None, g[3]),
        ("emptycap", g[1], "   ", g[3]),
        ("novideo", None, "c", g[3]),
        ("notobject", g[1], "c", "a JSON string"),
        ("badmeta", g[1], "c", {**g[3], "fps": 0}),
        ("nometa", g[1], "c", None),  # no facts: read from the video itself, and counted
        ("partial", g[1], "c", {"num_frames": 12}),
        g,
    ])
    batches, keys, skipped = collect(build_video_dataset(str(shard), resampled=False, num_frames=4,
                                                         height=32, width=32, batch_size=1))
    assert keys == ["nometa", "partial", "ok"]
    assert sum(b["counts"].get("probed_meta", 0) for b in batches) == 2
    assert batches[0]["meta"][0]["num_frames"] == g[3]["num_frames"]
    assert skipped["no_caption"] == 2 and skipped["missing_video"] == 1 and skipped["bad_meta"] == 2


def test_unreadable_shards_are_skipped(tmp_path):
    good_shard = write_shard(tmp_path, [good("a"), good("b", seed=1)], prefix="3-good")
    (tmp_path / "1-garbage.tar").write_bytes(b"this is not a tar file" * 100)
    full = write_shard(tmp_path, [good(f"t{i}", seed=i) for i in range(3)], prefix="2-cut").read_bytes()
    (tmp_path / "2-cut.tar").write_bytes(full[: int(len(full) * 0.6)])
    # Each bad shard is tried twice (no waiting), then skipped and counted once.
    _, keys, skipped = collect(build_video_dataset(str(tmp_path), resampled=False, num_frames=4,
                                                   height=32, width=32, batch_size=1,
                                                   shard_retry=dict(attempts=2, backoff=0)))
    assert skipped["unreadable_shard"] == 2
    assert keys[-2:] == ["a", "b"] and set(keys[:-2]) <= {"t0", "t1"}
    assert good_shard.exists()


def test_too_short_for_every_bucket_is_counted(tmp_path):
    shard = write_shard(tmp_path, [good("short", num_frames=4), good("long", num_frames=12)])
    _, keys, skipped = collect(build_video_dataset(str(shard), resampled=False, num_frames=9,
                                                   height=32, width=32, batch_size=1))
    assert keys == ["long"] and skipped["too_short"] == 1


def test_resampled_stream_with_nothing_usable_raises(tmp_path):
    shard = write_shard(tmp_path, [good("short", num_frames=4)])
    ds = build_video_dataset(str(shard), num_frames=9, height=32, width=32, batch_size=1, shuffle_buffer=1)
    logging.getLogger("vidgen.data.pipeline").setLevel(logging.ERROR)  # 200 expected warnings
    try:
        with pytest.raises(RuntimeError, match="no usable sample.*too_short"):
            next(iter(ds))
    finally:
        logging.getLogger("vidgen.data.pipeline").setLevel(logging.NOTSET)


def test_empty_pattern_fails_at_build_time(tmp_path):
    with pytest.raises(FileNotFoundError, match="empty-dir"):
        build_video_dataset(str(tmp_path / "empty-dir" / "*.tar"))


def test_bad_arguments_are_rejected(synth):
    shards = str(synth / "train")
    with pytest.raises(ValueError, match="mode must be"):
        build_video_dataset(shards, mode="audio")
    with pytest.raises(ValueError, match="not both"):
        build_video_dataset(shards, frame_stride=2, target_fps=8)
    with pytest.raises(ValueError, match="batches_per_epoch only applies"):
        build_video_dataset(shards, resampled=False, batches_per_epoch=3)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        build_video_dataset(shards, rank=2, world_size=2)


# -- buckets ----------------------------------------------------------------------------


def test_batches_never_mix_buckets(tmp_path):
    samples = [good(f"sq{i}", height=32, width=32, seed=i) for i in range(3)]
    samples += [good(f"wide{i}", height=32, width=64, seed=i) for i in range(3)]
    samples = [samples[i] for i in (0, 3, 1, 4, 2, 5)]  # interleaved in the shard
    shard = write_shard(tmp_path, samples)
    batches, keys, _ = collect(build_video_dataset(str(shard), resampled=False, batch_size=2,
                                                   buckets=["5x32x32", "9x32x64"]))
    assert sorted(keys) == sorted(s[0] for s in samples)
    for b in batches:
        (bucket,) = {m["bucket"] for m in b["meta"]}
        assert b["bucket"] == bucket  # also at the top level, one string per batch
        frames, height, width = (int(v) for v in bucket.split("x"))
        assert b["video"].shape[1:] == (3, frames, height, width)
    # Full batches first (as filled), then the partial ones flushed at the end.
    assert [len(b["key"]) for b in batches] == [2, 2, 1, 1]


CHI2_3DF_1E4 = 21.11  # scipy.stats.chi2.ppf(1 - 1e-4, 3)


def test_each_sample_draws_among_the_buckets_it_fits_with_the_weights(tmp_path):
    long = [good(f"long{i}", num_frames=17, height=32, width=32, seed=i) for i in range(4)]
    shard = write_shard(tmp_path, [*long, good("short", num_frames=7, height=32, width=32, seed=9)])
    buckets, weights = ["1x32x32", "5x32x32", "9x32x32", "17x32x32"], [1, 2, 1, 4]
    ds = build_video_dataset(str(shard), buckets=buckets, bucket_weights=weights, batch_size=1,
                             batches_per_epoch=240, shuffle_buffer=1, seed=0)
    batches = list(ds)
    assert len(batches) == 240
    drawn = {"long": [], "short": []}
    for b in batches:
        (m,) = b["meta"]
        frames, height, width = (int(v) for v in b["bucket"].split("x"))
        assert m["bucket"] == b["bucket"] and b["video"].shape == (1, 3, frames, height, width)
        assert len(m["frame_indices"]) == frames and max(m["frame_indices"]) < m["num_frames"]
        drawn["short" if b["key"] == ["short"] else "long"].append(b["bucket"])
    assert set(drawn["short"]) == {"1x32x32", "5x32x32"}  # never a bucket it cannot fill
    counts, n = {k: drawn["long"].count(k) for k in buckets}, len(drawn["long"])
    chi2 = sum((counts[k] - n * w / 8) ** 2 / (n * w / 8) for k, w in zip(buckets, weights))
    assert chi2 < CHI2_3DF_1E4, counts
    # reproducible: the draws come from the stream's seeded generator
    again = build_video_dataset(str(shard), buckets=buckets, bucket_weights=weights, batch_size=1,
                                batches_per_epoch=40, shuffle_buffer=1, seed=0)
    assert [b["bucket"] for b in again] == [b["bucket"] for b in batches[:40]]
    other = build_video_dataset(str(shard), buckets=buckets, bucket_weights=weights, batch_size=1,
                                batches_per_epoch=40, shuffle_buffer=1, seed=1)
    assert [b["bucket"] for b in other] != [b["bucket"] for b in batches[:40]]


def test_aspect_rule_and_bucket_weight_arguments(tmp_path, synth):
    square, wide = good("square", height=32, width=32), good("wide", height=32, width=64)
    shard = write_shard(tmp_path, [wide, square])
    _, keys, skipped = collect(build_video_dataset(str(shard), resampled=False, buckets=["5x32x32"],
                                                   max_aspect_distortion=1.5, batch_size=1))
    assert keys == ["square"] and skipped["aspect_mismatch"] == 1 and skipped["too_short"] == 0
    image = build_video_dataset(str(synth / "train"), mode="image", buckets=["5x32x32", "9x32x32", "5x32x48"],
                                bucket_weights=[1, 1, 2])
    assert [str(b) for b in image.buckets] == ["1x32x32", "1x32x48"] and image.bucket_weights == [2.0, 2.0]
    dropped = build_video_dataset(str(synth / "train"), buckets=["5x32x32", "1x32x32"], bucket_weights=[3, 0])
    assert [str(b) for b in dropped.buckets] == ["5x32x32"]
    with pytest.raises(ValueError, match=r"bucket_weights has 3 entries \[1, 2, 3\] for the 2 buckets"):
        build_video_dataset(str(synth / "train"), buckets=["5x32x32", "1x32x32"], bucket_weights=[1, 2, 3])
    with pytest.raises(ValueError, match="only apply to resampled"):
        build_video_dataset(str(synth / "val"), resampled=False, bucket_weights=[1])
    with pytest.raises(ValueError, match="max_aspect_distortion must be >= 1"):
        build_video_dataset(str(synth / "train"), max_aspect_distortion=0.5)


# -- streams: ranks, workers, epochs ----------------------------------------------------


def stream_signature(ds, **kwargs):
    return [(k, tuple(m["frame_indices"])) for b in ds.iterate(**kwargs) for k, m in zip(b["key"], b["meta"])]


def test_epoch_length_is_split_exactly_across_workers(synth):
    ds = build_video_dataset(str(synth / "train"), num_frames=5, height=32, width=32, batch_size=2,
                             batches_per_epoch=7, shuffle_buffer=8, rank=0, world_size=1)
    counts = [len(list(ds.iterate(worker=w, num_workers=3))) for w in range(3)]
    assert counts == [3, 2, 2] and len(ds) == 7
    # Resuming after 4 batches leaves 3 for the rest of the epoch.
    assert sum(len(list(ds.iterate(worker=w, num_workers=2, start_batch=4))) for w in range(2)) == 3


def test_rank_from_env_and_distinct_reproducible_streams(synth, monkeypatch):
    kwargs = dict(num_frames=5, height=32, width=32, batch_size=2, batches_per_epoch=4, shuffle_buffer=8)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rank1 = build_video_dataset(str(synth / "train"), **kwargs)
    assert (rank1.rank, rank1.world_size) == (1, 2)
    monkeypatch.setenv("RANK", "0")
    rank0 = build_video_dataset(str(synth / "train"), **kwargs)

    streams = {
        "r0w0e0": stream_signature(rank0, worker=0, num_workers=2, epoch=0),
        "r0w1e0": stream_signature(rank0, worker=1, num_workers=2, epoch=0),
        "r1w0e0": stream_signature(rank1, worker=0, num_workers=2, epoch=0),
        "r0w0e1": stream_signature(rank0, worker=0, num_workers=2, epoch=1),
    }
    assert all(len(s) == 4 for s in streams.values())  # 2 batches of 2 per worker
    assert len({tuple(s) for s in streams.values()}) == 4
    assert stream_signature(rank0, worker=0, num_workers=2, epoch=0) == streams["r0w0e0"]
    other_seed = build_video_dataset(str(synth / "train"), seed=1, **kwargs)
    assert stream_signature(other_seed, worker=0, num_workers=2, epoch=0) != streams["r0w0e0"]


def test_validation_splits_shards_over_ranks_and_workers(synth):
    seen = []
    for rank in range(2):
        ds = build_video_dataset(str(synth / "train"), resampled=False, num_frames=5, height=32, width=32,
                                 batch_size=4, rank=rank, world_size=2)
        for w in range(2):
            seen += stream_signature(ds, worker=w, num_workers=2)
    keys = [k for k, _ in seen]
    assert len(keys) == 24 and len(set(keys)) == 24  # 3 shards x 8 videos, each read once
    assert all(idx == (2, 3, 4, 5, 6) for _, idx in seen)  # centred clips of 9-frame videos


def test_dataloader_workers_share_the_epoch(synth):
    ds = build_video_dataset(str(synth / "train"), num_frames=5, height=32, width=32, batch_size=2,
                             batches_per_epoch=5, shuffle_buffer=8)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    ds.set_epoch(0)
    epoch0 = [b["key"] for b in loader]
    ds.set_epoch(1)  # persistent workers read it from shared memory
    epoch1 = [b["key"] for b in loader]
    ds.set_epoch(0)
    again = [b["key"] for b in loader]
    assert len(epoch0) == len(epoch1) == 5
    assert epoch0 != epoch1 and epoch0 == again
    assert isinstance(next(iter(loader))["num_skipped"], int)


def test_uint8_batches_from_workers_give_the_float_batches(synth):
    """uint8 batches cross from the workers in shared memory in their channel-last layout."""
    kwargs = dict(num_frames=5, height=32, width=32, batch_size=3, batches_per_epoch=4,
                  shuffle_buffer=8, seed=1)

    def batches(dtype):
        dataset = build_video_dataset(str(synth / "train"), dtype=dtype, **kwargs)
        return list(DataLoader(dataset, batch_size=None, collate_fn=keep_batch, num_workers=2))

    as_uint8, as_float = batches("uint8"), batches("float32")
    assert [b["key"] for b in as_uint8] == [b["key"] for b in as_float] and len(as_uint8) == 4
    for u, f in zip(as_uint8, as_float):
        assert u["video"].permute(0, 2, 3, 4, 1).is_contiguous()
        assert torch.equal(to_model_range(u["video"]), f["video"])
