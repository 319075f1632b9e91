"""Wan2.1-style video DiT: model and attention backends (sequence packing, its input, is
``vidgen.data.packing``, re-exported here)."""

from vidgen.data.packing import (
    PackedBatch,
    PackingBuffer,
    collate_packed,
    pack_samples,
    packing_efficiency,
    patchify,
    unpatchify,
)

from .attention import BACKENDS, attention, available_backends
from .load import init_weights_from, load_dit
from .model import WAN_PRESETS, WanDiT, build_wan_dit, expand_t2v

__all__ = [
    "BACKENDS",
    "WAN_PRESETS",
    "PackedBatch",
    "PackingBuffer",
    "WanDiT",
    "attention",
    "available_backends",
    "build_wan_dit",
    "expand_t2v",
    "init_weights_from",
    "load_dit",
    "collate_packed",
    "pack_samples",
    "packing_efficiency",
    "patchify",
    "unpatchify",
]
