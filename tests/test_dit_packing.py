"""Token layout and packing: patchify inverse, budgets, efficiency, the streaming buffer."""

import pytest
import torch

from vidgen.data.packing import collate_packed, first_fit_decreasing, num_tokens
from vidgen.models.dit import (
    PackingBuffer,
    build_wan_dit,
    pack_samples,
    packing_efficiency,
    patchify,
    unpatchify,
)

PATCH = (1, 2, 2)


def sample(t, h, w, text=2, key=None, channels=4):
    return dict(latent=torch.randn(channels, t, h, w), context=torch.randn(text, 8), key=key)


def test_patchify_unpatchify_are_inverse_and_match_the_conv3d_embedding():
    x = torch.randn(2, 4, 3, 6, 8)
    tokens = patchify(x, PATCH)
    assert tokens.shape == (2, 3 * 3 * 4, 16)
    torch.testing.assert_close(unpatchify(tokens, (3, 3, 4), PATCH), x, rtol=0, atol=0)
    # The model's linear patch embedding equals the Conv3d it stores (diffusers layout).
    model = build_wan_dit("tiny", in_channels=4, out_channels=4)
    conv = model.patch_embedding(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model._embed_patches(tokens), conv, atol=1e-5, rtol=1e-5)


def test_first_fit_decreasing_packs_a_known_case():
    assert first_fit_decreasing([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    assert first_fit_decreasing([3, 3, 3], 5) == [[0], [1], [2]]


def test_pack_samples_respects_budget_and_keeps_every_sample_once():
    g = torch.Generator().manual_seed(0)
    shapes = [
        (
            1 + int(torch.randint(0, 4, (1,), generator=g)),
            2 * int(torch.randint(1, 5, (1,), generator=g)),
            8,
        )
        for _ in range(12)
    ]
    samples = [sample(*s, text=1 + i % 4, key=i) for i, s in enumerate(shapes)]
    batches = pack_samples(samples, PATCH, max_tokens=64)
    keys = sorted(m["key"] for b in batches for m in b.meta)
    assert keys == list(range(12))
    total = sum(num_tokens(s["latent"].shape, PATCH) for s in samples)
    assert all(b.num_tokens <= 64 for b in batches)
    assert packing_efficiency(batches) == pytest.approx(total / (64 * len(batches)))
    # first-fit decreasing never needs more than 11/9 OPT + 1 bins; OPT >= total / budget
    assert len(batches) <= 11 / 9 * (total / 64) + 1
    for b in batches:
        assert b.cu_seqlens[-1] == b.num_tokens and b.cu_seqlens_ctx[-1] == b.context.shape[0]
        assert b.x.shape[0] == b.positions.shape[0] == b.seg_ids.shape[0]
        for out, m in zip(b.unpack(b.x), b.meta):
            torch.testing.assert_close(out, samples[m["key"]]["latent"], rtol=0, atol=0)


def test_budget_and_shape_errors():
    with pytest.raises(
        ValueError, match=r"latent shape \(4, 2, 8, 8\) has 32 tokens.*max_tokens=16"
    ):
        pack_samples([sample(1, 2, 2), sample(2, 8, 8)], PATCH, max_tokens=16)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        pack_samples([sample(1, 3, 4)], PATCH, max_tokens=16)
    with pytest.raises(ValueError, match="either every sample carries a timestep"):
        collate_packed([{**sample(1, 2, 2), "t": 0.5}, sample(1, 2, 2)], PATCH, 16)
    with pytest.raises(ValueError, match="context must be"):
        collate_packed([dict(latent=torch.randn(4, 1, 2, 2), context=torch.randn(0, 8))], PATCH, 16)


def test_packed_batch_carries_per_sample_values():
    samples = [
        {**sample(1, 2, 4, text=3), "t": 0.25, "weight": 2.0},
        {**sample(2, 2, 2, text=1), "t": 0.75},
    ]
    (b,) = pack_samples(samples, PATCH, max_tokens=10)
    assert b.t.tolist() == [0.25, 0.75] and b.weight.tolist() == [2.0, 1.0]
    assert b.cu_seqlens.tolist() == [0, 2, 4] and b.cu_seqlens_ctx.tolist() == [0, 3, 4]
    assert b.per_token(b.t).tolist() == [0.25, 0.25, 0.75, 0.75]
    assert b.efficiency == pytest.approx(0.4)
    half = b.to("cpu", torch.float16)
    assert (
        half.x.dtype == half.context.dtype == torch.float16 and half.cu_seqlens.dtype == torch.int32
    )


def test_packing_buffer_streams_every_sample_within_budget():
    def source():
        g = torch.Generator().manual_seed(1)
        for i in range(40):
            t, h = (
                1 + int(torch.randint(0, 3, (1,), generator=g)),
                2 * int(torch.randint(1, 4, (1,), generator=g)),
            )
            yield sample(t, h, 4, key=i)

    buffer = PackingBuffer(
        source(), PATCH, max_tokens=24, buffer_size=10, min_efficiency=0.9, seed=0
    )
    batches = list(buffer)
    keys = sorted(m["key"] for b in batches for m in b.meta)
    assert keys == list(range(40))
    assert all(b.num_tokens <= 24 for b in batches)
    full = [b.efficiency >= 0.9 for b in batches]
    assert sum(full) >= len(batches) - 4  # only the final flush may be under-full
    assert packing_efficiency(batches) > 0.85
    dropped = list(
        PackingBuffer(source(), PATCH, 24, buffer_size=10, min_efficiency=0.9, drop_last=True)
    )
    assert 0 < len(dropped) < len(batches)
    # deterministic for a seed
    again = list(PackingBuffer(source(), PATCH, 24, buffer_size=10, min_efficiency=0.9, seed=0))
    assert [[m["key"] for m in b.meta] for b in again] == [
        [m["key"] for m in b.meta] for b in batches
    ]
    with pytest.raises(ValueError, match="min_efficiency"):
        PackingBuffer(source(), PATCH, 24, min_efficiency=1.5)
