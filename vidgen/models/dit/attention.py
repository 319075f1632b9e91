"""One attention entry point for the DiT, with interchangeable backends behind it.

Layout everywhere (Wan / flash-attn layout): q [B, Lq, H, D], k and v [B, Lk, H, D],
output [B, Lq, H, D]. Three input forms:

- dense: every batch row attends to all of its keys;
- dense + ``key_mask`` [B, Lk] bool: False keys (text padding) are ignored;
- varlen (packed): B == 1 and the tokens of several samples are concatenated;
  ``cu_seqlens_q`` / ``cu_seqlens_k`` [S+1] int32 hold the segment offsets and segment i
  of q attends only to segment i of k (block-diagonal attention). Self-attention passes
  the same offsets twice; packed cross-attention passes image offsets for q and text
  offsets for k, so text lengths may differ per sample.

Backends:

- ``"sdpa"``: one SDPA call per segment (exact, no wasted FLOPs; fastest on CPU; reads
  the offsets on the host, one device sync per call on GPU).
- ``"sdpa_mask"``: one SDPA call with a block-diagonal boolean mask [Lq, Lk]
  (memory grows with the square of the packed length: debugging and small inputs).
- ``"flex"``: FlexAttention with a document mask (compiled on CUDA; eager elsewhere,
  where it materialises the scores like ``sdpa_mask``).
- ``"flash_varlen"``: varlen flash attention, ``flash_attn.flash_attn_varlen_func`` if
  installed, else ``torch.nn.attention.varlen.varlen_attn``; CUDA and fp16/bf16 only.

``"auto"`` picks ``flash_varlen`` for half-precision CUDA inputs when it is available and
``sdpa`` otherwise. Forcing a backend that cannot run is an error naming the ones that can.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("sdpa", "sdpa_mask", "flex", "flash_varlen")

try:  # FlexAttention arrived in torch 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch build
    create_block_mask = flex_attention = None


# --------------------------------------------------------------------------------------
# Backend discovery
# --------------------------------------------------------------------------------------


@functools.cache
def _flash_varlen_fn():
    """The varlen flash kernel to call, or None: (q, k, v, cu_q, cu_k, max_q, max_k) -> out."""
    try:
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn
    except ImportError:
        return None


@functools.cache
def _compiled_flex():
    # Eager flex_attention materialises the full score matrix; on CUDA the compiled
    # kernel is the whole point of using it.
    return torch.compile(flex_attention, dynamic=True)


def available_backends(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16
) -> list[str]:
    """Backends that can run for inputs on ``device`` with ``dtype``, in preference order."""
    device = torch.device(device)
    names = ["sdpa", "sdpa_mask"]
    if flex_attention is not None:
        names.append("flex")
    half = dtype in (torch.float16, torch.bfloat16)
    if device.type == "cuda" and half and _flash_varlen_fn() is not None:
        names.insert(0, "flash_varlen")
    return names


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """Turn ``backend`` ("auto" or one of BACKENDS) into a backend that can run here."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(
            f"unknown attention backend {backend!r}; valid: 'auto', {', '.join(map(repr, BACKENDS))}"
        )
    available = available_backends(device, dtype)
    if backend == "auto":
        return "flash_varlen" if "flash_varlen" in available else "sdpa"
    if backend not in available:
        raise RuntimeError(
            f"attention backend {backend!r} is not available for {dtype} inputs on {torch.device(device)} "
            f"(available here: {', '.join(available)}). flash_varlen needs CUDA, fp16/bf16 inputs and "
            "flash_attn or torch.nn.attention.varlen; flex needs torch>=2.5."
        )
    return backend


# --------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    key_mask: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Scaled dot-product attention (scale 1/sqrt(D), no dropout, not causal).

    Args:
        q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
        cu_seqlens_q, cu_seqlens_k: [S+1] int offsets of the packed segments (varlen form,
            B must be 1). ``cu_seqlens_k`` defaults to ``cu_seqlens_q`` (self-attention).
        max_seqlen_q, max_seqlen_k: longest segments; computed from the offsets if None.
        key_mask: [B, Lk] bool, True = attend (dense form only).
        backend: "auto" or one of BACKENDS.
    Returns:
        [B, Lq, H, D] in the dtype of q.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be [B, L, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    name = resolve_backend(backend, q.device, q.dtype)
    varlen = cu_seqlens_q is not None
    if varlen:
        if key_mask is not None:
            raise ValueError("pass either cu_seqlens_q/k (packed) or key_mask (padded), not both")
        if q.shape[0] != 1:
            raise ValueError(
                f"packed (varlen) attention expects batch size 1, got q of shape {tuple(q.shape)}"
            )
        if cu_seqlens_k is None:
            if k.shape[1] != q.shape[1]:
                raise ValueError("cu_seqlens_k is required when q and k have different lengths")
            cu_seqlens_k, max_seqlen_k = cu_seqlens_q, max_seqlen_q
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(
                f"cu_seqlens_q has {cu_seqlens_q.numel() - 1} segments but cu_seqlens_k has {cu_seqlens_k.numel() - 1}"
            )
        if max_seqlen_q is None:
            max_seqlen_q = int(cu_seqlens_q.diff().max())
        if max_seqlen_k is None:
            max_seqlen_k = int(cu_seqlens_k.diff().max())
    elif cu_seqlens_k is not None:
        raise ValueError("cu_seqlens_k given without cu_seqlens_q")

    if name == "sdpa":
        if varlen:
            return _sdpa_segments(q, k, v, cu_seqlens_q, cu_seqlens_k)
        return _sdpa(q, k, v, None if key_mask is None else key_mask[:, None, None, :])
    if name == "sdpa_mask":
        if varlen:
            mask = (
                _segment_ids(cu_seqlens_q, q.shape[1])[:, None]
                == _segment_ids(cu_seqlens_k, k.shape[1])[None, :]
            )
            return _sdpa(q, k, v, mask)
        return _sdpa(q, k, v, None if key_mask is None else key_mask[:, None, None, :])

    # flex and flash_varlen implement the packed form; dense inputs are flattened into it
    # (B rows become B segments), which is exact since attention never crosses rows.
    batch, len_q = q.shape[:2]
    if not varlen:
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = _dense_to_varlen(
            q, k, v, key_mask
        )
    if name == "flex":
        out = _flex(q, k, v, cu_seqlens_q, cu_seqlens_k)
    else:
        out = _flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return out if varlen else out.reshape(batch, len_q, *out.shape[2:])


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """SDPA in the [B, L, H, D] layout; mask broadcasts to [B, H, Lq, Lk]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


def _sdpa_segments(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor) -> Tensor:
    """One dense SDPA per packed segment, concatenated back into [1, Lq, H, D]."""
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    outs = [
        _sdpa(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], None)
        for q0, q1, k0, k1 in zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:])
    ]
    return torch.cat(outs, dim=1)


def _flex(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor) -> Tensor:
    """FlexAttention with a document mask: query i sees key j iff both are in the same segment."""
    doc_q = _segment_ids(cu_q, q.shape[1])
    doc_k = _segment_ids(cu_k, k.shape[1])

    def same_document(b, h, q_idx, kv_idx):
        return doc_q[q_idx] == doc_k[kv_idx]

    block_mask = create_block_mask(
        same_document, None, None, q.shape[1], k.shape[1], device=q.device
    )
    fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
    return out.transpose(1, 2)


def _flash_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int) -> Tensor:
    fn = _flash_varlen_fn()
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    out = fn(q[0], k[0], v[0], cu_q, cu_k, int(max_q), int(max_k))  # [Nq, H, D]
    return out[None]


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _segment_ids(cu_seqlens: Tensor, length: int) -> Tensor:
    """[length] long: index of the segment each position falls in."""
    positions = torch.arange(length, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), positions, right=True)


def _dense_to_varlen(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None):
    """Flatten a padded batch into one packed sequence of B segments (masked keys dropped)."""
    batch, len_q, len_k = q.shape[0], q.shape[1], k.shape[1]
    device = q.device
    cu_q = torch.arange(batch + 1, device=device, dtype=torch.int32) * len_q
    q = q.reshape(1, batch * len_q, *q.shape[2:])
    if key_mask is None:
        cu_k = torch.arange(batch + 1, device=device, dtype=torch.int32) * len_k
        return (
            q,
            k.reshape(1, batch * len_k, *k.shape[2:]),
            v.reshape(1, batch * len_k, *v.shape[2:]),
            cu_q,
            cu_k,
            len_q,
            len_k,
        )
    lengths = key_mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError(
            "every row of key_mask needs at least one True entry (a sample with no keys)"
        )
    cu_k = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return q, k[key_mask][None], v[key_mask][None], cu_q, cu_k, len_q, int(lengths.max())
