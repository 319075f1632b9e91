"""The one attention entry point: every backend == plain per-sample SDPA."""

import pytest
import torch
import torch.nn.functional as F

from vidgen.models.dit.attention import BACKENDS, attention, available_backends, resolve_backend

CPU_BACKENDS = [b for b in available_backends("cpu", torch.float32) if b != "flash_varlen"]
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def reference(q, k, v):
    """[1, Lq, H, D] x [1, Lk, H, D] dense SDPA."""
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)


def cu(lengths):
    return F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)


def packed_qkv(len_q, len_k, heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, sum(len_q), heads, dim, generator=g)
    k = torch.randn(1, sum(len_k), heads, dim, generator=g)
    v = torch.randn(1, sum(len_k), heads, dim, generator=g)
    return q, k, v


def per_segment_reference(q, k, v, len_q, len_k):
    outs, cq, ck = [], cu(len_q).tolist(), cu(len_k).tolist()
    for i in range(len(len_q)):
        outs.append(
            reference(q[:, cq[i] : cq[i + 1]], k[:, ck[i] : ck[i + 1]], v[:, ck[i] : ck[i + 1]])
        )
    return torch.cat(outs, dim=1)


def test_flex_available_or_reason():
    if "flex" not in CPU_BACKENDS:
        pytest.skip("torch.nn.attention.flex_attention is not in this torch build")
    assert set(CPU_BACKENDS) == {"sdpa", "sdpa_mask", "flex"}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_self_attention_is_block_diagonal(backend):
    lengths = [5, 12, 3]
    q, k, v = packed_qkv(lengths, lengths)
    out = attention(q, k, v, cu_seqlens_q=cu(lengths), backend=backend)
    torch.testing.assert_close(
        out, per_segment_reference(q, k, v, lengths, lengths), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_cross_attention_with_different_text_lengths(backend):
    len_q, len_k = [6, 10, 4], [3, 1, 7]
    q, k, v = packed_qkv(len_q, len_k, seed=1)
    out = attention(
        q,
        k,
        v,
        cu_seqlens_q=cu(len_q),
        cu_seqlens_k=cu(len_k),
        max_seqlen_q=10,
        max_seqlen_k=7,
        backend=backend,
    )
    torch.testing.assert_close(
        out, per_segment_reference(q, k, v, len_q, len_k), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dense_key_mask_ignores_padding(backend):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 6, 2, 8, generator=g) for _ in range(3))
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    out = attention(q, k, v, key_mask=mask, backend=backend)
    torch.testing.assert_close(out[:1], reference(q[:1], k[:1], v[:1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        out[1:], reference(q[1:], k[1:, :2], v[1:, :2]), atol=1e-5, rtol=1e-5
    )
    # Without a mask every backend is plain batched attention.
    dense = attention(q, k, v, backend=backend)
    torch.testing.assert_close(
        dense,
        torch.cat([reference(q[i : i + 1], k[i : i + 1], v[i : i + 1]) for i in range(2)]),
        atol=1e-5,
        rtol=1e-5,
    )


def test_backend_errors_name_the_valid_ones():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="unknown attention backend 'magic'.*'sdpa'"):
        attention(q, q, q, backend="magic")
    with pytest.raises(RuntimeError, match="'flash_varlen' is not available.*available here: sdpa"):
        attention(q, q, q, backend="flash_varlen")
    assert resolve_backend("auto", "cpu", torch.float32) == "sdpa"
    assert set(BACKENDS) >= set(available_backends("cpu"))


def test_input_form_errors():
    q = torch.randn(2, 4, 2, 8)
    with pytest.raises(ValueError, match="batch size 1"):
        attention(q, q, q, cu_seqlens_q=cu([4, 4]))
    with pytest.raises(ValueError, match="not both"):
        attention(
            q[:1], q[:1], q[:1], cu_seqlens_q=cu([4]), key_mask=torch.ones(1, 4, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="at least one True"):
        attention(
            q,
            q,
            q,
            key_mask=torch.zeros(2, 4, dtype=torch.bool),
            backend="flex" if "flex" in CPU_BACKENDS else "sdpa",
        )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flash_varlen_matches_sdpa_on_cuda():
    if "flash_varlen" not in available_backends("cuda", torch.bfloat16):
        pytest.skip("neither flash_attn nor torch.nn.attention.varlen is available")
    len_q, len_k = [64, 100, 30], [7, 20, 1]
    q, k, v = (t.cuda().bfloat16() for t in packed_qkv(len_q, len_k, heads=4, dim=64))
    kwargs = dict(
        cu_seqlens_q=cu(len_q).cuda(),
        cu_seqlens_k=cu(len_k).cuda(),
        max_seqlen_q=100,
        max_seqlen_k=20,
    )
    assert resolve_backend("auto", "cuda", torch.bfloat16) == "flash_varlen"
    out = attention(q, k, v, backend="flash_varlen", **kwargs)
    ref = attention(q, k, v, backend="sdpa", **kwargs)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
