"""Shards as other tools write them: video2dataset's layout (``{key}.mp4`` / ``.txt`` /
``.json`` with url, key, status, caption and, with its ffprobe subsampler, ffprobe's
``video_metadata``; no num_frames or fps), with failed-download records among them."""

import io
import json
from fractions import Fraction

import av
import pytest
import webdataset as wds
from test_data_pipeline import clip_frames, collect
from test_train import _cfg as vae_cfg

from vidgen.data.metadata import BadMetadata, ffprobe_facts, stream_facts
from vidgen.data.pipeline import build_video_dataset
from vidgen.data.video import encode_mp4, probe_video
from vidgen.run import train


def ffprobe_json(mp4: bytes) -> dict:
    """What `ffprobe -v quiet -print_format json -show_format -show_streams` prints for the
    file, in ffprobe's field names and types (numbers as strings where ffprobe writes them),
    read through PyAV (ffprobe itself is not installed here)."""
    with av.open(io.BytesIO(mp4)) as c:
        s = c.streams.video[0]
        rate, tb = Fraction(s.average_rate), Fraction(s.time_base)
        duration = float(s.duration * tb) if s.duration else float(c.duration / 1e6)
        stream = {
            "index": 0, "codec_name": s.codec_context.name, "codec_type": "video",
            "width": s.codec_context.width, "height": s.codec_context.height,
            "pix_fmt": "yuv420p", "r_frame_rate": f"{rate.numerator}/{rate.denominator}",
            "avg_frame_rate": f"{rate.numerator}/{rate.denominator}",
            "time_base": f"{tb.numerator}/{tb.denominator}", "duration": f"{duration:.6f}",
            "nb_frames": str(s.frames), "disposition": {"default": 1},
        }
        fmt = {"filename": "/tmp/tmpxyz/input.mp4", "nb_streams": 1, "format_name": "mov,mp4,m4a,3gp,3g2,mj2",
               "duration": f"{float(c.duration / 1e6):.6f}", "size": str(len(mp4))}
    return {"streams": [stream], "format": fmt}


def write_video2dataset_shard(path, clips, ffprobe=True, failed=()):
    """A shard written the way video2dataset's WebDatasetSampleWriter writes one: keys of
    shard id + index, `txt` always (empty for a missing caption), `json` with indent=4,
    and for failed downloads a record with no video."""
    with wds.TarWriter(str(path)) as tar:
        for i, (mp4, caption) in enumerate(clips):
            key = f"00000{i:04d}"
            meta = {"url": f"https://example.com/v/{i}.mp4", "key": key, "status": "success",
                    "error_message": None, "caption": caption}
            if ffprobe:
                meta["video_metadata"] = ffprobe_json(mp4)
            tar.write({"__key__": key, "mp4": mp4, "txt": caption, "json": json.dumps(meta, indent=4)})
        for j, key in enumerate(failed):
            meta = {"url": f"https://example.com/gone/{j}.mp4", "key": key, "status": "failed_to_download",
                    "error_message": "HTTP Error 404: Not Found", "caption": "lost"}
            tar.write({"__key__": key, "txt": "lost", "json": json.dumps(meta, indent=4)})
    return path


@pytest.fixture(scope="module")
def clips():
    return [(encode_mp4(clip_frames(12, 32, 40, seed=i), fps=8), f"clip {i}") for i in range(4)]


def _read(shard, **kwargs):
    return collect(build_video_dataset(str(shard), resampled=False, num_frames=5, height=32, width=32,
                                       batch_size=1, **kwargs))


def test_ffprobe_metadata_gives_the_facts_decord_sees(clips):
    for mp4, _ in clips:
        facts = ffprobe_facts(ffprobe_json(mp4))
        probed = probe_video(mp4)
        assert {k: facts[k] for k in ("num_frames", "height", "width")} == \
            {k: probed[k] for k in ("num_frames", "height", "width")}
        assert facts["fps"] == pytest.approx(probed["fps"], rel=1e-6)


@pytest.mark.parametrize("ffprobe", [True, False], ids=["with-ffprobe", "no-ffprobe"])
def test_video2dataset_shards_train_and_count_what_was_probed(tmp_path, clips, ffprobe):
    shard = write_video2dataset_shard(tmp_path / "00000.tar", clips, ffprobe=ffprobe, failed=["000000099"])
    batches, keys, skipped = _read(shard)
    assert sorted(keys) == [f"00000{i:04d}" for i in range(4)]
    assert skipped["missing_video"] == 1 and sum(skipped.values()) == 1  # the failed download
    probed = sum(b["counts"].get("probed_meta", 0) for b in batches)
    assert probed == (0 if ffprobe else 4)
    for b in batches:  # the facts the buckets were chosen from, and video2dataset's own fields
        meta = b["meta"][0]
        assert (meta["num_frames"], meta["height"], meta["width"]) == (12, 32, 40)
        assert meta["status"] == "success" and meta["url"].startswith("https://example.com/v/")


def test_invalid_metadata_is_still_bad_meta(clips):
    mp4 = clips[0][0]
    with pytest.raises(BadMetadata, match="not an object"):
        stream_facts(["a", "list"], mp4)
    with pytest.raises(BadMetadata, match="must be numbers > 0"):
        stream_facts({"num_frames": -3, "fps": 8, "height": 32, "width": 40}, mp4)
    with pytest.raises(BadMetadata, match="must be numbers > 0"):
        stream_facts({"num_frames": "12", "fps": 8, "height": 32, "width": 40}, mp4)
    meta, source = stream_facts({"num_frames": 12, "fps": 8.0, "height": 32, "width": 40}, mp4)
    assert source == "shard" and meta["duration"] == 1.5
    with pytest.raises(RuntimeError):  # nothing in the shard and no readable video
        stream_facts({}, b"\x00not a video" * 50)


def test_vae_stage1_trains_on_video2dataset_shards_and_logs_probes(tmp_path, clips, synthetic_data):
    shards = tmp_path / "v2d"
    shards.mkdir()
    write_video2dataset_shard(shards / "00000.tar", clips, ffprobe=False, failed=["000000098"])
    cfg = vae_cfg(tmp_path / "run", synthetic_data, "demo/vae_stage1", f"data.train.shards={shards}",
                  "trainer.max_steps=2", "data.train.batches_per_epoch=2", "data.batch_size=2",
                  "data.train.shuffle_buffer=1")
    metrics = train(cfg)
    assert metrics["data/probed_meta"] >= 4  # every trained clip (2 steps x 2) was probed
