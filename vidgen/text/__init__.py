"""Text encoders for the DiT."""

from .encoders import (
    MiniLMEncoder,
    T5Encoder,
    TextEncoder,
    build_text_encoder,
    drop_captions,
    trim_padding,
)

__all__ = [
    "MiniLMEncoder",
    "T5Encoder",
    "TextEncoder",
    "build_text_encoder",
    "drop_captions",
    "trim_padding",
]
