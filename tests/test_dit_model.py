"""WanDiT invariants: packed == per-sample, zero head, fp32 modulation, RoPE, checkpoints."""

import dataclasses

import pytest
import torch

from vidgen.diffusion.flow import flow_loss, interpolate
from vidgen.models.dit import WanDiT, available_backends, build_wan_dit, pack_samples, patchify
from vidgen.models.dit.model import apply_rope, rope_cos_sin, rope_split

BACKENDS = [b for b in available_backends("cpu", torch.float32) if b != "flash_varlen"]
PATCH = (1, 2, 2)
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def tiny_model(seed=0, **kwargs) -> WanDiT:
    """Tiny model with a random (non-zero) head so that outputs carry signal."""
    torch.manual_seed(seed)
    model = build_wan_dit("tiny", in_channels=4, out_channels=4, **kwargs)
    torch.nn.init.normal_(model.proj_out.weight, std=0.2)
    torch.nn.init.normal_(model.proj_out.bias, std=0.2)
    return model.eval()


def make_samples(seed=0):
    """Samples of different frame counts, resolutions, text lengths and timesteps."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 2, 4, 6), (4, 1, 2, 2), (4, 3, 6, 4)]
    text_lengths = [3, 7, 1]
    return [
        dict(
            latent=torch.randn(s, generator=g),
            context=torch.randn(n, 32, generator=g),
            t=0.15 + 0.3 * i,
            key=i,
        )
        for i, (s, n) in enumerate(zip(shapes, text_lengths))
    ]


def per_sample_forward(model, sample, latent=None):
    latent = sample["latent"] if latent is None else latent
    return model(latent[None], torch.tensor([sample["t"]]), sample["context"][None])[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_forward_equals_per_sample_forwards(backend):
    model = tiny_model()
    model.attn_backend = backend
    samples = make_samples()
    (packed,) = pack_samples(samples, PATCH, max_tokens=64)
    assert packed.num_samples == 3
    with torch.no_grad():
        outs = model.forward_packed(packed)
        for out, meta in zip(outs, packed.meta):
            ref = per_sample_forward(model, samples[meta["key"]])
            assert out.shape == ref.shape == samples[meta["key"]]["latent"].shape
            assert ref.abs().max() > 0.1
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_packed_flow_loss_and_gradients_equal_per_sample():
    model = tiny_model(seed=1)
    samples = make_samples(seed=1)
    (packed,) = pack_samples(samples, PATCH, max_tokens=64)
    ordered = [samples[m["key"]] for m in packed.meta]
    g = torch.Generator().manual_seed(3)
    eps = [torch.randn(s["latent"].shape, generator=g) for s in ordered]
    x0 = [s["latent"] for s in ordered]

    # Packed: noise the tokens with per-token t, one forward, loss on the unpacked outputs.
    eps_tokens = torch.cat([patchify(e, PATCH) for e in eps])
    xt = interpolate(packed.x, eps_tokens, packed.per_token(packed.t))
    weight = torch.tensor([1.0, 0.5, 2.0])
    loss_packed = flow_loss(
        model.forward_packed(dataclasses.replace(packed, x=xt)), x0, eps, weight
    )
    grads_packed = torch.autograd.grad(loss_packed, list(model.parameters()))

    preds = [
        per_sample_forward(
            model, s, interpolate(s["latent"][None], e[None], torch.tensor([s["t"]]))[0]
        )
        for s, e in zip(ordered, eps)
    ]
    loss_ref = flow_loss(preds, x0, eps, weight)
    grads_ref = torch.autograd.grad(loss_ref, list(model.parameters()))
    torch.testing.assert_close(loss_packed, loss_ref, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads_packed, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_context_mask_equals_truncated_context():
    model = tiny_model(seed=2)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 2, 4, 4, generator=g), torch.randn(2, 5, 32, generator=g)
    t = torch.tensor([0.2, 0.9])
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    with torch.no_grad():
        out = model(x, t, ctx, mask)
        torch.testing.assert_close(out[1:], model(x[1:], t[1:], ctx[1:, :2]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:1], model(x[:1], t[:1], ctx[:1]), atol=1e-5, rtol=1e-5)


def test_zero_initialised_head_gives_zero_output():
    torch.manual_seed(0)
    model = build_wan_dit("tiny", in_channels=4, out_channels=4)
    samples = make_samples()
    with torch.no_grad():
        out = model(torch.randn(2, 4, 2, 4, 4), torch.rand(2), torch.randn(2, 3, 32))
        packed_outs = model.forward_packed(pack_samples(samples, PATCH, 64)[0])
    assert out.shape == (2, 4, 2, 4, 4) and torch.count_nonzero(out) == 0
    assert all(torch.count_nonzero(o) == 0 for o in packed_outs)


def test_modulation_and_residual_stream_stay_fp32_under_bf16_autocast():
    model = tiny_model()
    seen, linear_dtypes = [], []
    model.blocks[0].register_forward_hook(
        lambda m, args, out: seen.append((args[0].dtype, args[1].dtype, out.dtype))
    )
    model.blocks[0].ffn.register_forward_hook(lambda m, args, out: linear_dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        temb, e0 = model.embed_time(torch.rand(3))
        out = model(torch.randn(1, 4, 1, 4, 4), torch.rand(1), torch.randn(1, 3, 32))
    assert temb.dtype == e0.dtype == torch.float32 and e0.shape == (3, 6, 32)
    assert seen == [
        (torch.float32, torch.float32, torch.float32)
    ]  # stream in, modulation, stream out
    assert linear_dtypes == [torch.bfloat16]  # while the matmuls do run in bf16
    assert torch.isfinite(out).all()


def test_rope_positions_are_per_sample():
    samples = make_samples()
    (packed,) = pack_samples(samples, PATCH, max_tokens=64)
    for i, grid in enumerate(packed.grids):
        pos = packed.positions[packed.seg_ids == i]
        assert pos.shape == (grid[0] * grid[1] * grid[2], 3)
        # restarting at 0 for every sample, in raster order (w fastest, then h, then t)
        gt, gh, gw = grid
        assert pos.tolist() == [[a, b, c] for a in range(gt) for b in range(gh) for c in range(gw)]
    assert rope_split(128) == (44, 42, 42) and rope_split(16) == (8, 4, 4)
    # The packed forward uses them: RoPE is relative, so offsetting a sample's positions
    # changes nothing, while stretching its w axis changes that sample (and only it).
    model = tiny_model()
    first = packed.seg_ids == 0
    offset, stretched = packed.positions.clone(), packed.positions.clone()
    offset[first] += 3
    stretched[first, 2] *= 2
    with torch.no_grad():
        a = model.forward_packed(packed)
        b = model.forward_packed(dataclasses.replace(packed, positions=offset))
        c = model.forward_packed(dataclasses.replace(packed, positions=stretched))
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[0], c[0], atol=1e-4)
    torch.testing.assert_close(a[1], c[1])


def test_rope_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 48, generator=g), torch.randn(1, 1, 1, 48, generator=g)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([pq]), 48)
        ck, sk = rope_cos_sin(torch.tensor([pk]), 48)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(
        score([3, 1, 2], [1, 4, 0]), score([5, 2, 7], [3, 5, 5]), atol=1e-5, rtol=1e-5
    )
    assert not torch.allclose(score([3, 1, 2], [1, 4, 0]), score([3, 1, 2], [1, 4, 1]))


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(seed=4).train()
    x, t, ctx = torch.randn(1, 4, 2, 4, 4), torch.rand(1), torch.randn(1, 3, 32)
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        model(x, t, ctx).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_presets_have_wan_sizes():
    with torch.device("meta"):
        sizes = {
            name: sum(p.numel() for p in build_wan_dit(name).parameters())
            for name in ("1.3B", "14B")
        }
    assert 1.2e9 < sizes["1.3B"] < 1.6e9
    assert 13e9 < sizes["14B"] < 15e9
    with pytest.raises(ValueError, match="unknown WanDiT size 'huge'.*tiny, 1.3B, 14B"):
        build_wan_dit("huge")


def test_input_errors_are_clear():
    model = tiny_model()
    with pytest.raises(ValueError, match="divisible by patch_size"):
        model(torch.randn(1, 4, 1, 5, 4), torch.rand(1), torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match=r"context must be \[B=1, L, 32\]"):
        model(torch.randn(1, 4, 1, 4, 4), torch.rand(1), torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="packed.t is None"):
        samples = [{k: v for k, v in s.items() if k != "t"} for s in make_samples()]
        model.forward_packed(pack_samples(samples, PATCH, 64)[0])


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model(seed=5)
    model.save_pretrained(tmp_path / "dit")
    loaded = WanDiT.from_pretrained(tmp_path / "dit", attn_backend="sdpa_mask").eval()
    assert loaded.attn_backend == "sdpa_mask" and loaded.config == model.config
    x, t, ctx = torch.randn(1, 4, 1, 4, 4), torch.rand(1), torch.randn(1, 2, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, ctx), model(x, t, ctx))
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        WanDiT.from_pretrained(tmp_path / "missing")


def test_unknown_backend_is_refused_at_construction():
    with pytest.raises(ValueError, match="unknown attn_backend 'fast'; valid: 'auto', sdpa"):
        build_wan_dit("tiny", attn_backend="fast")


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = tiny_model(seed=6)
    x, t, ctx = torch.randn(2, 4, 2, 4, 4), torch.rand(2), torch.randn(2, 3, 32)
    (packed,) = pack_samples(make_samples(), PATCH, max_tokens=64)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(model)(x, t, ctx), model(x, t, ctx), atol=1e-5, rtol=1e-5
        )
        for a, b in zip(torch.compile(model.forward_packed)(packed), model.forward_packed(packed)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_bf16_on_cuda_matches_per_sample_with_auto_backend():
    model = tiny_model(seed=7).cuda()
    samples = [
        {**s, "latent": s["latent"].cuda(), "context": s["context"].cuda()} for s in make_samples()
    ]
    (packed,) = pack_samples(samples, PATCH, max_tokens=64)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        outs = model.forward_packed(packed)
        for out, meta in zip(outs, packed.meta):
            ref = per_sample_forward(model, samples[meta["key"]])
            torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
