"""Token layout and multi-resolution sequence packing for the DiT.

A latent [C, T, H, W] becomes T'*H'*W' patch tokens (T' = T/pt, ...) in raster order
(t, then h, then w), each token holding its patch flattened as (pt, ph, pw, C): the
layout of Wan's output head, used for the input too so that ``patchify`` and
``unpatchify`` are exact inverses.

Packing (the CogVideoX / NaViT idea applied to video): samples of different frame counts
and resolutions are concatenated into one sequence up to a token budget, first-fit
decreasing. Each sample keeps its own timestep, RoPE positions (restarting at 0), text
tokens and loss weight; attention is block-diagonal per sample (see attention.py).

    batches = pack_samples(samples, patch_size=(1, 2, 2), max_tokens=4096)
    outs = model.forward_packed(batches[0])           # list of [C, T, H, W]

``PackingBuffer`` does the same on a stream inside a data-loader worker.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------------------
# Token layout
# --------------------------------------------------------------------------------------


def patch_grid(shape: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int, int]:
    """(T', H', W') for a latent of ``shape`` [..., T, H, W]; sizes must divide exactly."""
    thw = tuple(shape[-3:])
    if len(thw) != 3 or any(s % p for s, p in zip(thw, patch_size)):
        raise ValueError(
            f"latent frames/height/width {thw} must be divisible by patch_size {tuple(patch_size)} "
            "(no silent cropping: choose bucket sizes that are multiples of the patch)"
        )
    return tuple(s // p for s, p in zip(thw, patch_size))


def patchify(x: Tensor, patch_size: Sequence[int]) -> Tensor:
    """x: [..., C, T, H, W] -> tokens [..., T'*H'*W', pt*ph*pw*C]."""
    *lead, c, t, h, w = x.shape
    pt, ph, pw = patch_size
    gt, gh, gw = patch_grid(x.shape, patch_size)
    n = len(lead)
    x = x.reshape(*lead, c, gt, pt, gh, ph, gw, pw)
    x = x.permute(*range(n), n + 1, n + 3, n + 5, n + 2, n + 4, n + 6, n)
    return x.reshape(*lead, gt * gh * gw, pt * ph * pw * c)


def unpatchify(tokens: Tensor, grid: Sequence[int], patch_size: Sequence[int]) -> Tensor:
    """tokens: [..., T'*H'*W', pt*ph*pw*C] -> [..., C, T'*pt, H'*ph, W'*pw]."""
    *lead, length, dim = tokens.shape
    gt, gh, gw = grid
    pt, ph, pw = patch_size
    if length != gt * gh * gw or dim % (pt * ph * pw):
        raise ValueError(
            f"tokens {tuple(tokens.shape)} do not match grid {tuple(grid)} and patch {tuple(patch_size)}"
        )
    c = dim // (pt * ph * pw)
    n = len(lead)
    x = tokens.reshape(*lead, gt, gh, gw, pt, ph, pw, c)
    x = x.permute(*range(n), n + 6, n, n + 3, n + 1, n + 4, n + 2, n + 5)
    return x.reshape(*lead, c, gt * pt, gh * ph, gw * pw)


def grid_positions(grid: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """[T'*H'*W', 3] long (t, h, w) coordinates of every token, in patchify order."""
    axes = [torch.arange(n, device=device) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def num_tokens(shape: Sequence[int], patch_size: Sequence[int]) -> int:
    """Patch tokens of a latent of ``shape`` [..., T, H, W]."""
    return math.prod(patch_grid(shape, patch_size))


# --------------------------------------------------------------------------------------
# The packed batch
# --------------------------------------------------------------------------------------


@dataclass
class PackedBatch:
    """Patch tokens of S samples concatenated into one sequence of N <= budget tokens.

    x: [N, pt*ph*pw*C] tokens (clean latents as packed; the trainer swaps in x_t).
    positions: [N, 3] long (t, h, w) patch coordinates, restarting at 0 per sample.
    seg_ids: [N] long, the sample each token belongs to.
    cu_seqlens: [S+1] int32 token offsets; max_seqlen: longest sample in tokens.
    context: [M, D] text tokens of all samples concatenated (lengths may differ).
    cu_seqlens_ctx: [S+1] int32 text offsets; max_seqlen_ctx: longest text.
    t: [S] timesteps in [0, 1], or None until the trainer samples them.
    weight: [S] per-sample loss weights.
    grids: (T', H', W') per sample; patch_size; budget: the token budget it was packed to.
    meta: the other keys of each sample (e.g. "key", "caption"), passed through untouched.
    cond: [N, pt*ph*pw*C_cond] I2V conditioning tokens (mask + first-frame latent), laid out
        like x, or None. image: [M_img, D_img] image-encoder tokens of all samples, or None;
        cu_seqlens_img [S+1] int32 / max_seqlen_img: their offsets and longest run.
    """

    x: Tensor
    positions: Tensor
    seg_ids: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    context: Tensor
    cu_seqlens_ctx: Tensor
    max_seqlen_ctx: int
    t: Tensor | None
    weight: Tensor
    grids: list[tuple[int, int, int]]
    patch_size: tuple[int, int, int]
    budget: int
    meta: list[dict] = field(default_factory=list)
    cond: Tensor | None = None
    image: Tensor | None = None
    cu_seqlens_img: Tensor | None = None
    max_seqlen_img: int = 0

    @property
    def num_samples(self) -> int:
        return len(self.grids)

    @property
    def num_tokens(self) -> int:
        return self.x.shape[0]

    @property
    def efficiency(self) -> float:
        """Real tokens / budget."""
        return self.num_tokens / self.budget

    def per_token(self, values: Tensor) -> Tensor:
        """Broadcast per-sample values [S, ...] to tokens [N, ...]."""
        return values[self.seg_ids]

    def loss_weights(self) -> Tensor:
        """[N] token weights weight_i / (tokens_i * S): a weighted sum of per-token losses is
        the mean over samples of weight_i times the sample's mean loss (``flow_loss``)."""
        counts = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).to(self.weight)
        return self.per_token(self.weight / (counts * self.num_samples))

    def unpack(self, tokens: Tensor) -> list[Tensor]:
        """tokens [N, pt*ph*pw*C'] (e.g. the model output) -> list of [C', T, H, W]."""
        sizes = [math.prod(g) for g in self.grids]
        return [
            unpatchify(chunk, g, self.patch_size)
            for chunk, g in zip(tokens.split(sizes), self.grids)
        ]

    def to(
        self,
        device: torch.device | str,
        dtype: torch.dtype | None = None,
        non_blocking: bool = False,
    ):
        """Move every tensor to ``device``; floating tensors (x, context, t, weight) also to ``dtype``."""

        def move(value):
            if not isinstance(value, Tensor):
                return value
            cast = dtype if dtype is not None and value.is_floating_point() else None
            return value.to(device=device, dtype=cast, non_blocking=non_blocking)

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def pin_memory(self):
        """Called by DataLoader(pin_memory=True)."""
        return replace(
            self,
            **{
                f.name: getattr(self, f.name).pin_memory()
                for f in fields(self)
                if isinstance(getattr(self, f.name), Tensor)
            },
        )


def pad_packed_context(packed: PackedBatch, text_len: int) -> PackedBatch:
    """Each sample's text tokens zero-padded to ``text_len`` (Wan's fixed-length convention,
    ``WanDiT(text_len=...)``): context [S * text_len, D] with equal offsets."""
    lengths = packed.cu_seqlens_ctx[1:] - packed.cu_seqlens_ctx[:-1]
    if int(lengths.max()) > text_len:
        raise ValueError(
            f"a packed caption has {int(lengths.max())} text tokens, more than the model's "
            f"text_len={text_len}: encode with max_length={text_len} (Wan truncates there)"
        )
    starts = packed.cu_seqlens_ctx[:-1].long()
    sample = torch.repeat_interleave(torch.arange(packed.num_samples, device=starts.device), lengths.long())
    index = torch.arange(packed.context.shape[0], device=starts.device) - starts[sample] + sample * text_len
    context = packed.context.new_zeros(packed.num_samples * text_len, packed.context.shape[1])
    context[index] = packed.context
    cu = torch.arange(packed.num_samples + 1, dtype=packed.cu_seqlens_ctx.dtype,
                      device=packed.cu_seqlens_ctx.device) * text_len
    return replace(packed, context=context, cu_seqlens_ctx=cu, max_seqlen_ctx=text_len)


PACKED_KEYS = ("latent", "context", "t", "weight", "cond", "image")  # the rest goes to meta


def collate_packed(
    samples: Sequence[dict], patch_size: Sequence[int], max_tokens: int
) -> PackedBatch:
    """Concatenate ``samples`` (which must fit in ``max_tokens``) into one PackedBatch.

    Each sample is a dict with ``latent`` [C, T, H, W], ``context`` [L, D] (L >= 1),
    optional ``t`` (float, all or none of the samples) and ``weight`` (float, default 1);
    for image-to-video also ``cond`` [C_cond, T, H, W] and ``image`` [Li, D_img] (each all
    or none of the samples).
    """
    if not samples:
        raise ValueError("collate_packed needs at least one sample")
    patch_size = tuple(int(p) for p in patch_size)
    for key, what in (("t", "a timestep 't' (or none does: the trainer samples them)"),
                      ("cond", "an I2V condition 'cond' or none does"),
                      ("image", "I2V image tokens 'image' or none does")):
        if len({key in s for s in samples}) > 1:
            raise ValueError(f"either every sample carries {what}")
    with_t = "t" in samples[0]
    xs, positions, contexts, grids, metas, conds = [], [], [], [], [], []
    for i, s in enumerate(samples):
        latent, context = s["latent"], s["context"]
        if latent.ndim != 4:
            raise ValueError(f"sample {i}: latent must be [C, T, H, W], got {tuple(latent.shape)}")
        if context.ndim != 2 or context.shape[0] < 1:
            raise ValueError(
                f"sample {i}: context must be [L, D] with L >= 1, got {tuple(context.shape)}"
            )
        grid = patch_grid(latent.shape, patch_size)
        if "cond" in s:
            if s["cond"].ndim != 4 or s["cond"].shape[1:] != latent.shape[1:]:
                raise ValueError(
                    f"sample {i}: cond must be [C, T, H, W] with the latent's T, H, W "
                    f"{tuple(latent.shape[1:])}, got {tuple(s['cond'].shape)}"
                )
            conds.append(patchify(s["cond"], patch_size))
        xs.append(patchify(latent, patch_size))
        positions.append(grid_positions(grid, latent.device))
        contexts.append(context)
        grids.append(grid)
        metas.append({k: v for k, v in s.items() if k not in PACKED_KEYS})
    if len({x.shape[1] for x in xs}) != 1 or len({c.shape[1] for c in contexts}) != 1:
        raise ValueError(
            f"samples disagree on latent channels {sorted({x.shape[1] for x in xs})} (tokens) "
            f"or text dim {sorted({c.shape[1] for c in contexts})}"
        )
    lengths = torch.tensor([x.shape[0] for x in xs])
    text_lengths = torch.tensor([c.shape[0] for c in contexts])
    if int(lengths.sum()) > max_tokens:
        raise ValueError(
            f"samples hold {int(lengths.sum())} tokens, more than the budget max_tokens={max_tokens}"
        )
    device = xs[0].device
    images = [s["image"] for s in samples] if "image" in samples[0] else None
    if images and (any(im.ndim != 2 for im in images) or len({im.shape[1] for im in images}) > 1):
        raise ValueError(
            f"image tokens must be [L, D] of one width D, got {[tuple(im.shape) for im in images]}"
        )
    image_lengths = torch.tensor([im.shape[0] for im in images]) if images else None
    return PackedBatch(
        x=torch.cat(xs),
        positions=torch.cat(positions),
        seg_ids=torch.repeat_interleave(torch.arange(len(samples)), lengths).to(device),
        cu_seqlens=F.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32),
        max_seqlen=int(lengths.max()),
        context=torch.cat(contexts),
        cu_seqlens_ctx=F.pad(text_lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32),
        max_seqlen_ctx=int(text_lengths.max()),
        t=torch.tensor([float(s["t"]) for s in samples], device=device) if with_t else None,
        weight=torch.tensor([float(s.get("weight", 1.0)) for s in samples], device=device),
        grids=grids,
        patch_size=patch_size,
        budget=int(max_tokens),
        meta=metas,
        cond=torch.cat(conds) if conds else None,
        image=torch.cat(images) if images else None,
        cu_seqlens_img=None
        if images is None
        else F.pad(image_lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32),
        max_seqlen_img=int(image_lengths.max()) if images else 0,
    )


# --------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin-pack item ``sizes`` into bins of ``capacity``; returns item indices per bin.

    Largest items first, each into the first bin with room (11/9 OPT + 6/9 worst case).
    Ties keep input order, so a shuffled input stream gives shuffled bins.
    """
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        size = sizes[i]
        if size > capacity:
            raise ValueError(f"item {i} has {size} tokens, more than the budget {capacity}")
        for b, room in enumerate(free):
            if size <= room:
                bins[b].append(i)
                free[b] -= size
                break
        else:
            bins.append([i])
            free.append(capacity - size)
    return [sorted(b) for b in bins]


def pack_samples(
    samples: Sequence[dict], patch_size: Sequence[int], max_tokens: int
) -> list[PackedBatch]:
    """Greedily pack ``samples`` (see ``collate_packed``) into sequences of <= ``max_tokens``.

    Only image tokens count towards the budget: they dominate memory and FLOPs (text
    tokens enter only as cross-attention keys). A sample larger than the budget is an
    error naming its shape, never a silent crop.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    sizes = [num_tokens(s["latent"].shape, patch_size) for s in samples]
    for s, size in zip(samples, sizes):
        if size > max_tokens:
            raise ValueError(
                f"a sample with latent shape {tuple(s['latent'].shape)} has {size} tokens at patch size "
                f"{tuple(patch_size)}, more than max_tokens={max_tokens}; raise the budget or drop that bucket"
            )
    bins = first_fit_decreasing(sizes, max_tokens)
    return [collate_packed([samples[i] for i in b], patch_size, max_tokens) for b in bins]


def packing_efficiency(batches: Sequence[PackedBatch]) -> float:
    """Real tokens / (number of sequences * budget): the fraction of compute not wasted."""
    if not batches:
        raise ValueError("packing_efficiency of an empty list of batches")
    return sum(b.num_tokens for b in batches) / sum(b.budget for b in batches)


class PackingBuffer:
    """Turn a stream of samples into a stream of PackedBatches (use inside a loader worker).

    Fills a buffer of ``buffer_size`` samples, packs it first-fit decreasing, emits the
    sequences that are at least ``min_efficiency`` full (at least the fullest one, so the
    stream always advances) in shuffled order, and keeps the samples of the rest for the
    next round, where new samples can fill the gaps. At the end of the stream the rest
    is packed and emitted unless ``drop_last``.

    Args:
        source: iterable of sample dicts (see ``collate_packed``).
        patch_size, max_tokens: as in ``pack_samples``.
        buffer_size: samples held before packing; larger packs tighter but uses memory.
        min_efficiency: fill fraction in [0, 1] a sequence needs to leave the buffer.
        seed: shuffle seed (give each worker / rank its own).
        drop_last: drop the under-full remainder at the end of the stream.
    """

    def __init__(
        self,
        source: Iterable[dict],
        patch_size: Sequence[int],
        max_tokens: int,
        buffer_size: int = 64,
        min_efficiency: float = 0.95,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if not 0.0 <= min_efficiency <= 1.0:
            raise ValueError(f"min_efficiency must be in [0, 1], got {min_efficiency}")
        self.source = source
        self.patch_size = tuple(patch_size)
        self.max_tokens = int(max_tokens)
        self.buffer_size = buffer_size
        self.min_efficiency = min_efficiency
        self.seed = seed
        self.drop_last = drop_last

    def _emit(
        self, buffer: list[dict], rng: random.Random, final: bool
    ) -> tuple[list[PackedBatch], list[dict]]:
        """Pack ``buffer``; return (batches ready to emit, samples kept for the next round)."""
        sizes = [num_tokens(s["latent"].shape, self.patch_size) for s in buffer]
        bins = first_fit_decreasing(sizes, self.max_tokens)
        fill = [sum(sizes[i] for i in b) / self.max_tokens for b in bins]
        if final:
            ready = [] if self.drop_last else list(range(len(bins)))
        else:
            ready = [j for j, f in enumerate(fill) if f >= self.min_efficiency]
            if not ready:
                ready = [max(range(len(bins)), key=fill.__getitem__)]
        rng.shuffle(ready)
        batches = [
            collate_packed([buffer[i] for i in bins[j]], self.patch_size, self.max_tokens)
            for j in ready
        ]
        chosen = set(ready)
        kept = [buffer[i] for j, b in enumerate(bins) if j not in chosen for i in b]
        return batches, kept

    def __iter__(self) -> Iterator[PackedBatch]:
        rng = random.Random(self.seed)
        buffer: list[dict] = []
        for sample in self.source:
            size = num_tokens(sample["latent"].shape, self.patch_size)
            if size > self.max_tokens:
                raise ValueError(
                    f"a sample with latent shape {tuple(sample['latent'].shape)} has {size} tokens, "
                    f"more than max_tokens={self.max_tokens}"
                )
            buffer.append(sample)
            if len(buffer) >= self.buffer_size:
                batches, buffer = self._emit(buffer, rng, final=False)
                yield from batches
        if buffer:
            batches, _ = self._emit(buffer, rng, final=True)
            yield from batches
