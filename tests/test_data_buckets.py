"""vidgen.data.buckets: parsing and metadata-only bucket assignment."""

import pytest

from vidgen.data.buckets import Bucket, assign_bucket, parse_buckets


def meta(num_frames, height, width):
    return dict(num_frames=num_frames, height=height, width=width, fps=8.0, duration=num_frames / 8)


def test_parse_forms():
    b = Bucket(17, 64, 96)
    assert Bucket.parse("17x64x96") == b
    assert Bucket.parse(" 17X64x96 ") == b
    assert Bucket.parse([17, 64, 96]) == b
    assert Bucket.parse({"frames": 17, "height": 64, "width": 96}) == b
    assert str(b) == "17x64x96"
    assert parse_buckets("17x64x64,9x64x96") == [Bucket(17, 64, 64), Bucket(9, 64, 96)]


@pytest.mark.parametrize("bad", ["17x64", "ax64x64", [17, 64], {"frames": 1}, 5])
def test_parse_errors_name_the_value(bad):
    with pytest.raises(ValueError, match="bucket"):
        Bucket.parse(bad)


def test_bucket_validation_and_duplicates():
    with pytest.raises(ValueError, match="frames must be a positive int, got 0"):
        Bucket(0, 64, 64)
    with pytest.raises(ValueError, match="duplicate"):
        parse_buckets(["17x64x64", [17, 64, 64]])
    with pytest.raises(ValueError, match="empty"):
        parse_buckets([])


def test_closest_aspect_wins_over_frames():
    buckets = parse_buckets(["33x64x64", "17x64x112", "17x112x64"])
    assert assign_bucket(meta(100, 720, 1280), buckets) == Bucket(17, 64, 112)  # landscape
    assert assign_bucket(meta(100, 1280, 720), buckets) == Bucket(17, 112, 64)  # portrait
    assert assign_bucket(meta(100, 500, 520), buckets) == Bucket(33, 64, 64)  # near square


def test_log_ratio_is_symmetric():
    # 2:1 and 1:2 are equally far from 1:1 in log space; square video -> tie broken by frames.
    buckets = parse_buckets(["9x32x64", "17x64x32"])
    assert assign_bucket(meta(40, 64, 64), buckets) == Bucket(17, 64, 32)


def test_most_frames_then_largest_area():
    buckets = parse_buckets(["9x64x64", "17x64x64", "33x64x64", "17x128x128"])
    assert assign_bucket(meta(40, 256, 256), buckets) == Bucket(33, 64, 64)
    assert assign_bucket(meta(20, 256, 256), buckets) == Bucket(17, 128, 128)
    assert assign_bucket(meta(10, 256, 256), buckets) == Bucket(9, 64, 64)


def test_stride_and_too_short():
    buckets = parse_buckets(["9x64x64", "17x64x64"])
    # 17 frames at stride 2 span 33 source frames.
    assert assign_bucket(meta(33, 64, 64), buckets, frame_stride=2) == Bucket(17, 64, 64)
    assert assign_bucket(meta(32, 64, 64), buckets, frame_stride=2) == Bucket(9, 64, 64)
    assert assign_bucket(meta(16, 64, 64), buckets, frame_stride=2) is None
    # Fractional stride (target fps 16 from 24 fps): 9 frames span round(8 * 1.5) + 1 = 13.
    assert assign_bucket(meta(13, 64, 64), buckets, frame_stride=1.5) == Bucket(9, 64, 64)
    assert assign_bucket(meta(12, 64, 64), buckets, frame_stride=1.5) is None
