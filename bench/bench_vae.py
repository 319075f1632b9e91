"""Benchmark our WanVAE against diffusers' AutoencoderKLWan, and chunked-encode memory vs length.

    .venv/bin/python bench/bench_vae.py                        # CPU defaults, ~2 min on 2 cores
    .venv/bin/python bench/bench_vae.py --device cuda --base-dim 96 --size 256 --frames 17 \
        --infer-size 256 --lengths 17 33 65 129

1. Training step (encode, sample the posterior, decode, L1 + KL loss, backward), same widths,
   same weights, same input: time (best and median of --repeats, both models timed in this
   process, interleaved) and peak memory, printed as ours / diffusers ratios. diffusers always
   runs its chunked cache path (its only encode/decode); ours trains on the whole-clip path.
2. Inference: peak memory of a chunked encode for clips of --lengths frames, and the growth
   factor longest / shortest (1.0 = flat). The whole-clip path is printed for contrast.

CPU timing uses this process's CPU seconds on one thread by default (--threads): on a shared
machine, wall clock and multi-threaded runs mostly measure the other tenants.

CPU caveat: PyTorch runs a CPU fp32 conv3d with oneDNN only when batch > 1 or N*C*T*H > 20480,
otherwise with a much slower im2col kernel. At batch 1 and small sizes the two models (whole
clip vs 1-4 frame chunks) can land on different kernels, and that, not the model, decides the
time ratio. The default batch of 2 puts both on oneDNN.

Memory is measured per case in a fresh subprocess, so cases cannot hide in each other's
freed-but-cached memory. CUDA: torch.cuda.max_memory_allocated() minus the allocation before
the step. CPU: peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the
step, with glibc told to mmap every allocation >= 64 KiB so freed tensors leave the RSS at
once; it counts everything the step allocates (activations, gradients, workspaces).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import mib, peak_bytes, sync  # noqa: E402

from vidgen.losses.recon import vae_loss  # noqa: E402
from vidgen.models.vae import WanVAE  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--base-dim", type=int, default=32)
    p.add_argument("--z-dim", type=int, default=16)
    p.add_argument("--num-res-blocks", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=9, help="training clip length (1+4k)")
    p.add_argument("--size", type=int, default=32, help="training frame height = width")
    p.add_argument("--repeats", type=int, default=3, help="timed training steps per model")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default). One thread keeps CPU timings comparable "
        "on a shared machine, where idle-spinning OpenMP workers swamp multi-threaded ones",
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[17, 33, 65])
    p.add_argument("--infer-size", type=int, default=32, help="inference frame height = width")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: one memory case in a subprocess
    return p.parse_args(argv)


# --------------------------------------------------------------------------- models and steps


def build_models(args, device, dtype, with_diffusers=True):
    torch.manual_seed(0)
    ours = WanVAE(base_dim=args.base_dim, z_dim=args.z_dim, num_res_blocks=args.num_res_blocks)
    ours = ours.to(device=device, dtype=dtype).train()
    # (diffusers warns on any dtype cast, even a no-op one: cast only when asked to)
    cast = {"dtype": dtype} if dtype != torch.float32 else {}
    theirs = None
    if with_diffusers:
        from diffusers import AutoencoderKLWan

        theirs = AutoencoderKLWan(
            base_dim=args.base_dim, z_dim=args.z_dim, num_res_blocks=args.num_res_blocks
        )
        # identical weights: our parameter names are diffusers' (latent stats aside)
        state = {k: v for k, v in ours.state_dict().items() if not k.startswith("latents_")}
        theirs.load_state_dict(state, strict=True)
        theirs = theirs.to(device=device, **cast).train()
    return ours, theirs


def make_clip(args, frames, size, device, dtype):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(args.batch, 3, frames, size, size, generator=g) * 2 - 1).to(device, dtype)


def train_step(model, x, kind):
    """One step: encode, sample, decode, L1 + KL, backward. kind: 'ours' | 'ours-ckpt' | 'diffusers'."""
    model.zero_grad(set_to_none=True)
    if kind == "diffusers":
        posterior = model.encode(x).latent_dist
        recon = model.decode(posterior.sample()).sample
        mu, logvar = posterior.mean, posterior.logvar
    else:
        recon, mu, logvar = model(x)
    loss, _ = vae_loss(x, recon, mu, logvar, l1_weight=1.0, kl_weight=1e-6, lpips_weight=0.0)
    loss.backward()


# --------------------------------------------------------------------------- memory (child side)


def run_case(args) -> dict:
    """Executed in a fresh subprocess: one memory measurement, printed as JSON."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    what, _, detail = args.case.partition(":")
    if what == "train":
        ours, theirs = build_models(args, device, dtype, with_diffusers=detail == "diffusers")
        model = theirs if detail == "diffusers" else ours
        if detail == "ours-ckpt":
            model.enable_gradient_checkpointing()
        x = make_clip(args, args.frames, args.size, device, dtype)
        # warm-up: first calls page in kernel libraries and build conv primitives, which is
        # process start-up cost, not the step's memory
        train_step(model, x, detail)
        model.zero_grad(set_to_none=True)
        return {"peak": peak_bytes(lambda: train_step(model, x, detail), device)}
    path, frames = detail.split("@")
    ours, _ = build_models(args, device, dtype, with_diffusers=False)
    ours.eval()
    x = make_clip(args, int(frames), args.infer_size, device, dtype)

    def encode(clip):
        with torch.no_grad():
            ours.encode(clip, chunked=path == "chunked")

    encode(x[:, :, :5])  # warm-up, as above, on a short clip of the same frame size
    return {"peak": peak_bytes(lambda: encode(x), device)}


def measure_in_subprocess(args, case: str) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    argv = [sys.executable, __file__, *sys.argv[1:], "--case", case]
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory case {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


# --------------------------------------------------------------------------- report (parent side)


def bench_training(args, device, dtype):
    ours, theirs = build_models(args, device, dtype)
    x = make_clip(args, args.frames, args.size, device, dtype)
    with torch.no_grad():  # same weights must give the same latents
        mu = ours.encode(x)[0]
        diff = (mu - theirs.encode(x).latent_dist.mean).abs().max().item()
    print(
        f"\n== training step: batch {args.batch}, {args.frames}x{args.size}x{args.size}, "
        f"base_dim {args.base_dim}, {args.device} {args.dtype}  (max |mu ours - diffusers| = {diff:.2e})"
    )
    kinds = {"ours": ours, "diffusers": theirs}
    # CUDA: wall clock. CPU: this process's CPU seconds, which other tenants of a shared
    # machine inflate far less than wall clock (they still share its caches)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = {k: [] for k in kinds}
    for model_kind, model in kinds.items():  # warm-up (allocator, kernels)
        train_step(model, x, model_kind)
    for _ in range(args.repeats):
        for model_kind, model in kinds.items():
            sync(device)
            start = clock()
            train_step(model, x, model_kind)
            sync(device)
            times[model_kind].append(clock() - start)
    # best of N: interference only ever adds time, so the minimum is the least noisy
    # estimate of a step's cost; the median is printed too
    t = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: measure_in_subprocess(args, f"train:{k}") for k in ("ours", "ours-ckpt", "diffusers")}
    unit = "s" if device.type == "cuda" else "CPU s"
    for k in ("ours", "diffusers"):
        print(f"  {k:<22} time {t[k]:7.3f} {unit} (median {med[k]:.3f})   peak {mib(mem[k])}")
    print(f"  {'ours + checkpointing':<22} {'':>30}   peak {mib(mem['ours-ckpt'])}")
    print(
        f"  ratio ours / diffusers: time {t['ours'] / t['diffusers']:.2f}x, "
        f"memory {mem['ours'] / mem['diffusers']:.2f}x "
        f"(with checkpointing {mem['ours-ckpt'] / mem['diffusers']:.2f}x)"
    )


def bench_inference(args):
    print(
        f"\n== inference encode peak memory: batch {args.batch}, {args.infer_size}x{args.infer_size}, "
        f"base_dim {args.base_dim}, {args.device} {args.dtype}"
    )
    peaks = {}
    for path in ("chunked", "whole"):
        peaks[path] = [measure_in_subprocess(args, f"encode:{path}@{n}") for n in args.lengths]
    print(f"  {'frames':>6}  {'chunked':>12}  {'whole clip':>12}")
    for i, n in enumerate(args.lengths):
        print(f"  {n:>6}  {mib(peaks['chunked'][i])}  {mib(peaks['whole'][i])}")
    for path in ("chunked", "whole"):
        growth = peaks[path][-1] / peaks[path][0]
        print(f"  {path:<8} growth {args.lengths[-1]} / {args.lengths[0]} frames: {growth:.2f}x")


def main():
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(args)))
        return
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)")
    bench_training(args, device, dtype)
    bench_inference(args)


if __name__ == "__main__":
    main()
