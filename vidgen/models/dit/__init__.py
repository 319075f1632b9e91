"""Wan2.1-style video DiT: model, attention backends and sequence packing."""

from .attention import BACKENDS, attention, available_backends
from .model import WAN_PRESETS, WanDiT, build_wan_dit
from .packing import (
    PackedBatch,
    PackingBuffer,
    collate_packed,
    pack_samples,
    packing_efficiency,
    patchify,
    unpatchify,
)

__all__ = [
    "BACKENDS",
    "WAN_PRESETS",
    "PackedBatch",
    "PackingBuffer",
    "WanDiT",
    "attention",
    "available_backends",
    "build_wan_dit",
    "collate_packed",
    "pack_samples",
    "packing_efficiency",
    "patchify",
    "unpatchify",
]
