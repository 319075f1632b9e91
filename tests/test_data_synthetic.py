"""vidgen.data.synthetic: deterministic captioned videos in train/val shards."""

import re
import tarfile

import numpy as np
import pytest

from vidgen.data.synthetic import (
    BACKGROUNDS,
    COLOURS,
    MOTIONS,
    SHAPES,
    main,
    make_synthetic_dataset,
    render_video,
)
from vidgen.data.video import decode_frames

CAPTION = re.compile(
    rf"an? ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) moving ({'|'.join(MOTIONS)}) "
    rf"on an? ({'|'.join(COLOURS)}) ({'|'.join(BACKGROUNDS)}) background"
)


def read_samples(shards: list[str]) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for path in shards:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_same_seed_gives_identical_shards(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", num_videos=6, size=32, frames=9, val_videos=2, seed=3, shard_size=4)
    b = make_synthetic_dataset(tmp_path / "b", num_videos=6, size=32, frames=9, val_videos=2, seed=3, shard_size=4)
    assert len(a["train"]) == 2 and len(a["val"]) == 1
    for pa, pb in zip(a["train"] + a["val"], b["train"] + b["val"]):
        assert open(pa, "rb").read() == open(pb, "rb").read()

    c = make_synthetic_dataset(tmp_path / "c", num_videos=6, size=32, frames=9, seed=4, shard_size=4)
    assert c["val"] == []
    assert read_samples(a["train"]).keys() == read_samples(c["train"]).keys()
    assert [s["mp4"] for s in read_samples(a["train"]).values()] != [s["mp4"] for s in read_samples(c["train"]).values()]


def test_captions_describe_the_video_and_val_is_held_out(tmp_path):
    shards = make_synthetic_dataset(tmp_path, num_videos=12, size=32, frames=9, fps=8, val_videos=12, seed=0)
    train, val = read_samples(shards["train"]), read_samples(shards["val"])
    assert len(train) == 12 and len(val) == 12
    for sample in list(train.values()) + list(val.values()):
        caption = sample["txt"].decode()
        match = CAPTION.fullmatch(caption)
        assert match, caption
        assert match.group(1) != match.group(4)  # shape colour differs from the background
        frames = decode_frames(sample["mp4"], list(range(9)))
        assert frames.shape == (9, 32, 32, 3)
    # Held-out split: different random streams -> different videos.
    assert {s["mp4"] for s in train.values()}.isdisjoint({s["mp4"] for s in val.values()})


def centroid(frame: np.ndarray, colour: str) -> np.ndarray:
    """(x, y) centre of the pixels close to a palette colour."""
    ys, xs = np.nonzero(np.abs(frame.astype(float) - np.array(COLOURS[colour])).sum(-1) < 30)
    return np.array([xs.mean(), ys.mean()])


def test_shape_moves_in_the_stated_direction():
    for seed in range(20):
        video, info = render_video(48, 9, np.random.default_rng(seed))
        moved = centroid(video[-1], info["colour"]) - centroid(video[0], info["colour"])
        direction = np.array(MOTIONS[info["motion"]])
        assert moved @ direction > 5, (info, moved)


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="size must be even"):
        make_synthetic_dataset(tmp_path, num_videos=1, size=33)
    make_synthetic_dataset(tmp_path, num_videos=1, size=32, frames=2)
    with pytest.raises(FileExistsError, match="overwrite"):
        make_synthetic_dataset(tmp_path, num_videos=1, size=32, frames=2)


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path), "--num-videos", "3", "--size", "32", "--frames", "3", "--val-videos", "1"])
    assert "wrote 3 train videos" in capsys.readouterr().out
    assert len(list((tmp_path / "train").glob("shard-*.tar"))) == 1
    assert len(list((tmp_path / "val").glob("shard-*.tar"))) == 1


def test_extra_colours_only_when_asked_and_the_default_data_unchanged():
    from vidgen.data.synthetic import COLOURS, render_video

    for i in range(20):
        a, info = render_video(32, 3, np.random.default_rng([0, i]))
        b, _ = render_video(32, 3, np.random.default_rng([0, i]), shape_colours=list(COLOURS))
        assert np.array_equal(a, b) and info["colour"] != "brown"  # the same draws as before brown
        _, brown = render_video(32, 3, np.random.default_rng([0, i]), shape_colours=["brown"])
        assert brown["colour"] == "brown" and brown["background_colour"] in COLOURS
    with pytest.raises(ValueError, match="shape colours \\['pink'\\]: valid are red, .*brown"):
        render_video(32, 3, np.random.default_rng(0), shape_colours=["pink"])
