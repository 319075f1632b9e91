"""Video I/O for the data pipeline: probe, choose frames, decode, resize, encode.

Decoding goes through decord with one thread per reader (parallelism comes from the
DataLoader workers, not from decoder threads). Encoding goes through PyAV / libx264
(yuv420p, so frame sizes must be even).

Known decord 0.6.0 defect: frames exactly 2-16, 24, 48 or 72 pixels wide come back
with 4 channels and ``get_batch`` raises; the loader counts such videos as decode
errors. Real footage is far wider; tiny test clips should avoid those widths.

Shapes: decoded frames are uint8 numpy arrays ``[T, H, W, 3]`` (RGB); model-ready
clips are float32 tensors ``[3, T, H, W]`` in ``[-1, 1]``.
"""

from __future__ import annotations

import io
import math
import os
from fractions import Fraction
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

VideoSource = bytes | bytearray | str | os.PathLike


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def open_video(src: VideoSource):
    """A decord ``VideoReader`` on encoded bytes or a path, with one decoder thread."""
    import decord  # imported lazily: decord prints to stderr on import in some builds

    if isinstance(src, (bytes, bytearray)):
        return decord.VideoReader(io.BytesIO(bytes(src)), num_threads=1)
    return decord.VideoReader(os.fspath(src), num_threads=1)


def probe_video(src: VideoSource) -> dict:
    """Read the stream facts of a video without decoding more than its first frame.

    Args:
        src: encoded video bytes, or a path.

    Returns:
        ``dict(num_frames, fps, height, width, duration)``; ``duration`` is
        ``num_frames / fps`` in seconds.

    Raises:
        RuntimeError: decord cannot open or decode the video (corrupt, truncated, not a
            video, or a width decord mis-decodes).
        ValueError: the video reports no frames or a non-positive frame rate.
    """
    vr = open_video(src)
    num_frames = len(vr)
    fps = float(vr.get_avg_fps())
    if num_frames <= 0 or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"video reports num_frames={num_frames}, fps={fps}; need both > 0")
    # decord has no header-only size query; one decoded frame is cheap.
    height, width, channels = vr[0].shape
    if channels != 3:
        raise RuntimeError(
            f"decord decodes this {width}x{height} video to {channels} channels instead of 3 "
            "(a decord 0.6.0 defect at some small widths); re-encode it at another width"
        )
    return dict(
        num_frames=int(num_frames),
        fps=fps,
        height=int(height),
        width=int(width),
        duration=num_frames / fps,
    )


class VideoTooShortError(ValueError):
    """The video has fewer frames than the requested clip spans."""


def frames_needed(count: int, stride: float) -> int:
    """Source frames spanned by ``count`` frames taken every ``stride`` source frames."""
    return int(math.floor((count - 1) * stride + 0.5)) + 1


def sample_frame_indices(
    num_frames_available: int,
    count: int,
    *,
    stride: float | None = None,
    target_fps: float | None = None,
    fps: float | None = None,
    rng: np.random.Generator | None = None,
    start: int | None = None,
) -> list[int]:
    """Choose ``count`` frame indices of a video, evenly spaced, never past its end.

    The spacing is ``stride`` source frames (default 1), or ``fps / target_fps`` when a
    target frame rate is given (frames are dropped, or repeated when ``target_fps >
    fps``). Index ``k`` is ``start + round(k * step)``.

    The first index is ``start`` when given; otherwise drawn uniformly from ``rng``
    among all valid starts; otherwise (no rng) the clip is centred in the video.

    Raises:
        VideoTooShortError (a ValueError): the video is too short for ``count`` frames
            at this spacing.
        ValueError: the arguments conflict, or ``start`` is out of range.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if target_fps is not None:
        if stride is not None:
            raise ValueError(f"give stride ({stride}) or target_fps ({target_fps}), not both")
        if fps is None or fps <= 0 or target_fps <= 0:
            raise ValueError(f"target_fps={target_fps} needs the video's fps > 0, got fps={fps}")
        step = fps / target_fps
    else:
        step = 1.0 if stride is None else float(stride)
        if step <= 0:
            raise ValueError(f"stride must be > 0, got {stride}")

    span = frames_needed(count, step)
    last_start = num_frames_available - span
    if last_start < 0:
        raise VideoTooShortError(
            f"video too short: {count} frames at step {step:g} span {span} frames, "
            f"the video has {num_frames_available}"
        )
    if start is None:
        start = int(rng.integers(0, last_start + 1)) if rng is not None else last_start // 2
    elif not 0 <= start <= last_start:
        raise ValueError(
            f"start={start} out of range: {count} frames at step {step:g} need "
            f"0 <= start <= {last_start} in a {num_frames_available}-frame video"
        )
    return [start + int(math.floor(k * step + 0.5)) for k in range(count)]


def decode_frames(mp4_bytes: bytes, indices: list[int]) -> np.ndarray:
    """Decode the given frames of an encoded video.

    Args:
        mp4_bytes: the encoded video.
        indices: frame indices (may repeat, any order), each < the frame count.

    Returns:
        uint8 array ``[len(indices), H, W, 3]`` (RGB).

    Raises:
        RuntimeError / IndexError from decord for unreadable data or bad indices.
    """
    if len(indices) == 0:
        raise ValueError("decode_frames needs at least one index")
    vr = open_video(mp4_bytes)
    return vr.get_batch(list(indices)).asnumpy()


def decode_clip(mp4_bytes: bytes, count: int, **sample_kwargs) -> tuple[np.ndarray, list[int]]:
    """Choose ``count`` frames against the video's *real* length and decode them.

    ``sample_kwargs`` go to ``sample_frame_indices`` (stride, target_fps, fps, rng,
    start). Opening the reader once serves both, and trusting the decoder's frame count
    over stored metadata means a clip never reaches past the real end.

    Returns:
        (uint8 frames ``[count, H, W, 3]``, the indices used).
    """
    vr = open_video(mp4_bytes)
    indices = sample_frame_indices(len(vr), count, **sample_kwargs)
    return vr.get_batch(indices).asnumpy(), indices


def probe_image(data: bytes) -> dict:
    """``dict(height, width)`` from an image's header (nothing is decoded).

    Raises:
        PIL.UnidentifiedImageError (an OSError): the bytes are no image PIL reads.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
    return dict(height=int(height), width=int(width))


def decode_image(data: bytes) -> np.ndarray:
    """An encoded image (JPEG, PNG, WebP) as one uint8 RGB frame ``[1, H, W, 3]``.

    JPEGs (but CMYK ones) decode with libjpeg-turbo through simplejpeg: the same pixels
    as PIL, about 1.7x faster. Other formats, and CMYK JPEGs, go through PIL. Palette,
    grey, CMYK and alpha images become RGB (alpha is dropped). PIL's decompression-bomb
    limit holds for both: an image of more than twice ``PIL.Image.MAX_IMAGE_PIXELS``
    pixels raises before anything is decoded.

    Raises:
        OSError: unreadable or truncated image data (PIL.UnidentifiedImageError included).
        PIL.Image.DecompressionBombError: far too many pixels.
    """
    from PIL import Image

    if data[:2] == b"\xff\xd8":
        import simplejpeg

        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            if colorspace not in ("CMYK", "YCCK"):
                limit = Image.MAX_IMAGE_PIXELS
                if limit is not None and height * width > 2 * limit:
                    raise Image.DecompressionBombError(
                        f"{width}x{height} JPEG: {height * width} pixels, more than twice "
                        f"PIL.Image.MAX_IMAGE_PIXELS ({limit})"
                    )
                return simplejpeg.decode_jpeg(data, colorspace="RGB")[None]  # strict: truncation raises
        except ValueError as exn:  # simplejpeg's error for corrupt or truncated data
            raise OSError(f"undecodable JPEG: {exn}") from exn
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # truncated data fails here, not later
        rgb = im if im.mode == "RGB" else im.convert("RGB")
        frame = np.asarray(rgb)  # one copy out of PIL; read-only, which resize_crop allows
    return frame[None]


# --------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------


def _as_uint8_thwc(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """Validate uint8 ``[T, H, W, 3]`` frames (numpy or torch) and return a numpy view."""
    x = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    return x


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of float ``[T, 3, H, W]``; a no-op at the same size."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


def resize_crop(
    frames: np.ndarray | torch.Tensor, height: int, width: int, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Resize the short side to cover ``height x width``, then centre-crop.

    Args:
        frames: uint8 ``[T, H, W, 3]`` (numpy or torch).
        out: optional float32 or uint8 CPU tensor ``[3, T, height, width]`` to write
            into (e.g. one slot of a batch), saving an allocation and a copy: contiguous,
            or for uint8 also channel-last (a permuted view of ``[T, height, width, 3]``,
            as pipeline batches are). A uint8 ``out`` keeps pixel values (0..255, resized
            values rounded); ``to_model_range`` maps them to ``[-1, 1]`` later, e.g. on the GPU.

    Returns:
        float32 ``[3, T, height, width]`` in ``[-1, 1]`` (``out`` when given, in its dtype).
    """
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    x = _as_uint8_thwc(frames)
    t, h, w, _ = x.shape
    if out is None:
        out = torch.empty((3, t, height, width), dtype=torch.float32)
    elif (out.shape != (3, t, height, width) or out.dtype not in (torch.float32, torch.uint8)
          or not (out.is_contiguous() or out.dtype == torch.uint8 and out.permute(1, 2, 3, 0).is_contiguous())):
        raise ValueError(
            f"out must be float32 or uint8 [3, {t}, {height}, {width}], contiguous (uint8: or channel-last), "
            f"got {out.dtype} {tuple(out.shape)} with strides {out.stride()}"
        )
    scale = max(height / h, width / w)
    # Cover the target in both dimensions; rounding must never leave us short of it.
    new_h = max(height, int(round(h * scale)))
    new_w = max(width, int(round(w * scale)))
    top, left = (new_h - height) // 2, (new_w - width) // 2
    if (new_h, new_w) == (h, w):
        # Crop only (the common case once shards are made at training size): numpy on
        # one thread; torch's intra-op threads would spin on the cores the decoder needs.
        # Transposing the uint8 bytes first keeps the float pass contiguous.
        crop = x[:, top : top + height, left : left + width].transpose(3, 0, 1, 2)
        result = out.numpy()
        if out.dtype == torch.uint8:
            np.copyto(result, crop)
            return out
        crop = np.ascontiguousarray(crop)
        np.multiply(crop, np.float32(1 / 127.5), out=result)
        result -= 1.0
        return out
    y = _resize(torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float(), new_h, new_w)
    y = y[:, :, top : top + height, left : left + width].permute(1, 0, 2, 3)
    if out.dtype == torch.uint8:
        return out.copy_(y.round_().clamp_(0, 255))
    torch.mul(y, 1 / 127.5, out=out)
    return out.sub_(1.0).clamp_(-1.0, 1.0)


def to_model_range(video: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (a ``dtype="uint8"`` batch) -> float32 in ``[-1, 1]``, on their device;
    float input is returned as it is. Gives the same values as the float32 pipeline for
    frames that were not resized."""
    if video.dtype != torch.uint8:
        return video
    # contiguous_format: pipeline batches are channel-last in memory; one pass converts
    # and transposes them.
    return video.to(torch.float32, memory_format=torch.contiguous_format).mul_(1 / 127.5).sub_(1.0)


def fit_within(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """Even output size that keeps the aspect ratio with the long side <= ``max_side``.

    yuv420p needs even sizes, so both sides are rounded down to even numbers (the
    aspect ratio changes by under one pixel). Sizes are never scaled up.
    """
    scale = 1.0 if max_side is None else min(1.0, max_side / max(height, width))
    out_h = max(2, int(height * scale) // 2 * 2)
    out_w = max(2, int(width * scale) // 2 * 2)
    return out_h, out_w


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased resize of uint8 ``[T, H, W, 3]`` to uint8 ``[T, height, width, 3]``."""
    x = torch.from_numpy(np.ascontiguousarray(_as_uint8_thwc(frames))).permute(0, 3, 1, 2).float()
    x = _resize(x, height, width)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


class Mp4Writer:
    """Incremental H.264 (libx264, yuv420p) mp4 encoder; frames may arrive in chunks.

    Use as a context manager; ``write(frames)`` takes uint8 ``[T, H, W, 3]`` (or one
    ``[H, W, 3]`` frame). ``keyint`` sets the keyframe interval (GOP size), which bounds
    the cost of seeking to a random clip start. ``x264_params`` is a raw libx264 option
    string ("key=value:key=value").
    """

    def __init__(
        self,
        dst: str | os.PathLike | BinaryIO,
        *,
        fps: float,
        height: int,
        width: int,
        crf: int = 18,
        keyint: int | None = None,
        preset: str = "medium",
        x264_params: str | None = None,
    ):
        import av

        if height % 2 or width % 2 or height < 2 or width < 2:
            raise ValueError(f"yuv420p needs even frame sizes >= 2, got {height}x{width}")
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.height, self.width = height, width
        # A file-like destination has no extension to guess the container from.
        fmt = None if isinstance(dst, (str, os.PathLike)) else "mp4"
        self._container = av.open(dst if fmt else os.fspath(dst), mode="w", format=fmt)
        self._stream = self._container.add_stream(
            "libx264", rate=Fraction(fps).limit_denominator(1001)
        )
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        options = {"crf": str(crf), "preset": preset}
        if x264_params:
            options["x264-params"] = x264_params  # e.g. "mbtree=0", passed to libx264 as is
        self._stream.options = options
        if keyint is not None:
            if keyint < 1:
                raise ValueError(f"keyint must be >= 1, got {keyint}")
            self._stream.codec_context.gop_size = keyint
        # One encoder thread: callers parallelise across videos instead.
        self._stream.codec_context.thread_count = 1
        self.frames_written = 0

    def write(self, frames: np.ndarray) -> None:
        import av

        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(
                f"expected uint8 frames [T, {self.height}, {self.width}, 3], "
                f"got {frames.dtype} {frames.shape}"
            )
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in self._stream.encode(video_frame):
                self._container.mux(packet)
        self.frames_written += len(frames)

    def close(self) -> None:
        if self._container is None:
            return
        for packet in self._stream.encode():  # flush delayed (B-)frames
            self._container.mux(packet)
        self._container.close()
        self._container = None

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_mp4(
    frames: np.ndarray,
    dst: str | os.PathLike | BinaryIO,
    fps: float,
    *,
    crf: int = 18,
    keyint: int | None = None,
    preset: str = "medium",
    x264_params: str | None = None,
) -> None:
    """Encode uint8 ``[T, H, W, 3]`` frames (H, W even) to an H.264 mp4 at ``dst``."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected frames [T>0, H, W, 3], got shape {frames.shape}")
    _, height, width, _ = frames.shape
    with Mp4Writer(
        dst, fps=fps, height=height, width=width, crf=crf, keyint=keyint, preset=preset,
        x264_params=x264_params,
    ) as writer:
        writer.write(frames)


def encode_mp4(frames: np.ndarray, fps: float, **kwargs) -> bytes:
    """``write_mp4`` into memory; returns the mp4 bytes."""
    buf = io.BytesIO()
    write_mp4(frames, buf, fps, **kwargs)
    return buf.getvalue()
