"""vidgen.data.buckets: parsing, eligibility, weighted per-sample draws and fixed assignment."""

from collections import Counter

import numpy as np
import pytest

from vidgen.data.buckets import (
    Bucket,
    aspect_distortion,
    assign_bucket,
    draw_bucket,
    eligible_buckets,
    parse_bucket_weights,
    parse_buckets,
)

# chi-square quantiles at p = 1e-4 (scipy.stats.chi2.ppf(1 - 1e-4, df)), by degrees of freedom
CHI2_1E4 = {2: 18.42, 3: 21.11}


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


# -- eligibility ------------------------------------------------------------------------


def test_a_clip_fits_every_bucket_it_has_the_frames_for():
    buckets = parse_buckets(["1x64x64", "5x64x64", "9x64x64", "17x64x64", "33x64x64", "9x64x112"])
    names = lambda bs: [str(b) for b in bs]  # noqa: E731
    assert names(eligible_buckets(meta(17, 64, 64), buckets)) == [
        "1x64x64", "5x64x64", "9x64x64", "17x64x64", "9x64x112"]  # any aspect by default
    assert names(eligible_buckets(meta(8, 64, 64), buckets)) == ["1x64x64", "5x64x64"]
    assert names(eligible_buckets(meta(1, 64, 64), buckets)) == ["1x64x64"]  # one frame: an image
    assert names(eligible_buckets(meta(17, 64, 64), buckets, frame_stride=2)) == [
        "1x64x64", "5x64x64", "9x64x64", "9x64x112"]


def test_max_aspect_distortion_keeps_landscape_out_of_portrait():
    buckets = parse_buckets(["5x64x64", "5x48x64", "5x112x64", "5x64x112", "5x96x128"])
    wide = meta(20, 720, 1280)  # 16:9
    assert aspect_distortion(Bucket(5, 64, 112), 720, 1280) == pytest.approx((16 / 9) / (112 / 64))
    assert aspect_distortion(Bucket(5, 64, 64), 720, 1280) == pytest.approx(16 / 9)
    assert len(eligible_buckets(wide, buckets)) == 5  # null: any bucket (resize-crop)
    assert [str(b) for b in eligible_buckets(wide, buckets, max_aspect_distortion=1.5)] == [
        "5x48x64", "5x64x112", "5x96x128"]  # 4:3 (1.33 away) and 7:4; not 1:1 (1.78) nor 4:7
    assert [str(b) for b in eligible_buckets(wide, buckets, max_aspect_distortion=1.1)] == ["5x64x112"]
    # equal ratios written differently are equally far (4:3 as 48x64 and 96x128)
    assert aspect_distortion(Bucket(1, 48, 64), 9, 16) == aspect_distortion(Bucket(1, 96, 128), 9, 16)
    assert assign_bucket(meta(20, 1280, 720), buckets, max_aspect_distortion=1.1) == Bucket(5, 112, 64)
    assert assign_bucket(meta(20, 1280, 720), buckets[:2], max_aspect_distortion=1.5) is None


# -- weights ----------------------------------------------------------------------------


def test_weights_from_null_list_and_mapping():
    buckets = parse_buckets(["5x64x64", "17x64x64", "1x64x64"])
    assert parse_bucket_weights(None, buckets) == [1.0, 1.0, 1.0]
    assert parse_bucket_weights([4, 0, 1.5], buckets) == [4.0, 0.0, 1.5]
    assert parse_bucket_weights({"1x64x64": 1, "5X64x64": 2, "17x64x64": 3}, buckets) == [2.0, 3.0, 1.0]


@pytest.mark.parametrize("weights, message", [
    ([1, 2], r"bucket_weights has 2 entries \[1, 2\] for the 3 buckets \['5x64x64', '17x64x64', '1x64x64'\]"),
    ([1, -1, 1], r"weight of bucket 17x64x64 must be a finite number >= 0, got -1"),
    ([1, float("nan"), 1], r"weight of bucket 17x64x64 .* got nan"),
    ([1, "a", 1], r"weight of bucket 17x64x64 .* got 'a'"),
    ([True, 1, 1], r"weight of bucket 5x64x64 .* got True"),
    ([0, 0, 0], r"are all 0"),
    ({"5x64x64": 1, "17x64x64": 1, "1x64x64": 1, "9x64x64": 1},
     r"names bucket '9x64x64', which is not in buckets \['5x64x64', '17x64x64', '1x64x64'\]"),
    ({"5x64x64": 1}, r"no weight for bucket\(s\) \['17x64x64', '1x64x64'\]"),
    ({"5-64-64": 1}, r"bucket_weights key '5-64-64'.*FRAMESxHEIGHTxWIDTH"),
    ("4,1", r"must be null, a list or a mapping"),
])
def test_weight_errors_name_the_value_and_what_is_valid(weights, message):
    buckets = parse_buckets(["5x64x64", "17x64x64", "1x64x64"])
    with pytest.raises(ValueError, match=message):
        parse_bucket_weights(weights, buckets)


# -- per-sample draws -------------------------------------------------------------------


def chi_square(counts: Counter, expected: dict) -> float:
    n = sum(counts.values())
    return sum((counts[b] - n * p) ** 2 / (n * p) for b, p in expected.items())


def draws(m, buckets, weights, n, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    return [draw_bucket(m, buckets, weights, rng, **kwargs) for _ in range(n)]


def test_draw_frequencies_match_the_weights_renormalised_over_fitting_buckets():
    buckets = parse_buckets(["1x64x64", "5x64x64", "9x64x64", "17x64x64", "33x64x64"])
    weights = [1.0, 4.0, 2.0, 3.0, 5.0]
    n = 4000
    long = Counter(draws(meta(17, 64, 64), buckets, weights, n))
    assert Bucket(33, 64, 64) not in long  # never a bucket it cannot fill
    expected = {b: w / 10 for b, w in zip(buckets[:4], weights[:4])}
    assert chi_square(long, expected) < CHI2_1E4[3], long
    # the bound has power: the same counts are far from uniform frequencies
    assert chi_square(long, dict.fromkeys(buckets[:4], 0.25)) > 10 * CHI2_1E4[3]

    short = Counter(draws(meta(12, 64, 64), buckets, weights, n))  # fits 1x, 5x, 9x only
    assert set(short) == set(buckets[:3])
    assert chi_square(short, {b: w / 7 for b, w in zip(buckets[:3], weights[:3])}) < CHI2_1E4[2], short


def test_zero_weight_and_nothing_eligible():
    buckets = parse_buckets(["1x64x64", "17x64x64"])
    assert set(draws(meta(20, 64, 64), buckets, [0.0, 1.0], 50)) == {Bucket(17, 64, 64)}
    assert draws(meta(9, 64, 64), buckets, [0.0, 1.0], 3) == [None] * 3  # only the 0-weight one fits
    assert draw_bucket(meta(20, 720, 1280), parse_buckets(["5x112x64"]), [1.0],
                       np.random.default_rng(0), max_aspect_distortion=2) is None


def test_draws_are_reproducible_per_seed():
    buckets = parse_buckets(["1x64x64", "5x64x64", "9x64x64", "17x64x64"])
    a = draws(meta(17, 64, 64), buckets, [1, 1, 1, 1], 200, seed=5)
    assert a == draws(meta(17, 64, 64), buckets, [1, 1, 1, 1], 200, seed=5)
    assert a != draws(meta(17, 64, 64), buckets, [1, 1, 1, 1], 200, seed=6)
    assert len(set(a)) == 4
