"""Does a clip show what its synthetic caption says? Judged from pixels alone.

A caption of the synthetic generator's form (`vidgen.data.synthetic`)::

    "a red circle moving left to right on a blue striped background"

has three parts that can be checked against the frames with the generator's own palette
(`COLOURS`) and motion table (`MOTIONS`):

- background: the most common palette colour over the clip is the captioned background
  colour (the background covers most of the frame; it is never white nor the shape colour);
- shape: in at least `min_frames` of the frames, pixels of the captioned shape colour form
  one blob of at least `min_area` of the frame, with `compact` of them within
  `radius` of the frame side from their median (one shape, not scattered specks);
- motion: the least-squares track of the blob's centre moves at least `min_travel` of
  the frame side, in the direction nearest the captioned one of the eight in `MOTIONS`.

The palette is every colour the generator can draw (``ALL_COLOURS``: the default ones and
brown, which only fine-tuning data has). Each pixel takes the palette colour whose ray (the colour scaled by 0.5 to 1.05: the
backgrounds darken their colour to 0.55) is nearest in RGB. The shape type (circle, square,
...) and the texture (striped, ...) are not checked.

    acc = CaptionAccuracy()
    acc.update(videos, captions)   # [B, C, T, H, W] in [-1, 1], B captions
    acc.compute()  # {"caption_accuracy", "caption_background", "caption_shape",
                   #  "caption_motion", "caption_clips", "caption_unparsed"}
"""

from __future__ import annotations

import re

import torch

from vidgen.data.synthetic import ALL_COLOURS as COLOURS
from vidgen.data.synthetic import MOTIONS
from vidgen.metrics.distributed import all_reduce_sum

PARTS = ("background", "shape", "motion")
_CAPTION = re.compile(
    r"^an? (?P<colour>\w+) (?P<shape>\w+) moving (?P<motion>.+?) "
    r"on an? (?P<background_colour>\w+) (?P<background>\w+) background$"
)
_NAMES = list(COLOURS)
_PALETTE = torch.tensor([COLOURS[n] for n in _NAMES], dtype=torch.float32) / 255.0  # [K, 3]
_MOTION_NAMES = list(MOTIONS)
_DIRECTIONS = torch.tensor([MOTIONS[m] for m in _MOTION_NAMES], dtype=torch.float32)  # [8, (x, y)]


def parse_caption(caption: str) -> dict | None:
    """The parts of a synthetic-form caption, or None when it is not of that form."""
    m = _CAPTION.match(caption.strip())
    if m is None:
        return None
    parts = m.groupdict()
    if parts["colour"] not in COLOURS or parts["background_colour"] not in COLOURS:
        return None
    if parts["motion"] not in MOTIONS:
        return None
    return parts


def palette_labels(frames: torch.Tensor) -> torch.Tensor:
    """Index into the palette (`COLOURS` order) of each pixel.

    frames: [C=3, T, H, W] in [-1, 1]. Returns [T, H, W] int64.
    """
    p = ((frames.float() + 1) / 2).permute(1, 2, 3, 0).unsqueeze(-2)  # [T, H, W, 1, 3] in [0, 1]
    c = _PALETTE.to(frames.device)  # [K, 3]
    scale = ((p * c).sum(-1) / (c * c).sum(-1)).clamp(0.5, 1.05)  # [T, H, W, K]
    dist = (p - scale.unsqueeze(-1) * c).square().sum(-1)
    return dist.argmin(-1)


def check_clip(
    video: torch.Tensor,
    caption: str,
    min_area: float = 0.008,
    compact: float = 0.8,
    radius: float = 0.25,
    min_frames: float = 0.8,
    min_travel: float = 0.1,
) -> dict | None:
    """{"background", "shape", "motion": bool} for one clip [C, T, H, W] in [-1, 1], or
    None when the caption is not of the synthetic form. See the module docstring."""
    parts = parse_caption(caption)
    if parts is None:
        return None
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"check_clip takes one RGB clip [3, T, H, W], got {tuple(video.shape)}")
    labels = palette_labels(video)
    t, h, w = labels.shape
    side = float(min(h, w))
    counts = torch.bincount(labels.flatten(), minlength=len(_NAMES))
    background = _NAMES[int(counts.argmax())] == parts["background_colour"]

    mask = labels == _NAMES.index(parts["colour"])  # [T, H, W]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    centres, times = [], []
    for i in range(t):
        m = mask[i]
        n = int(m.sum())
        if n < min_area * h * w:
            continue
        px, py = xs[m], ys[m]
        cx, cy = px.median(), py.median()
        near = ((px - cx).square() + (py - cy).square()) <= (radius * side) ** 2
        if near.float().mean() < compact:
            continue
        centres.append(torch.stack([px[near].mean(), py[near].mean()]))
        times.append(float(i))
    shape = len(centres) >= max(1, min_frames * t)

    motion = False
    if shape and len(centres) >= 2:
        c = torch.stack(centres)  # [N, (x, y)]
        tt = torch.tensor(times)
        tt = tt - tt.mean()
        velocity = (tt[:, None] * (c - c.mean(0))).sum(0) / tt.square().sum()  # per frame
        travel = velocity * (t - 1)
        if float(travel.norm()) >= min_travel * side:
            best = int((_DIRECTIONS @ (travel / travel.norm())).argmax())
            motion = _MOTION_NAMES[best] == parts["motion"]
    return {"background": background, "shape": shape, "motion": motion}


class CaptionAccuracy:
    """Streaming caption accuracy: the share of clips passing all three parts, and each part.

    Captions not of the synthetic form are counted (`caption_unparsed`) and not scored.
    Under torch.distributed, compute() sums over ranks (every rank must call it).
    """

    def __init__(self, **thresholds):
        self.thresholds = thresholds
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(len(PARTS) + 3, dtype=torch.float64)  # parts, all, clips, unparsed
        self.per_clip: list[dict] = []  # this rank's verdicts, in update order

    @torch.no_grad()
    def update(self, videos: torch.Tensor, captions: list[str]) -> None:
        """videos: [B, C, T, H, W] in [-1, 1]; captions: B strings."""
        if len(captions) != len(videos):
            raise ValueError(f"{len(videos)} videos but {len(captions)} captions")
        for video, caption in zip(videos, captions):
            verdict = check_clip(video.clamp(-1, 1), caption, **self.thresholds)
            self.per_clip.append({"caption": caption, **(verdict or {"unparsed": True})})
            if verdict is None:
                self.counts[-1] += 1
                continue
            for j, part in enumerate(PARTS):
                self.counts[j] += verdict[part]
            self.counts[len(PARTS)] += all(verdict.values())
            self.counts[len(PARTS) + 1] += 1

    def compute(self) -> dict:
        """Shares in [0, 1] (None with no parsed caption) and the clip counts."""
        total = all_reduce_sum(self.counts)
        clips = int(total[len(PARTS) + 1])
        out = {f"caption_{p}": (float(total[j]) / clips if clips else None) for j, p in enumerate(PARTS)}
        out["caption_accuracy"] = float(total[len(PARTS)]) / clips if clips else None
        out["caption_clips"] = clips
        out["caption_unparsed"] = int(total[-1])
        return out
