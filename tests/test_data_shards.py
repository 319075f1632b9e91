"""vidgen.data.shards and vidgen.data.make_shards: writing, finding and building shards."""

import csv
import json
import tarfile

import numpy as np
import pytest

from vidgen.data.make_shards import list_sources, main, make_shards
from vidgen.data.pipeline import build_video_dataset
from vidgen.data.shards import VideoShardWriter, expand_shards, make_key
from vidgen.data.video import encode_mp4, probe_video


def tiny_mp4(num_frames: int = 6, height: int = 32, width: int = 32, fps: float = 8, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, size=(1, 1, 1, 3))
    ramp = np.linspace(0, 50, width)[None, None, :, None]
    frames = base + ramp + 5 * np.arange(num_frames)[:, None, None, None]
    frames = np.broadcast_to(frames, (num_frames, height, width, 3))
    return encode_mp4(np.clip(frames, 0, 255).astype(np.uint8), fps=fps)


def members(path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


# -- writer ----------------------------------------------------------------------------


def test_writer_rolls_by_count_and_bytes(tmp_path):
    mp4 = tiny_mp4()
    meta = probe_video(mp4)
    with VideoShardWriter(tmp_path / "a", max_samples=2) as w:
        for i in range(5):
            w.write(make_key(i, "clip.v1"), mp4, f"caption {i}", meta)
    assert [p.rsplit("/", 1)[1] for p in w.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert members(w.shards[0]) == [
        "000000000_clip_v1.json", "000000000_clip_v1.mp4", "000000000_clip_v1.txt",
        "000000001_clip_v1.json", "000000001_clip_v1.mp4", "000000001_clip_v1.txt",
    ]
    assert not list((tmp_path / "a").glob("*.tmp"))

    # A byte limit of ~1.5 samples puts one sample per shard (never an empty shard).
    with VideoShardWriter(tmp_path / "b", max_samples=100, max_bytes=int(len(mp4) * 1.5)) as w:
        for i in range(3):
            w.write(make_key(i), mp4, "c", meta)
    assert len(w.shards) == 3


def test_writer_rejects_bad_samples(tmp_path):
    w = VideoShardWriter(tmp_path)
    meta = dict(num_frames=1, fps=1.0, height=2, width=2, duration=1.0)
    with pytest.raises(ValueError, match="invalid sample key 'a.b'"):
        w.write("a.b", b"x", "c", meta)
    with pytest.raises(ValueError, match=r"lacks \['fps'"):
        w.write("k", b"x", "c", {"num_frames": 1})
    w.write("k", b"x", "c", meta)
    with pytest.raises(ValueError, match="duplicate sample key 'k'"):
        w.write("k", b"x", "c", meta)
    w.close()


# -- expand_shards -----------------------------------------------------------------------


def test_expand_shards_forms(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    names = [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert expand_shards(str(tmp_path / "{00000..00002}.tar")) == names
    assert expand_shards(str(tmp_path / "*.tar")) == names
    assert expand_shards(tmp_path) == names
    assert expand_shards([names[2], str(tmp_path / "0000[01].tar")]) == [names[2], names[0], names[1]]
    assert expand_shards("pipe:cat x.tar") == ["pipe:cat x.tar"]


def test_expand_shards_errors_name_the_pattern(tmp_path):
    pattern = str(tmp_path / "nothing-*.tar")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        expand_shards(pattern)
    (tmp_path / "00000.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"1 named shard\(s\) do not exist.*00001.tar"):
        expand_shards(str(tmp_path / "{00000..00001}.tar"))


# -- make_shards -------------------------------------------------------------------------


@pytest.fixture
def video_folder(tmp_path):
    """good.mp4, sub/good2.mp4 (captioned); nocap.mp4; broken.mp4 (garbage); short.mp4 (3 frames)."""
    src = tmp_path / "videos"
    (src / "sub").mkdir(parents=True)
    (src / "good.mp4").write_bytes(tiny_mp4(8, seed=1))
    (src / "good.txt").write_text("a good video\n")
    (src / "sub" / "good2.mp4").write_bytes(tiny_mp4(10, seed=2))
    (src / "sub" / "good2.txt").write_text("another good video")
    (src / "nocap.mp4").write_bytes(tiny_mp4(8, seed=3))
    (src / "broken.mp4").write_bytes(b"\x00garbage" * 200)
    (src / "broken.txt").write_text("never read")
    (src / "short.mp4").write_bytes(tiny_mp4(3, seed=4))
    (src / "short.txt").write_text("too short")
    return src


def test_make_shards_from_folder(video_folder, tmp_path):
    out = tmp_path / "shards"
    summary = make_shards(video_folder, out, min_frames=5, shard_size=1, progress=False)
    assert summary["written"] == 2
    assert summary["skipped"] == {"no_caption": 1, "unreadable": 1, "too_short": 1}
    reasons = {s["path"].rsplit("/", 1)[1]: s["reason"] for s in summary["skipped_files"]}
    assert reasons == {"nocap.mp4": "no_caption", "broken.mp4": "unreadable", "short.mp4": "too_short"}
    assert json.loads((out / "summary.json").read_text())["skipped_total"] == 3
    assert summary["shards"] == ["shard-000000.tar", "shard-000001.tar"]

    batches = list(build_video_dataset(str(out), resampled=False, num_frames=5, height=32, width=32, batch_size=4))
    assert len(batches) == 1
    batch = batches[0]
    assert sorted(batch["caption"]) == ["a good video", "another good video"]
    assert {m["source"] for m in batch["meta"]} == {"good.mp4", "sub/good2.mp4"}
    assert all(m["reencoded"] is False for m in batch["meta"])


def test_make_shards_refuses_to_mix_with_old_shards(video_folder, tmp_path):
    out = tmp_path / "shards"
    make_shards(video_folder, out, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_shards(video_folder, out, progress=False)
    assert make_shards(video_folder, out, overwrite=True, progress=False)["written"] == 3


def test_make_shards_from_csv_with_reencode_and_workers(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.mp4").write_bytes(tiny_mp4(16, 48, 64, fps=16, seed=1))
    (tmp_path / "clips" / "b.mp4").write_bytes(tiny_mp4(16, 48, 64, fps=16, seed=2))
    rows = [
        {"path": "clips/a.mp4", "caption": "first"},
        {"path": "clips/b.mp4", "caption": ""},  # empty caption
        {"path": "clips/missing.mp4", "caption": "gone"},  # no such file
        {"path": str(tmp_path / "clips" / "b.mp4"), "caption": "absolute path"},
    ]
    with open(tmp_path / "list.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "caption"])
        writer.writeheader()
        writer.writerows(rows)

    summary = make_shards(
        tmp_path / "list.csv", tmp_path / "out", reencode=True, fps=8, max_side=32, keyint=4,
        workers=2, progress=False,
    )
    assert summary["written"] == 2
    assert summary["skipped"] == {"no_caption": 1, "unreadable": 1, "too_short": 0}
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    for m in metas:
        # 16 frames at 16 fps -> 8 fps keeps every other frame; 48x64 -> long side 32.
        assert (m["num_frames"], m["fps"], m["height"], m["width"]) == (8, 8.0, 24, 32)
        assert (m["source_num_frames"], m["source_fps"], m["reencoded"]) == (16, 16.0, True)


def test_make_shards_from_jsonl(tmp_path):
    (tmp_path / "v.mp4").write_bytes(tiny_mp4(6))
    lines = [{"video": "v.mp4", "caption": "from jsonl"}, {"video": "v.mp4"}]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    summary = make_shards(tmp_path / "list.jsonl", tmp_path / "out", progress=False)
    assert summary["written"] == 1 and summary["skipped"]["no_caption"] == 1


def test_source_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="--src .*nope.*does not exist"):
        list_sources(tmp_path / "nope")
    (tmp_path / "bad.csv").write_text("file,text\nx.mp4,hi\n")
    with pytest.raises(ValueError, match=r"'path' \(or 'video' / 'image'\) and a 'caption' column, found \['file', 'text'\]"):
        list_sources(tmp_path / "bad.csv")
    (tmp_path / "bad.jsonl").write_text('{"path": "x.mp4"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        list_sources(tmp_path / "bad.jsonl")
    (tmp_path / "list.txt").write_text("x")
    with pytest.raises(ValueError, match="not a .csv or .jsonl"):
        list_sources(tmp_path / "list.txt")
    with pytest.raises(ValueError, match="need --reencode"):
        make_shards(tmp_path, tmp_path / "out", fps=8)


def test_cli_reports_bad_src_and_prints_summary(video_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err

    main(["--src", str(video_folder), "--out", str(tmp_path / "o"), "--min-frames", "5"])
    printed = capsys.readouterr().out
    assert "written" in printed and "too_short" in printed and "summary.json" in printed
