"""The caption check of synthetic clips (vidgen.metrics.caption): it passes the generator's own
clips (rendered and through H.264), and each part fails when its part of the clip is wrong."""

import numpy as np
import pytest
import torch

from vidgen.data.pipeline import build_video_dataset
from vidgen.data.synthetic import COLOURS, MOTIONS, make_synthetic_dataset, render_video
from vidgen.metrics.caption import CaptionAccuracy, check_clip, palette_labels, parse_caption


def _clip(frames: np.ndarray) -> torch.Tensor:
    """[T, H, W, 3] uint8 -> [3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1


def _scene(i: int, size: int = 64, frames: int = 17):
    video, info = render_video(size, frames, np.random.default_rng([7, i]))
    return _clip(video), info


def _caption(info: dict, **changes) -> str:
    p = {**info, **changes}
    art = lambda w: "an" if w[0] in "aeiou" else "a"  # noqa: E731
    return (f"{art(p['colour'])} {p['colour']} {p['shape']} moving {p['motion']} on "
            f"{art(p['background_colour'])} {p['background_colour']} {p['background']} background")


def test_parse_caption_reads_every_generated_caption():
    for i in range(40):
        _, info = _scene(i, size=32, frames=2)
        parts = parse_caption(info["caption"])
        assert parts == {k: info[k] for k in ("colour", "shape", "motion", "background_colour", "background")}
        assert _caption(info) == info["caption"]
    assert parse_caption("a cat playing piano") is None
    assert parse_caption("a red circle moving sideways on a blue striped background") is None
    assert parse_caption("a pink circle moving left to right on a blue striped background") is None


def test_palette_labels_name_each_colour_and_its_darkened_tone():
    names = list(COLOURS)
    for k, rgb in enumerate(COLOURS.values()):
        for scale in (1.0, 0.78, 0.55):  # the backgrounds span colour x 0.55 .. 1
            px = torch.tensor(rgb, dtype=torch.float32) * scale / 127.5 - 1
            label = int(palette_labels(px.view(3, 1, 1, 1))[0, 0, 0])
            assert names[label] == names[k], (names[k], scale)


@pytest.mark.parametrize("size, frames", [(64, 17), (32, 17), (64, 9)])
def test_every_rendered_clip_passes(size, frames):
    acc = CaptionAccuracy()
    for i in range(48):
        video, info = _scene(i, size, frames)
        acc.update(video[None], [info["caption"]])
    result = acc.compute()
    assert result == {"caption_background": 1.0, "caption_shape": 1.0, "caption_motion": 1.0,
                      "caption_accuracy": 1.0, "caption_clips": 48, "caption_unparsed": 0}


def test_clips_decoded_from_shards_pass(tmp_path):
    # through H.264 (yuv420p chroma subsampling), the loader's decode and resize
    make_synthetic_dataset(tmp_path, num_videos=1, size=64, frames=17, val_videos=32, seed=3)
    acc, shifted = CaptionAccuracy(), CaptionAccuracy()
    for size in (64, 32):
        for batch in build_video_dataset(str(tmp_path / "val"), mode="video", num_frames=17, height=size,
                                         width=size, batch_size=8, resampled=False, deterministic=True):
            captions = list(batch["caption"])
            acc.update(batch["video"], captions)
            shifted.update(batch["video"], captions[1:] + captions[:1])  # each clip, another's caption
    assert acc.compute()["caption_accuracy"] == 1.0 and acc.compute()["caption_clips"] == 64
    assert shifted.compute()["caption_accuracy"] < 0.1


def test_each_part_fails_on_its_own():
    checked = 0
    for i in range(24):
        video, info = _scene(i)
        other_bg = next(c for c in COLOURS if c not in (info["background_colour"], info["colour"], "white"))
        assert check_clip(video, _caption(info, background_colour=other_bg)) == {
            "background": False, "shape": True, "motion": True}
        reverse = next(m for m, d in MOTIONS.items()
                       if np.allclose(d, -np.array(MOTIONS[info["motion"]])))
        assert check_clip(video, _caption(info, motion=reverse)) == {
            "background": True, "shape": True, "motion": False}
        other_fg = next(c for c in COLOURS if c not in (info["background_colour"], info["colour"]))
        verdict = check_clip(video, _caption(info, colour=other_fg))
        assert verdict == {"background": True, "shape": False, "motion": False}
        checked += 1
    assert checked == 24


def test_vanished_scattered_or_still_shapes_fail():
    video, info = _scene(3)
    fg = torch.tensor(COLOURS[info["colour"]], dtype=torch.float32) / 127.5 - 1
    # no shape: the background colour's mean everywhere
    flat = video.mean(dim=(1, 2, 3), keepdim=True).expand_as(video).contiguous()
    assert check_clip(flat, info["caption"]) == {"background": True, "shape": False, "motion": False}
    # specks of the shape colour scattered over the frame (as many pixels as a shape has)
    specks = flat.clone()
    rng = np.random.default_rng(0)
    for t in range(video.shape[1]):
        ys, xs = rng.integers(0, 64, size=(2, 120))
        specks[:, t, ys, xs] = fg[:, None]
    assert check_clip(specks, info["caption"])["shape"] is False
    # the shape held still at its first position: seen, but not moving
    still = video[:, :1].expand_as(video).contiguous()
    assert check_clip(still, info["caption"]) == {"background": True, "shape": True, "motion": False}


def test_unparsed_captions_are_counted_not_scored():
    video, info = _scene(0)
    acc = CaptionAccuracy()
    acc.update(torch.stack([video, video]), [info["caption"], "a cat playing piano"])
    result = acc.compute()
    assert result["caption_clips"] == 1 and result["caption_unparsed"] == 1
    assert result["caption_accuracy"] == 1.0
    assert acc.per_clip[1] == {"caption": "a cat playing piano", "unparsed": True}
    with pytest.raises(ValueError, match="2 videos but 1 captions"):
        acc.update(torch.stack([video, video]), [info["caption"]])
    empty = CaptionAccuracy().compute()
    assert empty["caption_accuracy"] is None and empty["caption_clips"] == 0


def test_brown_clips_of_the_fine_tuning_data_pass_and_are_told_from_orange(tmp_path):
    """brown (150, 90, 40) is near darkened orange: brown shapes through H.264 still pass, and
    are not taken for orange ones (nor the other way round)."""
    from vidgen.data.synthetic import ALL_COLOURS

    px = torch.tensor(ALL_COLOURS["brown"], dtype=torch.float32) / 127.5 - 1
    assert list(ALL_COLOURS)[int(palette_labels(px.view(3, 1, 1, 1))[0, 0, 0])] == "brown"
    make_synthetic_dataset(tmp_path, num_videos=1, size=64, frames=17, val_videos=24, seed=5,
                           shape_colours=["brown"])
    acc, as_orange = CaptionAccuracy(), CaptionAccuracy()
    for batch in build_video_dataset(str(tmp_path / "val"), mode="video", num_frames=17, height=64,
                                     width=64, batch_size=8, resampled=False, deterministic=True):
        captions = list(batch["caption"])
        assert all(" brown " in f" {c} " for c in captions)
        acc.update(batch["video"], captions)
        as_orange.update(batch["video"], [c.replace("a brown", "an orange", 1) for c in captions])
    assert acc.compute()["caption_accuracy"] == 1.0 and acc.compute()["caption_clips"] == 24
    assert as_orange.compute()["caption_shape"] == 0.0
