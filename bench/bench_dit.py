"""Benchmark our packed WanDiT training step against diffusers' WanTransformer3DModel.

    .venv/bin/python bench/bench_dit.py                         # CPU defaults, ~1-2 min on 2 cores
    .venv/bin/python bench/bench_dit.py --clock wall --threads 2  # wall clock, on an idle machine
    .venv/bin/python bench/bench_dit.py --size tiny --steps 3   # smoke run
    .venv/bin/python bench/bench_dit.py --device cuda --size 1.3B --checkpointing \
        --json dit.json                                         # the real mix on one GPU, bf16

1. Training step (x_t, forward, flow loss, backward; no optimizer step), same widths and same
   weights (ours converted to diffusers with vidgen.tools.convert_dit), on the same contiguous
   stretch of a stream of mixed-shape latent samples (about --steps budgets of tokens):
   - ours, packed: PackingBuffer (first-fit decreasing) to --max-tokens, one forward_packed
     per sequence; the stretch ends with a partly full sequence, as any finite stream does;
   - diffusers, padded: consecutive samples batched while B * (padded tokens) fits the same
     budget (or --baseline-batch B), latents zero-padded to the batch's max (T, H, W) and
     captions to its longest (diffusers takes no mask for either), the loss masked to the
     real region: what a trainer without packing does with a mixed stream;
   - diffusers, same-shape: the same samples grouped by shape, latents not padded (a bucketed
     trainer; captions still padded); it separates per-token speed from the cost of padding.
   Figures: real (unpadded) tokens per second and ours / diffusers; the packing efficiency of
   ours (real tokens / budget) and the padding efficiency of the padded baseline (real /
   computed tokens), both in steady state over a 2000-sample stream (from shapes alone) and
   on the timed stretch. Steps of the three runs are interleaved over time and each step's
   time is its median over --repeats rounds, so load from other processes hits all runs alike.
   On a CPU the clock is by default this process's CPU seconds on one thread (--clock,
   --threads): on a shared machine wall time mostly measures the other tenants.
2. CUDA only: MFU of our packed step for the 1.3B shape in bf16 autocast, on the 256-512 px
   mix packed to --mfu-max-tokens (formula below).

The mix: clip lengths --frames (default 17 33 65) x square sizes --pixels, drawn uniformly; a
clip of F frames and P px is a latent of 1 + (F-1)/4 frames and P/8 px (Wan VAE), i.e.
(1 + (F-1)/4) * (P/16)^2 tokens at patch (1, 2, 2), 256 to 17408 at 256-512 px. The CPU
sizes use 64/96/128 px and a 2048-token budget, the 1.3B size 256/384/512 px and 32768:
every token count is 16x larger and the shapes are drawn in the same order, so the packing
problem, and its efficiency, are the same at both scales.

Model FLOPs per step (the MFU numerator; biases, norms and the time MLP left out; checked
against torch.utils.flop_counter within 0.3%):
    6 * (N_img * P_img + N_txt * P_txt)  +  3 * layers * sum_i (4 L_i^2 d + 4 L_i Lc_i d)
P_img: weights applied to each image token (per block: self-attn q,k,v,o 4d^2, cross-attn
q,o 2d^2, FFN 2 d ffn; plus patch embedding and output head); P_txt: weights applied to each
text token (text embedding; per block cross-attn k,v 2d^2); L_i, Lc_i: image and text tokens
of sample i (attention is per sample); 3 = forward + backward (2x forward). Useful FLOPs count
real tokens only, so padding earns the baseline nothing. With activation checkpointing the
blocks' forward runs twice: that is in the HFU figure, not in the MFU one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import sync  # noqa: E402

from vidgen.diffusion.flow import (  # noqa: E402
    flow_loss,
    interpolate,
    resolution_shift,
    sample_timesteps,
)
from vidgen.models.dit import PackingBuffer, WanDiT, packing_efficiency, patchify  # noqa: E402
from vidgen.tools import convert_dit  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# wall: elapsed time; cpu: CPU seconds of this process (all its threads), which other processes
# on a shared machine do not inflate; on one thread it is the work done (no idle or spin time).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
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
    p.add_argument("--steps", type=int, default=8, help="samples filling about this many budgets are "
                   "timed (ours: about as many packed steps; the baselines: as many as they need)")
    p.add_argument("--max-tokens", type=int, help="token budget per step (default per size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="bfloat16 = fp32 weights under bf16 autocast (bf16-mixed, the default on "
                   "CUDA, where it also selects varlen flash attention); float32 (default on CPU)")
    p.add_argument("--frames", type=int, nargs="+", default=[17, 33, 65], help="clip lengths (1+4k)")
    p.add_argument("--pixels", type=int, nargs="+", help="square frame sizes, multiples of 16")
    p.add_argument("--text-len", type=int, nargs=2, default=[32, 96], metavar=("MIN", "MAX"),
                   help="caption lengths in text tokens, uniform")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed rounds; each step's time is its median over the rounds")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (both models)")
    p.add_argument("--baseline-batch", type=int, default=0, metavar="B",
                   help="fixed batch size for the padded baseline (default 0: fill the budget)")
    p.add_argument("--clock", choices=list(CLOCKS),
                   help="wall seconds, or this process's CPU seconds (default: cpu on a CPU "
                   "device, where other tenants of a shared machine would inflate wall time)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: 1 with --clock cpu, else torch's choice)")
    p.add_argument("--no-same-shape", action="store_true", help="skip the same-shape diffusers baseline")
    p.add_argument("--mfu-steps", type=int, default=8)
    p.add_argument("--mfu-max-tokens", type=int, default=32768)
    p.add_argument("--mfu-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="checkpoint the 1.3B blocks (default on: by estimate, ~5 MB of activations a "
                   "token, a 32k-token step does not fit 80 GB without it)")
    p.add_argument("--peak-tflops", type=float, help="device peak dense bf16 TFLOP/s (default by name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-share", type=float, default=0.3,
                   help="share of images (1 latent frame) in the image + clip mixture's efficiency row")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- samples and batches


def latent_shape(frames: int, pixels: int) -> tuple[int, int, int, int]:
    """Wan VAE: 4x temporal (first frame alone), 8x spatial, 16 channels."""
    if (frames - 1) % 4 or pixels % 16:
        raise ValueError(f"clip {frames} frames x {pixels} px: need frames = 1+4k and px % 16 == 0")
    return (LATENT_CHANNELS, 1 + (frames - 1) // 4, pixels // 8, pixels // 8)


def tokens_of(shape) -> int:
    """Patch tokens of a latent [..., T, H, W]."""
    return math.prod(s // q for s, q in zip(shape[-3:], PATCH))


def sample_specs(frames, pixels, text_len, seed, image_share=0.0):
    """Endless stream of sample shapes drawn uniformly from the frames x pixels buckets
    (with ``image_share`` > 0: that share of images, 1 frame at a drawn size, instead).

    Each spec: key (position in the stream), bucket, latent shape [C, T, H, W], caption length,
    flow time t (logit-normal, shifted by the token count). Drawn from their own generator, so
    the sequence of buckets is the same whatever the tensor sizes (CPU and 1.3B mixes alike).
    """
    buckets = [(f, p) for f in frames for p in pixels]
    g = torch.Generator().manual_seed(seed)
    for key in itertools.count():
        f, p = buckets[int(torch.randint(len(buckets), (1,), generator=g))]
        if image_share > 0 and float(torch.rand((), generator=g)) < image_share:
            f = 1  # an image: one latent frame, its own timestep and token-count shift
        shape = latent_shape(f, p)
        n_text = int(torch.randint(text_len[0], text_len[1] + 1, (1,), generator=g))
        t = sample_timesteps(1, shift=resolution_shift([tokens_of(shape)]), generator=g)
        yield dict(key=key, bucket=f"{f}x{p}x{p}", shape=shape, text=n_text, t=float(t))


def make_sample(spec, text_dim, seed) -> dict:
    """A spec's tensors: latent x0, noise eps [C, T, H, W] and caption embedding [Lc, text_dim]."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + spec["key"])
    return dict(latent=torch.randn(spec["shape"], generator=g),
                eps=torch.randn(spec["shape"], generator=g),
                context=torch.randn(spec["text"], text_dim, generator=g),
                t=spec["t"], key=spec["key"], bucket=spec["bucket"])


def sample_source(args, pixels, text_dim, seen: dict):
    """The stream of samples with their tensors; each is also recorded in ``seen`` by key."""
    for spec in sample_specs(args.frames, pixels, args.text_len, args.seed):
        seen[spec["key"]] = sample = make_sample(spec, text_dim, args.seed)
        yield sample


def ours_batches(stream, max_tokens, count=None):
    """The first ``count`` sequences (all if None) of PackingBuffer: FFD, 64-sample buffer, >= 95% full."""
    buffer = PackingBuffer(stream, PATCH, max_tokens, buffer_size=64, min_efficiency=0.95)
    return list(itertools.islice(buffer, count))


def group_padded(shapes, max_tokens, batch_size=0) -> list[list[int]]:
    """Consecutive samples, a batch growing while B * tokens(max shape) fits the budget.

    batch_size > 0: fixed batches of that many consecutive samples instead (the padded
    tokens may then exceed the budget, as in a trainer with a fixed batch size).
    """
    if batch_size:
        return [list(range(i, min(i + batch_size, len(shapes)))) for i in range(0, len(shapes), batch_size)]
    groups, current = [], []
    for i in range(len(shapes)):
        if current and padded_tokens([shapes[j] for j in current + [i]]) > max_tokens:
            groups.append(current)
            current = []
        current.append(i)
    return groups + [current]


def group_same_shape(shapes, max_tokens) -> list[list[int]]:
    """Samples grouped by shape (stream order within a shape), B = budget // tokens."""
    by_shape: dict[tuple, list[int]] = {}
    for i, shape in enumerate(shapes):
        by_shape.setdefault(tuple(shape), []).append(i)
    groups = []
    for shape, members in by_shape.items():
        per_batch = max(1, max_tokens // tokens_of(shape))
        groups += [members[i : i + per_batch] for i in range(0, len(members), per_batch)]
    return groups


def padded_tokens(shapes) -> int:
    """Tokens computed for a batch of ``shapes`` padded to their max (T, H, W)."""
    return len(shapes) * tokens_of([max(s[i] for s in shapes) for i in (-3, -2, -1)])


def stream_efficiencies(args, pixels, budget, n=2000, image_share=0.0) -> dict:
    """Packing / padding efficiency over a long stream, from shapes alone (cheap empty tensors)."""
    specs = list(itertools.islice(sample_specs(args.frames, pixels, args.text_len, args.seed, image_share), n))
    shapes = [s["shape"] for s in specs]
    light = (dict(latent=torch.empty(1, *s["shape"][1:]), context=torch.empty(1, 1)) for s in specs)
    buffer = PackingBuffer(light, PATCH, budget, buffer_size=64, min_efficiency=0.95, drop_last=True)
    packed_tokens, sequences = 0, 0  # steady state (drop_last: no under-full tail)
    for batch in buffer:
        packed_tokens, sequences = packed_tokens + batch.num_tokens, sequences + 1
    real = sum(tokens_of(s) for s in shapes)
    padded = sum(padded_tokens([shapes[i] for i in g])
                 for g in group_padded(shapes, budget, args.baseline_batch))
    return dict(samples=n, packing_efficiency=packed_tokens / (sequences * budget),
                padding_efficiency=real / padded, image_share=image_share)


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
        padded_tokens=padded_tokens([s["latent"].shape for s in samples]),
    )


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
    """Per PackedBatch: (batch, eps as tokens, x0 list, eps list) on ``device``, for ours_step."""
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


def time_interleaved(runs: dict, amp, device, repeats: int, clock=time.perf_counter) -> dict[str, list[list[float]]]:
    """Seconds of every step of every run, ``repeats`` rounds: {name: [[step seconds] per round]}.

    The steps of all runs are interleaved in proportion to their counts (each run advances
    through its batches at the same pace over wall time), so that load from other
    processes on a shared machine falls on all runs alike rather than on whichever ran last.
    """
    schedule = sorted(
        ((i + 0.5) / len(batches), name, i) for name, (_, _, batches) in runs.items()
        for i in range(len(batches)))
    times = {name: [[0.0] * len(batches) for _ in range(repeats)] for name, (_, _, batches) in runs.items()}
    for r in range(repeats):
        for _, name, i in schedule:
            step, model, batches = runs[name]
            sync(device)
            start = clock()
            step(model, batches[i], amp)
            sync(device)
            times[name][r][i] = clock() - start
    return times


def robust_seconds(rounds: list[list[float]]) -> float:
    """Sum over steps of each step's median over rounds (one slow step in one round is ignored)."""
    return sum(statistics.median(step) for step in zip(*rounds))


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
    # A contiguous stretch of the stream, about --steps budgets of tokens, for every run: ours
    # packs it (PackingBuffer flushes the partly full last sequence), the baselines batch it.
    samples, total = [], 0
    for spec in sample_specs(args.frames, pixels, args.text_len, args.seed):
        total += tokens_of(spec["shape"])
        if samples and total > 0.98 * args.steps * budget:
            break
        samples.append(make_sample(spec, widths["text_dim"], args.seed))
    packed = ours_batches(iter(samples), budget)
    shapes = [s["latent"].shape for s in samples]
    rel_err = parity(ours, theirs, min(samples, key=lambda s: s["latent"].numel()), device)

    def batches(groups):
        return [pad_batch([samples[i] for i in g]).to(device) for g in groups]

    padded_name = f"diffusers, padded B={args.baseline_batch}" if args.baseline_batch else "diffusers, padded"
    runs = {
        "ours, packed": (ours_step, ours, prepare_ours(packed, device)),
        padded_name: (diffusers_step, theirs, batches(group_padded(shapes, budget, args.baseline_batch))),
    }
    if not args.no_same_shape:
        runs["diffusers, same-shape"] = (diffusers_step, theirs, batches(group_same_shape(shapes, budget)))

    for step, model, batches in runs.values():  # warm-up: allocator, kernels, thread pools
        step(model, batches[0], amp)
    memory = {}
    if device.type == "cuda":  # peak memory per run, in an untimed pass of its own
        for name, (step, model, batches) in runs.items():
            torch.cuda.reset_peak_memory_stats()
            for batch in batches:
                step(model, batch, amp)
            memory[name] = peak_memory(device)
    times = time_interleaved(runs, amp, device, args.repeats, CLOCKS[args.clock])

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
        seconds = robust_seconds(times[name])
        rows.append(dict(
            run=name, steps=len(batches), samples=len(samples), real_tokens=real_tokens,
            computed_tokens=computed, token_efficiency=real_tokens / computed,
            budget_fill=computed / (len(batches) * budget), flop_efficiency=useful / executed,
            seconds=seconds, tokens_per_s=real_tokens / seconds,
            useful_gflops_per_s=useful / seconds / 1e9, peak_mem_gib=memory.get(name),
            seconds_all=times[name]))
    for row in rows:
        row["ours_speedup"] = rows[0]["tokens_per_s"] / row["tokens_per_s"]
    return dict(
        size=args.size, widths=widths, params_m=sum(p.numel() for p in ours.parameters()) / 1e6,
        frames=args.frames, pixels=list(pixels), max_tokens=budget, text_len=args.text_len,
        buckets=sorted({s["bucket"] for s in samples}, key=lambda b: [int(v) for v in b.split("x")]),
        packing_efficiency=packing_efficiency(packed), parity_rel_err=rel_err, clock=args.clock,
        stream=stream_efficiencies(args, pixels, budget),
        mixture=stream_efficiencies(args, pixels, budget, image_share=args.image_share), rows=rows)


def bench_mfu(args, device) -> dict:
    """Our packed step, 1.3B shape, bf16 autocast: model FLOPs / time / peak."""
    widths, pixels, _ = SIZES["1.3B"]
    name = torch.cuda.get_device_name(device)
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)
    ours, _ = build_models("1.3B", device, args.mfu_checkpointing, with_diffusers=False)
    source = sample_source(args, pixels, widths["text_dim"], {})
    packed = ours_batches(source, args.mfu_max_tokens, args.mfu_steps + 1)
    batches = prepare_ours(packed, device)
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    ours_step(ours, batches[0], amp)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    times = time_interleaved({"ours": (ours_step, ours, batches[1:])}, amp, device, 1)
    seconds = robust_seconds(times["ours"])
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
            f"{'tok eff':>7} {'fill':>5} {r['clock'] + ' s':>7} {'real tok/s':>10} {'GFLOP/s':>8} {'ours x':>7}")
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
    st = r["stream"]
    print(f"   packing efficiency of ours (real tokens / budget): {st['packing_efficiency']:.3f} in steady "
          f"state over a {st['samples']}-sample stream (target >= 0.95); {r['packing_efficiency']:.3f} "
          f"on the timed window ({rows[0]['steps']} sequences, the last one partly full)")
    print(f"   padding efficiency of {rows[1]['run']} (real / computed tokens): "
          f"{st['padding_efficiency']:.3f} over the stream; {rows[1]['token_efficiency']:.3f} on the "
          f"timed window (in model FLOPs: {rows[1]['flop_efficiency']:.3f})")
    mx = r["mixture"]
    print(f"   {mx['image_share']:.0%} images / {1 - mx['image_share']:.0%} clips (data.train.sources): packing "
          f"efficiency {mx['packing_efficiency']:.3f} over a {mx['samples']}-sample stream; padding "
          f"efficiency of the padded baseline {mx['padding_efficiency']:.3f}")
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
        print(f"   MFU {100 * m['mfu']:.1f}% of {m['peak_tflops']:g} TFLOP/s (target >= 40%); "
              f"HFU (recompute counted) {100 * m['hfu']:.1f}%")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = DTYPES[args.dtype]
    args.clock = args.clock or ("cpu" if device.type == "cpu" else "wall")
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu measures CPU work; on a GPU use --clock wall (the default)")
    if args.threads or args.clock == "cpu":
        torch.set_num_threads(args.threads or 1)
    if dtype == torch.float32:
        amp = contextlib.nullcontext
    else:
        amp = lambda: torch.autocast(device.type, dtype=dtype)  # noqa: E731
    import diffusers

    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {os.cpu_count()} CPUs, "
          f"threads {torch.get_num_threads()}, load average {load:.1f}")
    result = dict(
        date=datetime.date.today().isoformat(), device=str(device), dtype=args.dtype,
        torch=torch.__version__, diffusers=diffusers.__version__, cpus=os.cpu_count(),
        threads=torch.get_num_threads(), args=vars(args), load_before=load)
    result["training"] = bench_training(args, device, amp)
    result["load_after"] = os.getloadavg()[0]
    print_training(result["training"], device, args.dtype)
    if device.type == "cpu" and max(load, result["load_after"]) > os.cpu_count():
        effect = ("CPU-time figures are not inflated by them (shared caches still are)"
                  if args.clock == "cpu" else "wall-clock figures are low and noisy; the default "
                  "--clock cpu is steadier")
        print(f"   note: load average {load:.1f} -> {result['load_after']:.1f} on {os.cpu_count()} "
              f"CPUs: other processes share the cores; {effect}")
    if device.type == "cuda":
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
