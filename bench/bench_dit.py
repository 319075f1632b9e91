"""Benchmark our packed WanDiT training step against diffusers' WanTransformer3DModel.

    .venv/bin/python bench/bench_dit.py                         # CPU defaults, ~1-2 min on 2 cores
    .venv/bin/python bench/bench_dit.py --size tiny --steps 3   # smoke run, seconds
    .venv/bin/python bench/bench_dit.py --device cuda --dtype bfloat16 --size 1.3B \
        --max-tokens 32768 --checkpointing --json dit.json      # the real mix on one GPU

1. Training step (x_t, forward, flow loss, backward; no optimizer) on the same stream of
   mixed-shape latent samples, both models with the same widths and weights (ours converted
   to diffusers with vidgen.tools.convert_dit):
   - ours: samples packed to --max-tokens by PackingBuffer (first-fit decreasing, 64-sample
     buffer, sequences emitted when >= 95% full), one forward_packed per sequence;
   - diffusers, padded: consecutive samples batched while B * (padded tokens) fits the same
     budget, latents zero-padded to the batch's max (T, H, W), text zero-padded to the
     batch's longest caption (diffusers has no mask for either), loss masked to the real
     region: what a trainer without packing does with a mixed stream;
   - diffusers, same-shape: the same samples grouped by bucket, so no padding at all
     (a bucketed trainer); this isolates per-token speed from the cost of padding.
   Figures: real (unpadded) tokens per second and the ratio ours / diffusers; packing
   efficiency of ours (real tokens / budget) next to the padding efficiency of the
   baseline (real tokens / tokens computed).
2. CUDA only: MFU of our packed step for the 1.3B shape in bf16 autocast (formula below).

The sample mix: clip lengths --frames (default 17 33 65) x square sizes --pixels, drawn
uniformly; a clip of F frames and P px maps to a latent of 1 + (F-1)/4 frames and P/8 px
(Wan VAE), i.e. (1 + (F-1)/4) * (P/16)^2 tokens at patch (1, 2, 2). The CPU sizes use
pixels 64/96/128, the 1.3B size 256/384/512: token counts and the default budget scale by
exactly 16, so the packing problem (and its efficiency) is the same at both scales.

Model FLOPs per step (the MFU numerator; biases, norms and the time MLP left out):
    6 * (N_img * P_img + N_txt * P_txt)  +  3 * layers * sum_i (4 L_i^2 d + 4 L_i Lc_i d)
P_img: weights applied to each image token (per block: self-attn q,k,v,o 4d^2, cross-attn
q,o 2d^2, FFN 2 d ffn; plus patch embedding and output head); P_txt: weights applied to each
text token (text embedding, per block cross-attn k,v 2d^2); L_i, Lc_i: image / text tokens
of sample i (attention is per sample); the factor 3 counts forward + backward. Useful FLOPs
count real tokens only, so a padded baseline gets no credit for its padding. With activation
checkpointing the blocks' forward runs twice: that is in the HFU figure, not in the MFU one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vidgen.diffusion.flow import (  # noqa: E402
    flow_loss,
    interpolate,
    resolution_shift,
    sample_timesteps,
)
from vidgen.models.dit import PackingBuffer, WanDiT, packing_efficiency, patchify  # noqa: E402
from vidgen.tools import convert_dit  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PATCH = (1, 2, 2)
LATENT_CHANNELS = 16

# name: (model widths, default pixel sizes, default token budget)
SIZES = {
    "tiny": (dict(dim=128, ffn_dim=512, num_heads=2, num_layers=2, text_dim=128), (64, 96, 128), 2048),
    "small": (dict(dim=256, ffn_dim=1024, num_heads=4, num_layers=4, text_dim=256), (64, 96, 128), 2048),
    "1.3B": (dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096), (256, 384, 512), 32768),
}
# Dense bf16 peak TFLOP/s by device name (substring, first match); --peak-tflops overrides.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument("--steps", type=int, default=6, help="timed packed steps of ours (the baselines "
                   "run as many steps as they need for the same samples)")
    p.add_argument("--max-tokens", type=int, help="token budget per step (default per size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="bfloat16 = fp32 weights under bf16 autocast (bf16-mixed)")
    p.add_argument("--frames", type=int, nargs="+", default=[17, 33, 65], help="clip lengths (1+4k)")
    p.add_argument("--pixels", type=int, nargs="+", help="square frame sizes, multiples of 16")
    p.add_argument("--text-len", type=int, nargs=2, default=[32, 96], metavar=("MIN", "MAX"),
                   help="caption lengths in text tokens, uniform")
    p.add_argument("--repeats", type=int, default=1, help="timed rounds (median); rounds interleave models")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (both models)")
    p.add_argument("--no-same-shape", action="store_true", help="skip the same-shape diffusers baseline")
    p.add_argument("--mfu-steps", type=int, default=8)
    p.add_argument("--mfu-max-tokens", type=int, default=32768)
    p.add_argument("--mfu-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="checkpoint the 1.3B blocks (the real 512px/65-frame mix needs it on 80 GB)")
    p.add_argument("--peak-tflops", type=float, help="device peak dense bf16 TFLOP/s (default by name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- samples and batches


def latent_shape(frames: int, pixels: int) -> tuple[int, int, int, int]:
    """Wan VAE: 4x temporal (first frame alone), 8x spatial, 16 channels."""
    if (frames - 1) % 4 or pixels % 16:
        raise ValueError(f"clip {frames} frames x {pixels} px: need frames = 1+4k and px % 16 == 0")
    return (LATENT_CHANNELS, 1 + (frames - 1) // 4, pixels // 8, pixels // 8)


def sample_stream(frames, pixels, text_len, text_dim, seed):
    """Endless stream of samples drawn uniformly from the frames x pixels buckets.

    Each sample: latent x0 [C, T, H, W], noise eps, caption embedding [Lc, text_dim], flow time
    t (logit-normal, shifted by its token count), weight 1, key = its position in the stream.
    """
    buckets = [(f, p) for f in frames for p in pixels]
    g = torch.Generator().manual_seed(seed)
    key = 0
    while True:
        f, p = buckets[int(torch.randint(len(buckets), (1,), generator=g))]
        shape = latent_shape(f, p)
        tokens = math.prod(s // q for s, q in zip(shape[1:], PATCH))
        n_text = int(torch.randint(text_len[0], text_len[1] + 1, (1,), generator=g))
        t = sample_timesteps(1, shift=resolution_shift([tokens]), generator=g)
        yield dict(latent=torch.randn(shape, generator=g), eps=torch.randn(shape, generator=g),
                   context=torch.randn(n_text, text_dim, generator=g), t=float(t), key=key,
                   bucket=f"{f}x{p}x{p}")
        key += 1


def ours_batches(stream, max_tokens, count):
    """The first ``count`` sequences of PackingBuffer, the samples in them, and their efficiency."""
    batches = []
    for batch in PackingBuffer(stream, PATCH, max_tokens, buffer_size=64, min_efficiency=0.95):
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


@dataclasses.dataclass
class PaddedBatch:
    x0: torch.Tensor  # [B, C, T, H, W], zero-padded
    eps: torch.Tensor
    mask: torch.Tensor | None  # [B, 1, T, H, W] 1 on real latent elements; None = no padding
    context: torch.Tensor  # [B, Lc_max, text_dim], zero-padded
    t: torch.Tensor  # [B]
    real: list[tuple[int, int]]  # (image tokens, text tokens) per sample
    padded_tokens: int  # B * tokens of the padded shape

    def to(self, device):
        move = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return dataclasses.replace(self, **move)


def tokens_of(shape) -> int:
    return math.prod(s // q for s, q in zip(shape[-3:], PATCH))


def pad_batch(samples) -> PaddedBatch:
    """Zero-pad latents to the max (T, H, W) and captions to the longest, as a padding trainer does."""
    thw = [max(s["latent"].shape[i] for s in samples) for i in (1, 2, 3)]
    n_text = max(s["context"].shape[0] for s in samples)

    def pad(x, size):  # [C, T, H, W] -> [C, *size], zeros at the end of each axis
        return F.pad(x, (0, size[2] - x.shape[3], 0, size[1] - x.shape[2], 0, size[0] - x.shape[1]))

    ones = [torch.ones(1, *s["latent"].shape[1:]) for s in samples]
    padded = any(list(s["latent"].shape[1:]) != thw for s in samples)
    return PaddedBatch(
        x0=torch.stack([pad(s["latent"], thw) for s in samples]),
        eps=torch.stack([pad(s["eps"], thw) for s in samples]),
        mask=torch.stack([pad(o, thw) for o in ones]) if padded else None,
        context=torch.stack([F.pad(s["context"], (0, 0, 0, n_text - s["context"].shape[0]))
                             for s in samples]),
        t=torch.tensor([s["t"] for s in samples]),
        real=[(tokens_of(s["latent"].shape), s["context"].shape[0]) for s in samples],
        padded_tokens=len(samples) * tokens_of(thw),
    )


def padded_batches(samples, max_tokens) -> list[PaddedBatch]:
    """Consecutive samples, a batch growing while B * tokens(max shape) fits the budget."""
    batches, current = [], []
    for s in samples:
        trial = current + [s]
        thw = [max(x["latent"].shape[i] for x in trial) for i in (1, 2, 3)]
        if current and len(trial) * tokens_of(thw) > max_tokens:
            batches.append(pad_batch(current))
            trial = [s]
        current = trial
    batches.append(pad_batch(current))
    return batches


def same_shape_batches(samples, max_tokens) -> list[PaddedBatch]:
    """Samples grouped by bucket (stream order within a bucket), B = budget // tokens."""
    by_bucket: dict[str, list] = {}
    for s in samples:
        by_bucket.setdefault(s["bucket"], []).append(s)
    batches = []
    for group in by_bucket.values():
        per_batch = max(1, max_tokens // tokens_of(group[0]["latent"].shape))
        batches += [pad_batch(group[i : i + per_batch]) for i in range(0, len(group), per_batch)]
    return batches


# --------------------------------------------------------------------------- models and steps


def build_models(size, device, checkpointing, with_diffusers=True):
    """Ours with a random (non-zero) head, and diffusers with the same weights via convert_dit."""
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place (1.3B on the CPU takes a while)
        ours = WanDiT(**SIZES[size][0])
    torch.nn.init.normal_(ours.proj_out.weight, std=0.02)  # Wan's zero head would output 0
    ours.gradient_checkpointing = checkpointing
    theirs = None
    if with_diffusers:
        from diffusers import WanTransformer3DModel

        config = convert_dit.config_to_diffusers(ours.config)
        config.pop("_class_name")
        with torch.device(device):
            theirs = WanTransformer3DModel(**config)
        theirs.load_state_dict(convert_dit.state_dict_to_diffusers(ours.state_dict()), strict=True)
        if checkpointing:
            theirs.enable_gradient_checkpointing()
        theirs.train()
    return ours.train(), theirs


def ours_step(model, batch, amp):
    """batch: (PackedBatch, eps tokens [N, P], x0 list, eps list)."""
    packed, eps_tokens, x0, eps = batch
    model.zero_grad(set_to_none=True)
    xt = interpolate(packed.x, eps_tokens, packed.per_token(packed.t))
    with amp():
        preds = model.forward_packed(dataclasses.replace(packed, x=xt))
    flow_loss(preds, x0, eps, packed.weight).backward()


def diffusers_step(model, b: PaddedBatch, amp):
    """Padded batch through diffusers; per-sample loss over real elements only, then the mean."""
    model.zero_grad(set_to_none=True)
    xt = interpolate(b.x0, b.eps, b.t)
    with amp():
        pred = model(xt, 1000 * b.t, b.context, return_dict=False)[0]
    err = (pred.float() - (b.eps - b.x0)) ** 2
    if b.mask is None:
        per_sample = err.flatten(1).mean(1)
    else:
        per_sample = (err * b.mask).flatten(1).sum(1) / (b.mask.flatten(1).sum(1) * err.shape[1])
    per_sample.mean().backward()


def prepare_ours(packed_batches, device):
    out = []
    for p in packed_batches:
        eps = [s["eps"] for s in p.meta]  # meta keeps the non-model keys of each sample
        x0 = p.unpack(p.x)
        eps_tokens = torch.cat([patchify(e, PATCH) for e in eps])
        out.append((p.to(device), eps_tokens.to(device), [x.to(device) for x in x0],
                    [e.to(device) for e in eps]))
    return out


# --------------------------------------------------------------------------- FLOPs


def step_flops(cfg: dict, samples: list[tuple[int, int]], recompute: bool = False) -> float:
    """Model FLOPs of one training step on (image tokens, text tokens) samples; see the docstring."""
    d, f, layers = cfg["dim"], cfg["ffn_dim"], cfg["num_layers"]
    patch = math.prod(cfg["patch_size"])
    p_img = layers * (6 * d * d + 2 * d * f) + patch * (cfg["in_channels"] + cfg["out_channels"]) * d
    p_txt = cfg["text_dim"] * d + d * d + layers * 2 * d * d
    n_img, n_txt = sum(s[0] for s in samples), sum(s[1] for s in samples)
    attn_fwd = layers * sum(4 * n * n * d + 4 * n * nc * d for n, nc in samples)
    blocks_fwd = 2 * n_img * layers * (6 * d * d + 2 * d * f) + attn_fwd
    return 6 * (n_img * p_img + n_txt * p_txt) + 3 * attn_fwd + (blocks_fwd if recompute else 0)


# --------------------------------------------------------------------------- timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, model, batches, amp, device) -> float:
    sync(device)
    start = time.perf_counter()
    for b in batches:
        step(model, b, amp)
    sync(device)
    return time.perf_counter() - start


def peak_memory(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def sample_lengths(samples) -> list[tuple[int, int]]:
    """(image tokens, text tokens) of each sample dict."""
    return [(tokens_of(s["latent"].shape), s["context"].shape[0]) for s in samples]


def parity(ours, theirs, sample, device) -> float:
    """max |ours - diffusers| on one sample (fp32, no grad): the weights really are the same."""
    x, ctx = sample["latent"][None].to(device), sample["context"][None].to(device)
    t = torch.tensor([sample["t"]], device=device)
    with torch.no_grad():
        a = ours(x, t, ctx)
        b = theirs(x, 1000 * t, ctx, return_dict=False)[0]
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


def bench_training(args, device, amp) -> dict:
    widths, default_pixels, default_budget = SIZES[args.size]
    pixels = args.pixels or default_pixels
    budget = args.max_tokens or default_budget
    ours, theirs = build_models(args.size, device, args.checkpointing)
    seen = {}

    def recorded(stream):
        for s in stream:
            seen[s["key"]] = s
            yield s

    # warm-up sequence first, then the timed ones; every model warms up on its own first batch
    stream = recorded(sample_stream(args.frames, pixels, args.text_len, widths["text_dim"], args.seed))
    packed = ours_batches(stream, budget, args.steps)
    samples = sorted((seen[m["key"]] for p in packed for m in p.meta), key=lambda s: s["key"])
    rel_err = parity(ours, theirs, min(samples, key=lambda s: s["latent"].numel()), device)

    runs = {"ours, packed": (ours_step, ours, prepare_ours(packed, device))}
    runs["diffusers, padded"] = (
        diffusers_step, theirs, [b.to(device) for b in padded_batches(samples, budget)])
    if not args.no_same_shape:
        runs["diffusers, same-shape"] = (
            diffusers_step, theirs, [b.to(device) for b in same_shape_batches(samples, budget)])

    for step, model, batches in runs.values():  # warm-up: allocator, kernels, thread pools
        step(model, batches[0], amp)
    times = {name: [] for name in runs}
    memory = {}
    for _ in range(args.repeats):
        for name, (step, model, batches) in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[name].append(time_steps(step, model, batches, amp, device))
            memory[name] = peak_memory(device)

    real = sample_lengths(samples)
    real_tokens = sum(n for n, _ in real)
    useful = step_flops(ours.config, real, recompute=False)
    rows = []
    for name, (_, _, batches) in runs.items():
        if name.startswith("ours"):
            computed = sum(b[0].num_tokens for b in batches)
            executed = useful
        else:
            computed = sum(b.padded_tokens for b in batches)
            executed = sum(
                step_flops(ours.config, [(b.padded_tokens // len(b.real), b.context.shape[1])] * len(b.real))
                for b in batches)
        seconds = statistics.median(times[name])
        rows.append(dict(
            run=name, steps=len(batches), samples=len(samples), real_tokens=real_tokens,
            computed_tokens=computed, token_efficiency=real_tokens / computed,
            budget_fill=computed / (len(batches) * budget), flop_efficiency=useful / executed,
            seconds=seconds, tokens_per_s=real_tokens / seconds,
            useful_gflops_per_s=useful / seconds / 1e9, peak_mem_gib=memory[name],
            seconds_all=times[name]))
    for row in rows:
        row["ours_speedup"] = rows[0]["tokens_per_s"] / row["tokens_per_s"]
    return dict(
        size=args.size, widths=widths, params_m=sum(p.numel() for p in ours.parameters()) / 1e6,
        frames=args.frames, pixels=list(pixels), max_tokens=budget, text_len=args.text_len,
        buckets=sorted({s["bucket"] for s in samples}, key=lambda b: [int(v) for v in b.split("x")]),
        packing_efficiency=packing_efficiency(packed), parity_rel_err=rel_err, rows=rows)


def bench_mfu(args, device) -> dict:
    """Our packed step, 1.3B shape, bf16 autocast: model FLOPs / time / peak."""
    widths, pixels, _ = SIZES["1.3B"]
    name = torch.cuda.get_device_name(device)
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)
    ours, _ = build_models("1.3B", device, args.mfu_checkpointing, with_diffusers=False)
    stream = sample_stream(args.frames, pixels, args.text_len, widths["text_dim"], args.seed)
    packed = ours_batches(stream, args.mfu_max_tokens, args.mfu_steps + 1)
    batches = prepare_ours(packed, device)
    amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    ours_step(ours, batches[0], amp)
    torch.cuda.reset_peak_memory_stats()
    seconds = time_steps(ours_step, ours, batches[1:], amp, device)
    lengths = [[(math.prod(g), int(n)) for g, n in zip(p.grids, p.cu_seqlens_ctx.diff().tolist())]
               for p in packed[1:]]
    flops = sum(step_flops(ours.config, s) for s in lengths)
    hw_flops = sum(step_flops(ours.config, s, recompute=args.mfu_checkpointing) for s in lengths)
    tflops = flops / seconds / 1e12
    return dict(
        device_name=name, peak_tflops=peak, max_tokens=args.mfu_max_tokens,
        checkpointing=args.mfu_checkpointing, steps=len(batches) - 1, seconds=seconds,
        tokens_per_s=sum(p.num_tokens for p in packed[1:]) / seconds,
        packing_efficiency=packing_efficiency(packed[1:]), model_tflops_per_s=tflops,
        mfu=tflops / peak if peak else None,
        hfu=hw_flops / seconds / 1e12 / peak if peak else None, peak_mem_gib=peak_memory(device))


# --------------------------------------------------------------------------- report


def print_training(r, device, dtype):
    w = r["widths"]
    print(f"\n== training step: {r['size']} (dim {w['dim']}, {w['num_layers']} layers, "
          f"{r['params_m']:.1f}M params), {device} {dtype}, budget {r['max_tokens']} tokens")
    print(f"   mix: frames {r['frames']} x pixels {r['pixels']} -> buckets {', '.join(r['buckets'])}; "
          f"captions {r['text_len'][0]}-{r['text_len'][1]} tokens")
    print(f"   same weights: max |ours - diffusers| / max |diffusers| = {r['parity_rel_err']:.1e}")
    head = (f"   {'run':<22} {'steps':>5} {'samples':>7} {'real tok':>9} {'computed':>9} "
            f"{'tok eff':>7} {'fill':>5} {'time s':>7} {'real tok/s':>10} {'GFLOP/s':>8} {'ours x':>7}")
    mem = any(row["peak_mem_gib"] is not None for row in r["rows"])
    print(head + ("  peak GiB" if mem else ""))
    for row in r["rows"]:
        line = (f"   {row['run']:<22} {row['steps']:>5} {row['samples']:>7} {row['real_tokens']:>9} "
                f"{row['computed_tokens']:>9} {row['token_efficiency']:>7.3f} {row['budget_fill']:>5.2f} "
                f"{row['seconds']:>7.2f} {row['tokens_per_s']:>10.0f} {row['useful_gflops_per_s']:>8.1f} "
                f"{row['ours_speedup']:>6.2f}x")
        print(line + (f"  {row['peak_mem_gib']:8.2f}" if mem else ""))
    print("   tok eff: real tokens / tokens computed; fill: tokens computed / (steps x budget); "
          "GFLOP/s: useful (real-token) model FLOPs; ours x: our real tok/s over the row's")
    rows = r["rows"]
    print(f"   packing efficiency of ours (real tokens / budget): {r['packing_efficiency']:.3f} "
          f"(target >= 0.95)")
    print(f"   padding efficiency of diffusers, padded (real / computed tokens): "
          f"{rows[1]['token_efficiency']:.3f} (attention+matmul FLOPs: {rows[1]['flop_efficiency']:.3f})")
    for row in rows[1:]:
        print(f"   ratio ours / {row['run']}: {row['ours_speedup']:.2f}x real tokens/s (target >= 1.0x)")


def print_mfu(m):
    print(f"\n== MFU: 1.3B shape, bf16 autocast, {m['device_name']}, budget {m['max_tokens']} tokens, "
          f"checkpointing {'on' if m['checkpointing'] else 'off'}")
    print("   model FLOPs = 6 (N_img P_img + N_txt P_txt) + 3 layers sum_i (4 L_i^2 d + 4 L_i Lc_i d)")
    print(f"   {m['steps']} steps in {m['seconds']:.2f} s: {m['tokens_per_s']:.0f} tokens/s, "
          f"packing efficiency {m['packing_efficiency']:.3f}, {m['model_tflops_per_s']:.1f} TFLOP/s"
          + (f", peak memory {m['peak_mem_gib']:.1f} GiB" if m["peak_mem_gib"] else ""))
    if m["mfu"] is None:
        print("   MFU: unknown peak for this device; pass --peak-tflops")
    else:
        print(f"   MFU {100 * m['mfu']:.1f}% of {m['peak_tflops']:.0f} TFLOP/s (target >= 40%); "
              f"HFU (recompute counted) {100 * m['hfu']:.1f}%")


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if dtype == torch.float32:
        amp = contextlib.nullcontext
    else:
        amp = lambda: torch.autocast(device.type, dtype=dtype)  # noqa: E731
    import diffusers

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"{platform.processor() or platform.machine()}, threads {torch.get_num_threads()}")
    result = dict(
        date=datetime.date.today().isoformat(), device=str(device), dtype=args.dtype,
        torch=torch.__version__, diffusers=diffusers.__version__, threads=torch.get_num_threads())
    result["training"] = bench_training(args, device, amp)
    print_training(result["training"], device, args.dtype)
    if device.type == "cuda":
        del amp
        torch.cuda.empty_cache()
        result["mfu"] = bench_mfu(args, device)
        print_mfu(result["mfu"])
    else:
        result["mfu"] = None
        print("\n== MFU: skipped (CUDA only: needs a GPU and its peak bf16 TFLOP/s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
