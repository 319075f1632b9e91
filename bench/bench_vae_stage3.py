"""Benchmark VAE stage 3: spatial tiling, ours vs diffusers throughput, the GAN training step.

    .venv/bin/python bench/bench_vae_stage3.py                    # CPU defaults, ~2 min on 2 cores
    .venv/bin/python bench/bench_vae_stage3.py --device cuda --tile-base-dim 96 --tile-frames 17 \
        --tile-size 1024 --tile 256 --overlap 64 --base-dim 96 --size 256 --frames 17 \
        --train-size 256 --train-frames 17 --disc-channels 64

A. Tiling: a large clip (default 9x256x256, a narrow VAE) encoded and decoded untiled and tiled
   (vidgen.models.vae.tiling). Each case runs in a fresh subprocess and reports its peak memory
   and time; the parent compares the tiled reconstruction tiled_decode(tiled_encode(x)) with
   the untiled decode(encode(x)) (PSNR) and prints untiled / tiled memory as the saving.
B. Throughput: chunked encode and decode, clips/s, of ours vs diffusers' AutoencoderKLWan on
   identical weights (a random diffusers model imported through vidgen.tools.convert_vae),
   both timed in this process, interleaved, printed as ours / diffusers ratios.
C. A stage-3 training step of ours, split as in vidgen.lit.vae: G step (whole-clip encode +
   decode, L1 + KL + LPIPS, hinge G loss with the adaptive weight, backward, AdamW step) and
   D step (Discriminator3D on real and fake, hinge + LeCam, backward, AdamW step). LPIPS uses
   a random AlexNet trunk unless --lpips-backbone names the torchvision file: same cost.

CPU timing is this process's CPU seconds on one thread by default (--threads): on a shared
machine wall clock mostly measures the other tenants. Times are best of --repeats (interference
only ever adds time). Memory: CUDA torch.cuda.max_memory_allocated() minus the allocation before
the call; CPU peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the
call, with glibc told to mmap allocations >= 64 KiB so freed tensors leave the RSS at once.

CPU caveat (as in bench/bench_vae.py): PyTorch runs a CPU fp32 conv3d with oneDNN only when
batch > 1 or N*C*T*H > 20480, otherwise with an im2col kernel whose column buffer is 27 times
the conv's input (113 MiB for one 16-channel 4-frame 128x128 chunk). At batch 1 a tile can land
on that kernel while the whole frame does not, and the buffer, not the activations, then sets
the peak; part A therefore runs batch 2 by default (--tile-batch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import mib, peak_bytes, sync  # noqa: E402

from vidgen.losses.gan import LeCam, adaptive_weight, hinge_d_loss, hinge_g_loss  # noqa: E402
from vidgen.losses.recon import vae_loss  # noqa: E402
from vidgen.models.vae import WanVAE  # noqa: E402
from vidgen.models.vae.discriminator import Discriminator3D  # noqa: E402
from vidgen.models.vae.tiling import tile_spans, tiled_decode, tiled_encode  # noqa: E402
from vidgen.tools import convert_vae  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    p.add_argument("--parts", nargs="+", choices=["A", "B", "C"], default=["A", "B", "C"])
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    a = p.add_argument_group("A: tiling")
    a.add_argument("--tile-base-dim", type=int, default=16)
    a.add_argument("--tile-res-blocks", type=int, default=1)
    a.add_argument(
        "--tile-batch",
        type=int,
        default=2,
        help="clips per call; on CPU, batch 1 sends small convs to an im2col kernel whose "
        "column buffer (not the model) sets the peak, see the module docstring",
    )
    a.add_argument("--tile-frames", type=int, default=9)
    a.add_argument("--tile-size", type=int, default=256, help="frame height = width")
    a.add_argument("--tile", type=int, default=128, help="tile size in pixels")
    a.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels")
    b = p.add_argument_group("B: ours vs diffusers")
    b.add_argument("--base-dim", type=int, default=32)
    b.add_argument("--num-res-blocks", type=int, default=2)
    b.add_argument("--batch", type=int, default=2, help="2 keeps CPU convs on oneDNN (bench_vae)")
    b.add_argument("--frames", type=int, default=9)
    b.add_argument("--size", type=int, default=64)
    c = p.add_argument_group("C: stage-3 training step (uses --base-dim / --num-res-blocks)")
    c.add_argument("--train-batch", type=int, default=1)
    c.add_argument("--train-frames", type=int, default=9)
    c.add_argument("--train-size", type=int, default=64)
    c.add_argument("--disc-channels", type=int, default=32)
    c.add_argument("--disc-layers", type=int, default=3)
    c.add_argument("--lpips-weight", type=float, default=1.0, help="0 leaves LPIPS out")
    c.add_argument("--lpips-backbone", default=None, help="torchvision AlexNet weights file")
    c.add_argument("--checkpointing", action="store_true", help="VAE activation checkpointing")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: one tiling case, in a subprocess
    p.add_argument("--case-dir", help=argparse.SUPPRESS)  # internal: where cases exchange tensors
    return p.parse_args(argv)


def clock(device):
    # CUDA: wall clock. CPU: this process's CPU seconds (less inflated by other tenants).
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def timed_once(fn, device) -> float:
    """Seconds of one call of fn() (CUDA: synchronised on both ends)."""
    sync(device)
    start = clock(device)
    fn()
    sync(device)
    return clock(device) - start


def timed(fn, device, repeats) -> float:
    """Best of `repeats` calls of fn(), after one warm-up call, in seconds."""
    fn()
    return min(timed_once(fn, device) for _ in range(repeats))


def smooth_clip(batch, frames, size, device, dtype, seed=1):
    """Image-like content (coarse noise, trilinearly upsampled) in [-1, 1]: [B, 3, T, S, S]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, frames, size // 8, size // 8, generator=g) * 2 - 1
    clip = torch.nn.functional.interpolate(coarse, size=(frames, size, size), mode="trilinear")
    return clip.to(device, dtype)


# --------------------------------------------------------------------------- A: tiling


def tiling_vae(args, device, dtype) -> WanVAE:
    torch.manual_seed(0)
    vae = WanVAE(base_dim=args.tile_base_dim, z_dim=16, num_res_blocks=args.tile_res_blocks)
    return vae.to(device=device, dtype=dtype).eval()


def run_tiling_case(args) -> dict:
    """In a fresh subprocess: one of encode/decode x untiled/tiled; saves its output."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    op, mode = args.case.split(":")
    vae = tiling_vae(args, device, dtype)
    folder = Path(args.case_dir)
    if op == "encode":
        inp = smooth_clip(args.tile_batch, args.tile_frames, args.tile_size, device, dtype)
        warm = inp[:, :, :5]  # frame 0 + one 4-frame chunk: every code path, full frame size
    else:
        inp = torch.load(folder / f"encode-{mode}.pt").to(device)
        warm = inp[:, :, :2]
    result = {}

    def call(x):
        with torch.no_grad():
            if op == "encode" and mode == "tiled":
                out = tiled_encode(vae, x, args.tile, args.overlap)[0]
            elif op == "encode":
                out = vae.encode(x)[0]
            elif mode == "tiled":
                out = tiled_decode(vae, x, args.tile, args.overlap)
            else:
                out = vae.decode(x)
        result["out"] = out

    # warm-up on a short clip of the same frame size: the first calls page in kernel code and
    # build conv primitives, which is process start-up cost, not the call's memory
    call(warm)
    result.clear()
    sync(device)
    start = clock(device)
    peak = peak_bytes(lambda: call(inp), device)
    seconds = clock(device) - start
    torch.save(result["out"].cpu(), folder / f"{op}-{mode}.pt")
    return {"peak": peak, "time": seconds}


def measure_in_subprocess(args, case: str, case_dir: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    argv = [sys.executable, __file__, *sys.argv[1:], "--case", case, "--case-dir", case_dir]
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"tiling case {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_tiling(args, device):
    n = len(tile_spans(args.tile_size // 8, args.tile // 8, args.overlap // 8))
    print(
        f"\n== A. tiling: {args.tile_batch}x3x{args.tile_frames}x{args.tile_size}x{args.tile_size}, base_dim "
        f"{args.tile_base_dim}, tile {args.tile} px, overlap {args.overlap} px ({n}x{n} tiles), "
        f"{args.device} {args.dtype}"
    )
    unit = "s" if device.type == "cuda" else "CPU s"
    res = {}
    with tempfile.TemporaryDirectory() as case_dir:
        for op in ("encode", "decode"):  # decode cases read the encode cases' latents
            for mode in ("untiled", "tiled"):
                res[op, mode] = measure_in_subprocess(args, f"{op}:{mode}", case_dir)
                print(
                    f"  {op} {mode:<8} peak {mib(res[op, mode]['peak'])}   "
                    f"time {res[op, mode]['time']:7.2f} {unit}"
                )
        load = {
            k: torch.load(Path(case_dir) / f"{k}.pt").double()
            for k in ("encode-untiled", "encode-tiled", "decode-untiled", "decode-tiled")
        }
    mse = (load["decode-tiled"] - load["decode-untiled"]).pow(2).mean().item()
    db = 10 * math.log10(4.0 / mse) if mse > 0 else math.inf
    mu, mu_t = load["encode-untiled"], load["encode-tiled"]
    rel = ((mu_t - mu).norm() / mu.norm()).item()
    saving = {
        op: res[op, "untiled"]["peak"] / max(res[op, "tiled"]["peak"], 1)
        for op in ("encode", "decode")
    }
    print(
        f"  memory saving untiled / tiled: encode {saving['encode']:.2f}x, "
        f"decode {saving['decode']:.2f}x"
    )
    print(
        f"  tiled vs untiled: reconstruction PSNR {db:.1f} dB, mu relative error {rel:.4f} "
        "(random-weight VAE)"
    )


# --------------------------------------------------------------------------- B: ours vs diffusers


def imported_pair(args, device, dtype):
    """A random diffusers AutoencoderKLWan and ours imported from its saved folder."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    theirs = AutoencoderKLWan(
        base_dim=args.base_dim, z_dim=16, num_res_blocks=args.num_res_blocks
    ).eval()
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(Path(tmp) / "diffusers")
        ours = convert_vae.from_diffusers(Path(tmp) / "diffusers", Path(tmp) / "ours")
    cast = {"dtype": dtype} if dtype != torch.float32 else {}  # diffusers warns on any cast
    return ours.to(device=device, dtype=dtype).eval(), theirs.to(device=device, **cast)


def bench_throughput(args, device, dtype):
    ours, theirs = imported_pair(args, device, dtype)
    x = smooth_clip(args.batch, args.frames, args.size, device, dtype)
    with torch.no_grad():
        mu = ours.encode(x)[0]
        diff = (mu - theirs.encode(x).latent_dist.mean).abs().max().item()
        ddiff = (ours.decode(mu) - theirs.decode(mu).sample).abs().max().item()
    print(
        f"\n== B. throughput: batch {args.batch}, {args.frames}x{args.size}x{args.size}, base_dim "
        f"{args.base_dim}, {args.device} {args.dtype}  (imported weights: max |mu ours - "
        f"diffusers| = {diff:.1e}, max |decode diff| = {ddiff:.1e})"
    )
    calls = {
        ("encode", "ours"): lambda: ours.encode(x),
        ("encode", "diffusers"): lambda: theirs.encode(x).latent_dist.mean,
        ("decode", "ours"): lambda: ours.decode(mu),
        ("decode", "diffusers"): lambda: theirs.decode(mu).sample,
    }
    best = {k: math.inf for k in calls}
    with torch.no_grad():
        for fn in calls.values():  # warm-up (allocator, kernels)
            fn()
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both
            for key, fn in calls.items():
                best[key] = min(best[key], timed_once(fn, device))
    for op in ("encode", "decode"):
        rate = {who: args.batch / best[op, who] for who in ("ours", "diffusers")}
        print(
            f"  {op}: ours {rate['ours']:6.2f} clips/s, diffusers {rate['diffusers']:6.2f} "
            f"clips/s, ratio ours / diffusers {rate['ours'] / rate['diffusers']:.2f}x"
        )


# --------------------------------------------------------------------------- C: training step


def bench_train_step(args, device, dtype):
    from vidgen.losses.lpips import build_lpips

    torch.manual_seed(0)
    vae = WanVAE(base_dim=args.base_dim, z_dim=16, num_res_blocks=args.num_res_blocks)
    vae = vae.to(device=device, dtype=dtype).train()
    vae.enable_gradient_checkpointing(args.checkpointing)
    disc = Discriminator3D(base_channels=args.disc_channels, num_layers=args.disc_layers)
    disc = disc.to(device=device, dtype=dtype).train()
    lecam = LeCam(decay=0.999).to(device)
    lpips_fn = None
    if args.lpips_weight > 0:
        with warnings.catch_warnings():  # torchvision's deprecation notes, raised inside lpips
            warnings.simplefilter("ignore", UserWarning)
            lpips_fn = build_lpips(
                "alex", args.lpips_backbone, random_backbone=not args.lpips_backbone
            )
        lpips_fn = lpips_fn.to(device=device, dtype=dtype)
    opt_g = torch.optim.AdamW(vae.parameters(), lr=1e-5)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-5)
    x = smooth_clip(args.train_batch, args.train_frames, args.train_size, device, dtype)
    noise = torch.Generator(device=device).manual_seed(0)
    state = {}

    def g_step():
        opt_g.zero_grad(set_to_none=True)
        recon, mu, logvar = vae(x, sample_posterior=True, generator=noise)
        nll, _ = vae_loss(
            x,
            recon,
            mu,
            logvar,
            l1_weight=1.0,
            kl_weight=1e-6,
            lpips_weight=args.lpips_weight,
            lpips_fn=lpips_fn,
        )
        disc.requires_grad_(False)  # G's backward must not fill D's grads
        g_adv = hinge_g_loss(disc(recon))
        w = adaptive_weight(nll, g_adv, vae.last_layer)
        (nll + 0.1 * w * g_adv).backward()
        disc.requires_grad_(True)
        opt_g.step()
        state["fake"] = recon.detach()

    def d_step():
        opt_d.zero_grad(set_to_none=True)
        logits_real, logits_fake = disc(x), disc(state["fake"])
        lecam.update(logits_real, logits_fake)
        d_loss = hinge_d_loss(logits_real, logits_fake) + 1e-3 * lecam(logits_real, logits_fake)
        d_loss.backward()
        opt_d.step()

    t_g = timed(g_step, device, args.repeats)
    t_d = timed(d_step, device, args.repeats)
    unit = "s" if device.type == "cuda" else "CPU s"
    lp = (
        "off"
        if lpips_fn is None
        else ("AlexNet" if args.lpips_backbone else "random AlexNet trunk")
    )
    print(
        f"\n== C. stage-3 step: batch {args.train_batch}, {args.train_frames}x{args.train_size}x"
        f"{args.train_size}, base_dim {args.base_dim}, disc {args.disc_channels}x"
        f"{args.disc_layers} layers, LPIPS {lp}, checkpointing "
        f"{'on' if args.checkpointing else 'off'}, {args.device} {args.dtype}"
    )
    print(f"  G step (encode+decode, L1+KL+LPIPS, adaptive GAN, backward, AdamW) {t_g:7.3f} {unit}")
    print(f"  D step (real+fake, hinge+LeCam, backward, AdamW)                   {t_d:7.3f} {unit}")
    print(f"  full step {t_g + t_d:7.3f} {unit} (D share {t_d / (t_g + t_d):.0%})")


def main():
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_tiling_case(args)))
        return
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)")
    if "A" in args.parts:
        bench_tiling(args, device)
    if "B" in args.parts:
        bench_throughput(args, device, dtype)
    if "C" in args.parts:
        bench_train_step(args, device, dtype)


if __name__ == "__main__":
    main()
