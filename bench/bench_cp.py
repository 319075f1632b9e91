"""Context parallelism: per-rank peak memory and tokens/s of a DiT training step against cp=1.

    .venv/bin/python bench/bench_cp.py                          # CPU: cp=2 (2 gloo processes)
    .venv/bin/python bench/bench_cp.py --tokens 1024 2048 --steps 2      # smoke run
    .venv/bin/python bench/bench_cp.py --device cuda --cp 2 4 --dim 1536 --heads 12 --layers 4 \
        --tokens 16384 32768 65536                           # CUDA: needs max(--cp) GPUs (NCCL)
    .venv/bin/python bench/bench_cp.py --estimate              # the README's sequence-length estimate

Measured: for each sequence length N (one packed sample of N tokens, 1 x sqrt x sqrt latent
grid) a training step (forward_packed_tokens, flow loss on the local tokens, backward; no
optimizer step) with activation checkpointing, on one process (cp=1) and on cp processes that
split the sequence (each rank's peak memory above its start: CPU peak RSS, CUDA the
allocator's peak; the largest over the ranks), taken on the first step; on a CPU each
(cp size, length) runs in fresh processes with glibc's mmap threshold at 64 KiB (large blocks
go back to the system when freed), so that the RSS peak follows the live tensors. tokens/s is N / (median step time). On a CPU the cp=1 process gets cp
threads and each cp rank one, so both use the same cores; gloo's all-to-all goes through
shared memory there, not NVLink, so the CPU speed ratio says little about GPUs; the memory
ratio is the figure that carries over.

--estimate: the largest sequence per GPU for the Wan 1.3B and 14B shapes, from a formula, not
a measurement (written out in ``estimate`` below), with and without cp.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import mib, peak_bytes, sync  # noqa: E402

from vidgen.lit.dit import packed_flow_loss  # noqa: E402
from vidgen.models.dit import WanDiT, pack_samples  # noqa: E402
from vidgen.models.dit.context_parallel import ContextParallel  # noqa: E402


def _packed(n_tokens: int, channels: int, text_dim: int, device, dtype):
    side = int(math.isqrt(n_tokens))
    g = torch.Generator().manual_seed(0)
    sample = dict(latent=torch.randn(channels, 1, 2 * side, 2 * side, generator=g),
                  context=torch.randn(64, text_dim, generator=g), t=0.5)
    return pack_samples([sample], (1, 2, 2), side * side)[0].to(device, dtype)


def _step(model: WanDiT, p, cp: ContextParallel | None, amp: dict) -> None:
    """One training step without the optimizer: forward, flow loss on the local tokens, backward."""
    with torch.autocast(**amp):
        loss = packed_flow_loss(model, p, p.x, torch.randn_like(p.x), cp)
    loss.backward()
    model.zero_grad(set_to_none=True)


def _worker(rank: int, world: int, args, results: str) -> None:
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if args.device == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(1 if world > 1 or args.device == "cuda" else max(args.cp))
    cp = None
    if world > 1:
        # a FileStore: no rank's exit can take a TCP store down under the others
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=world,
                                init_method=f"file://{results}.store")
        cp = ContextParallel.from_group()
    torch.manual_seed(0)
    model = WanDiT(dim=args.dim, ffn_dim=4 * args.dim, num_heads=args.heads, num_layers=args.layers,
                   freq_dim=64, in_channels=16, out_channels=16, text_dim=64).to(device)
    model.gradient_checkpointing = True
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.device == "cuda")
    rows = []
    for n in args.tokens[:1] if args.device == "cpu" else args.tokens:  # CPU: one length per process
        p = _packed(n, 16, 64, device, torch.float32)
        step = partial(_step, model, p, cp, amp)
        peak = peak_bytes(step, device)  # the first step of a fresh process: a clean peak on CPU
        times = []
        for _ in range(args.steps):
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - start)
        if world > 1:  # the largest rank's peak and the slowest rank's time
            both = torch.tensor([float(peak), statistics.median(times)], device=device)
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            peak, median = int(both[0]), float(both[1])
        else:
            median = statistics.median(times)
        rows.append(dict(tokens=p.num_tokens, peak=peak, seconds=median))
    if rank == 0:
        Path(results).write_text(json.dumps(rows))
    if world > 1:
        dist.barrier()  # no rank tears gloo down while another still writes to it
        dist.destroy_process_group()


def measure(args, cp_size: int) -> list[dict]:
    if args.device == "cpu":  # RSS peaks are only clean in a fresh process: one per length
        return [row for n in args.tokens
                for row in _measure(argparse.Namespace(**{**vars(args), "tokens": [n]}), cp_size)]
    return _measure(args, cp_size)


def _measure(args, cp_size: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        if cp_size == 1:
            ctx = mp.get_context("spawn")
            proc = ctx.Process(target=_worker, args=(0, 1, args, out))
            proc.start()
            proc.join()
            if proc.exitcode:
                raise RuntimeError(f"the cp=1 run failed (exit code {proc.exitcode})")
        else:
            mp.spawn(_worker, args=(cp_size, args, out), nprocs=cp_size, join=True)
        return json.loads(Path(out).read_text())


# ---- the estimate ----

def _shape(size: str) -> dict:
    """Parameter count, width and depth of a Wan preset (built on the meta device)."""
    from vidgen.models.dit import build_wan_dit

    with torch.device("meta"):
        model = build_wan_dit(size, text_dim=4096)
    return dict(params=sum(p.numel() for p in model.parameters()), dim=model.config["dim"],
                layers=model.config["num_layers"])


def estimate(gpu_gib: float = 80.0, gpus: int = 8, usable: float = 0.9) -> list[str]:
    """Largest tokens per sequence that fit one GPU, bf16 autocast, activation checkpointing
    per block, FSDP2 over ``gpus`` ranks (parameters, gradients and AdamW states sharded):

        states      16 B/param * P / gpus       (fp32 weight, gradient, Adam m and v)
                  + 2 * 4 B * P / layers         (two blocks' weights unsharded at a time)
        activations N / cp * (4 B * dim * layers   (each block's fp32 input, kept for recompute)
                             + 34 B * dim)         (the block being recomputed: Korthikanti et
                                                    al. 2022's 34 s b h bytes per layer, flash /
                                                    efficient attention so no s^2 term)

    Attention after the all-to-all holds N tokens of H / cp heads: the same bytes as N / cp
    tokens of all heads, so it is inside the per-token term. Not counted: the text encoder
    (run offline), the CUDA context and fragmentation (the ``usable`` fraction), the loss.
    """
    budget = gpu_gib * 2**30 * usable
    lines = [f"{gpu_gib:.0f} GiB GPUs, {usable:.0%} usable, FSDP2 over {gpus}; an 81-frame 720p clip is 75,600 tokens",
             f"{'shape':>5} {'cp':>3} {'states':>10} {'bytes/token':>12} {'max tokens':>11} "
             f"{'81x720p clips':>13}"]
    for name in ("1.3B", "14B"):
        s = _shape(name)
        states = 16 * s["params"] / gpus + 8 * s["params"] / s["layers"]
        per_token = 4 * s["dim"] * s["layers"] + 34 * s["dim"]
        for cp in (1, 2, 4, 8):
            n = max(0.0, budget - states) * cp / per_token
            lines.append(f"{name:>5} {cp:>3} {states / 2**30:>7.1f} GiB {per_token / 1024:>8.0f} KiB "
                         f"{n / 1000:>9.0f}k {n / 75600:>13.2f}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cp", type=int, nargs="+", default=[2], help="cp sizes to compare with cp=1")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 2304, 4096, 9216],
                    help="sequence lengths (rounded down to squares)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per length (median)")
    ap.add_argument("--estimate", action="store_true", help="print the sequence-length estimate and stop")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if args.estimate:
        print("\n".join(estimate()))
        return
    if args.device == "cuda" and torch.cuda.device_count() < max(args.cp):
        raise SystemExit(f"--cp {max(args.cp)} on CUDA needs that many GPUs (NCCL, one rank per GPU); "
                         f"this machine has {torch.cuda.device_count()}")
    for cp in args.cp:
        if args.heads % cp:
            raise SystemExit(f"--cp {cp} must divide --heads {args.heads}")
    if args.device == "cpu":  # glibc: large blocks mmap'd and returned on free, so RSS tracks live tensors
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # (read by each spawned process)
    print(f"DiT dim {args.dim}, {args.heads} heads, {args.layers} layers, activation checkpointing, "
          f"{args.device}{' bf16 autocast' if args.device == 'cuda' else ' fp32'}")
    base = measure(args, 1)
    report = {"cp1": base}
    header = f"{'tokens':>7} {'cp=1 peak':>13} {'tok/s':>8}"
    for cp in args.cp:
        report[f"cp{cp}"] = measure(args, cp)
        header += f" {f'cp={cp} peak/rank':>18} {'mem ratio':>9} {'tok/s':>8} {'speed ratio':>11}"
    print(header)
    for i, row in enumerate(base):
        line = f"{row['tokens']:>7} {mib(row['peak']):>13} {row['tokens'] / row['seconds']:>8.0f}"
        for cp in args.cp:
            r = report[f"cp{cp}"][i]
            line += (f" {mib(r['peak']):>18} {r['peak'] / row['peak']:>9.2f} {r['tokens'] / r['seconds']:>8.0f}"
                     f" {row['seconds'] / r['seconds']:>11.2f}")
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
