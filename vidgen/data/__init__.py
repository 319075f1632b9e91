"""Video data: WebDataset shards of captioned videos, decoded and bucketed in loader workers.

Light imports only; ``VideoDataModule`` lives in ``vidgen.data.datamodule`` (it pulls in
Lightning).
"""

from vidgen.data.buckets import Bucket, assign_bucket, parse_buckets
from vidgen.data.pipeline import SKIP_REASONS, VideoShardDataset, build_video_dataset
from vidgen.data.shards import VideoShardWriter, expand_shards
from vidgen.data.video import (
    decode_frames,
    probe_video,
    resize_crop,
    sample_frame_indices,
    to_model_range,
    write_mp4,
)

__all__ = [
    "SKIP_REASONS",
    "Bucket",
    "VideoShardDataset",
    "VideoShardWriter",
    "assign_bucket",
    "build_video_dataset",
    "decode_frames",
    "expand_shards",
    "parse_buckets",
    "probe_video",
    "resize_crop",
    "sample_frame_indices",
    "to_model_range",
    "write_mp4",
]
