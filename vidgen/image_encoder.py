"""Frozen image encoders for Wan2.1-style image-to-video, behind one small interface.

    enc = build_image_encoder("/models/wan-i2v/image_encoder")   # a local CLIP vision directory
    tokens = enc.encode(first_frames)        # [B, 3, H, W] in [-1, 1] -> [B, enc.num_tokens, enc.dim]
    enc = build_image_encoder("none")        # -> None: I2V conditioned on the VAE latent only

The tokens are the penultimate hidden states of a CLIP vision tower (``hidden_states[-2]``,
as diffusers' ``WanImageToVideoPipeline.encode_image`` uses), class token included, so the
DiT can cross-attend to them next to the text tokens. For Wan2.1 (open-clip XLM-RoBERTa-large
ViT-H/14 at 224 px) that is [B, 257, 1280].

Preprocessing mirrors ``CLIPImageProcessor`` but runs in torch on the encoder's device:
[-1, 1] -> [0, 1], resize the short side to ``image_size`` (bicubic, antialiased), center
crop to ``image_size`` x ``image_size``, normalise with the mean/std of the directory's
``preprocessor_config.json`` (OpenAI CLIP defaults when absent).

No model hub is assumed: the encoder loads from a local directory.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_ENCODER_NONE = ("none", "")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_CLIP_MODEL_TYPES = ("clip_vision_model", "clip")


def _square(value, what: str) -> int:
    """An int, or an (h, w) pair with h == w, -> int (CLIP towers here are square)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"CLIPImageEncoder needs a square {what}, got {value}")
        value = value[0]
    return int(value)


class CLIPImageEncoder:
    """A frozen transformers ``CLIPVisionModel`` from a local directory.

    Attributes: ``dim`` (hidden size), ``image_size`` (square input side), ``num_tokens``
    ((image_size / patch_size) ** 2 + 1, the class token included), ``mean`` / ``std``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        from transformers import AutoConfig, CLIPVisionModel

        path = os.fspath(path)
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"image encoder directory {path!r} not found or has no config.json; point to a "
                "local CLIP vision model directory (config.json + weights), e.g. the image_encoder "
                "folder of a diffusers Wan2.1 I2V checkpoint (Wan2.1's "
                "open-clip-xlm-roberta-large-vit-huge-14 converted to transformers), downloaded beforehand"
            )
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type not in _CLIP_MODEL_TYPES:
            raise ValueError(
                f"{path} holds a {config.model_type!r} model; CLIPImageEncoder loads one of "
                f"{list(_CLIP_MODEL_TYPES)}"
            )
        model = CLIPVisionModel.from_pretrained(path, dtype=dtype, local_files_only=True)
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.dtype = dtype

        vcfg = model.config
        self.dim: int = int(vcfg.hidden_size)
        self.image_size: int = _square(vcfg.image_size, "image_size")
        patch = _square(vcfg.patch_size, "patch_size")
        self.num_tokens: int = (self.image_size // patch) ** 2 + 1

        mean, std = CLIP_MEAN, CLIP_STD
        pre = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(pre):
            with open(pre) as f:
                pcfg = json.load(f)
            mean = tuple(pcfg.get("image_mean", mean))
            std = tuple(pcfg.get("image_std", std))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(
                f"{pre}: image_mean / image_std must have 3 values, got {mean} / {std}"
            )
        self.mean: tuple[float, ...] = tuple(float(m) for m in mean)
        self.std: tuple[float, ...] = tuple(float(s) for s in std)

    def preprocess(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, 3, image_size, image_size] normalised, on the device (float32)."""
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a [B, 3, H, W] tensor in [-1, 1], got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [-1, 1], got dtype {images.dtype}")
        x = ((images.to(self.device, torch.float32) + 1.0) / 2.0).clamp(0.0, 1.0)
        size = self.image_size
        h, w = x.shape[-2:]
        if (h, w) != (size, size):
            # short side -> size, long side scaled like CLIPImageProcessor (int truncation)
            if h <= w:
                new_h, new_w = size, int(size * w / h)
            else:
                new_h, new_w = int(size * h / w), size
            if (new_h, new_w) != (h, w):
                x = F.interpolate(
                    x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
                ).clamp(0.0, 1.0)
            top, left = (new_h - size) // 2, (new_w - size) // 2
            x = x[..., top : top + size, left : left + size]
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] float in [-1, 1] -> [B, num_tokens, dim] float32 (penultimate CLIP layer)."""
        pixels = self.preprocess(images).to(self.dtype)
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2].float()

    def __call__(self, images: Tensor) -> Tensor:
        return self.encode(images)

    def to(self, device: torch.device | str) -> CLIPImageEncoder:
        self.model.to(device)
        self.device = torch.device(device)
        return self


def build_image_encoder(
    name_or_path: str | os.PathLike | None, **kwargs
) -> CLIPImageEncoder | None:
    """None / "none" / "" -> None (no image tokens); otherwise a local CLIP vision directory."""
    if name_or_path is None or (
        isinstance(name_or_path, str) and name_or_path.strip().lower() in IMAGE_ENCODER_NONE
    ):
        return None
    return CLIPImageEncoder(name_or_path, **kwargs)
