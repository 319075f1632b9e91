"""vidgen.data.video: probing, frame choice, decoding, resizing, encoding."""

import io

import numpy as np
import pytest
import torch

from vidgen.data.video import (
    VideoTooShortError,
    decode_clip,
    decode_frames,
    encode_mp4,
    fit_within,
    probe_video,
    resize_crop,
    sample_frame_indices,
    to_model_range,
    write_mp4,
)


def make_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """Smooth content that changes every frame: uint8 [T, H, W, 3]."""
    t, y, x = np.meshgrid(np.arange(num_frames), np.arange(height), np.arange(width), indexing="ij")
    r = 128 + 100 * np.sin(2 * np.pi * (x + 3 * t) / width)
    g = 128 + 100 * np.cos(2 * np.pi * y / height)
    b = np.full_like(r, 60.0) + 8 * t
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def mp4_bytes() -> bytes:
    return encode_mp4(make_frames(20, 48, 64), fps=10, keyint=5)


def test_probe_reports_stream_facts(mp4_bytes, tmp_path):
    info = probe_video(mp4_bytes)
    assert info == dict(num_frames=20, fps=10.0, height=48, width=64, duration=2.0)
    path = tmp_path / "clip.mp4"
    path.write_bytes(mp4_bytes)
    assert probe_video(path) == info


def test_probe_rejects_garbage():
    with pytest.raises(RuntimeError):
        probe_video(b"not a video" * 100)


def test_sample_indices_stride_start_and_centre():
    assert sample_frame_indices(20, 5, stride=2, start=3) == [3, 5, 7, 9, 11]
    # No rng, no start: centred. Span of 5 frames at stride 2 is 9 -> start (20-9)//2 = 5.
    assert sample_frame_indices(20, 5, stride=2) == [5, 7, 9, 11, 13]
    # Exactly fitting clip ends on the last frame, never past it.
    assert sample_frame_indices(9, 5, stride=2) == [0, 2, 4, 6, 8]


def test_sample_indices_target_fps():
    # 30 fps -> 10 fps takes every third frame; 24 -> 16 alternates steps of 1 and 2.
    assert sample_frame_indices(30, 4, target_fps=10, fps=30, start=0) == [0, 3, 6, 9]
    assert sample_frame_indices(30, 5, target_fps=16, fps=24, start=0) == [0, 2, 3, 5, 6]
    with pytest.raises(ValueError, match="not both"):
        sample_frame_indices(30, 4, stride=2, target_fps=10, fps=30)
    with pytest.raises(ValueError, match="fps"):
        sample_frame_indices(30, 4, target_fps=10)


def test_sample_indices_random_start_is_seeded_and_in_range():
    draws = [sample_frame_indices(40, 8, stride=3, rng=np.random.default_rng(s)) for s in range(50)]
    assert all(d[-1] <= 39 and d[0] >= 0 for d in draws)
    assert len({d[0] for d in draws}) > 5  # starts actually vary
    again = [sample_frame_indices(40, 8, stride=3, rng=np.random.default_rng(s)) for s in range(50)]
    assert draws == again


def test_sample_indices_too_short_and_bad_start():
    with pytest.raises(VideoTooShortError, match="too short.*has 8"):
        sample_frame_indices(8, 5, stride=2)
    assert sample_frame_indices(10, 5, stride=1, start=5) == [5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="start=6 out of range.*0 <= start <= 5"):
        sample_frame_indices(10, 5, stride=1, start=6)
    with pytest.raises(ValueError, match="count"):
        sample_frame_indices(10, 0)


def test_decode_frames_matches_source(mp4_bytes):
    source = make_frames(20, 48, 64)
    frames = decode_frames(mp4_bytes, [0, 7, 7, 19])
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[1], frames[2])
    # H.264 at crf 18 on smooth content: close to the source, not exact.
    assert np.abs(frames.astype(int) - source[[0, 7, 7, 19]].astype(int)).mean() < 4
    with pytest.raises(IndexError):
        decode_frames(mp4_bytes, [20])


def test_decode_clip_uses_real_length(mp4_bytes):
    frames, indices = decode_clip(mp4_bytes, 4, stride=5, rng=None)
    assert indices == [2, 7, 12, 17] and frames.shape[0] == 4
    with pytest.raises(VideoTooShortError):
        decode_clip(mp4_bytes, 21)


def test_resize_crop_shape_range_and_centre():
    frames = np.zeros((3, 40, 80, 3), np.uint8)
    frames[:, :, 20:60] = 255  # a white centre band, half the width
    clip = resize_crop(frames, 32, 32)
    assert clip.shape == (3, 3, 32, 32) and clip.dtype == torch.float32
    assert clip.min() >= -1 and clip.max() <= 1
    # Short side 40 -> 32 (scale 0.8): width 64, centre crop keeps 16..48 = the band.
    assert torch.all(clip[:, :, :, 4:28] > 0.99)
    # torch input and no-resize path give the same as numpy.
    same = resize_crop(torch.from_numpy(frames), 32, 32)
    assert torch.equal(clip, same)
    exact = resize_crop(frames[:, :32, :32], 32, 32)
    assert torch.equal(exact, torch.from_numpy(frames[:, :32, :32]).permute(3, 0, 1, 2).float() / 127.5 - 1)


def test_resize_crop_writes_into_out():
    frames = make_frames(4, 48, 64)
    batch = torch.zeros(2, 3, 4, 32, 32)
    result = resize_crop(frames, 32, 32, out=batch[1])
    assert result.data_ptr() == batch[1].data_ptr()
    assert torch.equal(batch[1], resize_crop(frames, 32, 32)) and not batch[0].any()
    with pytest.raises(ValueError, match=r"out must be float32 or uint8 \[3, 4, 32, 32\]"):
        resize_crop(frames, 32, 32, out=torch.zeros(3, 4, 32, 31))
    with pytest.raises(ValueError, match=r"got torch.float64"):
        resize_crop(frames, 32, 32, out=torch.zeros(3, 4, 32, 32, dtype=torch.float64))
    # uint8 may also be channel-last (as pipeline batches are), float32 may not.
    for size, crop in ((32, frames[:, 8:40, 16:48]), (24, None)):  # crop only, and a resize
        last = torch.zeros(4, size, size, 3, dtype=torch.uint8)
        out = resize_crop(frames if crop is None else crop, size, size, out=last.permute(3, 0, 1, 2))
        want = resize_crop(frames if crop is None else crop, size, size, out=torch.zeros(3, 4, size, size, dtype=torch.uint8))
        assert out.data_ptr() == last.data_ptr() and torch.equal(out, want) and last.any()
    with pytest.raises(ValueError, match=r"contiguous \(uint8: or channel-last\)"):
        resize_crop(frames, 32, 32, out=torch.zeros(4, 32, 32, 3).permute(3, 0, 1, 2))


@pytest.mark.parametrize("size", [(48, 64), (32, 40)])  # resize + crop, crop only
def test_resize_crop_uint8_out_rounds_the_float_result(size):
    frames = make_frames(4, *size)
    pixels = resize_crop(frames, 32, 32, out=torch.empty(3, 4, 32, 32, dtype=torch.uint8))
    as_float = resize_crop(frames, 32, 32)
    assert pixels.dtype == torch.uint8
    assert (to_model_range(pixels) - as_float).abs().max() <= 0.5 / 127.5 + 1e-6
    if size == (32, 40):
        assert torch.equal(to_model_range(pixels), as_float)
    assert to_model_range(as_float) is as_float  # float input passes through


def test_resize_crop_rejects_bad_layout():
    with pytest.raises(ValueError, match=r"uint8 frames \[T, H, W, 3\]"):
        resize_crop(np.zeros((3, 32, 32), np.uint8), 16, 16)


def test_write_mp4_to_path_and_file(tmp_path):
    frames = make_frames(6, 32, 40)
    write_mp4(frames, tmp_path / "a.mp4", fps=12, keyint=2)
    buf = io.BytesIO()
    write_mp4(frames, buf, fps=12, keyint=2)
    assert probe_video(tmp_path / "a.mp4") == probe_video(buf.getvalue())
    assert probe_video(buf.getvalue())["fps"] == 12.0


def test_write_mp4_rejects_odd_sizes_and_bad_input(tmp_path):
    with pytest.raises(ValueError, match="even frame sizes.*33x48"):
        write_mp4(make_frames(2, 33, 48), tmp_path / "odd.mp4", fps=8)
    with pytest.raises(ValueError, match="expected frames"):
        write_mp4(np.zeros((32, 32, 3), np.uint8), tmp_path / "x.mp4", fps=8)


def test_fit_within_keeps_aspect_and_even():
    assert fit_within(720, 1280, 256) == (144, 256)
    assert fit_within(101, 203, None) == (100, 202)  # even, never upscaled
    assert fit_within(64, 64, 512) == (64, 64)


def test_probe_flags_widths_decord_cannot_decode():
    # decord 0.6.0 returns 4-channel frames for a 48-pixel-wide video; say so clearly.
    with pytest.raises(RuntimeError, match="48x32 video to 4 channels"):
        probe_video(encode_mp4(make_frames(2, 32, 48), fps=8))
