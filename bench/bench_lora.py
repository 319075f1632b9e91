"""Benchmark a LoRA fine-tuning step and a full fine-tuning step, ours against diffusers + peft.

    .venv/bin/python bench/bench_lora.py                      # CPU-sized model, ~1-2 min on 2 cores
    .venv/bin/python bench/bench_lora.py --device cuda --size 1.3B --frames 81 --height 480 \
        --width 832 --clips 1 --checkpointing --json lora.json  # Wan 1.3B at 480x832, 81 frames

One training step = x_t, forward, flow loss, backward and an AdamW step, on the same weights
(ours converted to diffusers' names) and the same clips, in four cases:
- ours_full / diffusers_full: every weight trains;
- ours_lora / diffusers_lora: peft LoRA (rank --rank, alpha = rank) on the same targets: the
  q, k, v, o projections of self- and cross-attention and both FFN linears. Ours is
  ``vidgen.models.dit.lora.add_lora``; diffusers' is ``WanTransformer3DModel.add_adapter``.
  On CUDA the frozen base is kept in bf16 (ours: ``base_dtype=bfloat16``), the adapters in fp32.
The clips are --clips latents of one shape (Wan VAE: 1 + (F-1)/4 frames, H/8 x W/8, 16 channels)
with --text-tokens tokens of text each: ours takes them packed, diffusers as a batch (no padding
is needed, so the comparison is per token). With --checkpointing both recompute each block.

Figures per case: trainable parameters; step time, the median over --repeats rounds with the
cases interleaved within each round (on CPU this process's CPU seconds on --threads threads by
default, --clock wall for wall time); the peak memory a step adds above the loaded model
(each case in a fresh subprocess; CPU: peak RSS, with glibc returning freed tensors to the
system at once; CUDA: the allocator's peak, also as an
absolute figure with the weights and optimizer state); and the training checkpoint's size
(the trainable weights plus AdamW's two moments: what ``model.lora`` runs save). Ratios: ours /
diffusers per mode, and LoRA / full for ours.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import mib, peak_bytes, sync  # noqa: E402

from vidgen.models.dit import WanDiT, pack_samples  # noqa: E402
from vidgen.models.dit.lora import DEFAULT_TARGETS, add_lora  # noqa: E402
from vidgen.tools.convert_dit import config_to_diffusers, state_dict_to_diffusers  # noqa: E402

CASES = ("ours_full", "diffusers_full", "ours_lora", "diffusers_lora")
SIZES = {  # CPU-sized default and Wan2.1 1.3B
    "cpu": dict(dim=512, ffn_dim=2048, num_heads=8, num_layers=4, text_dim=384, freq_dim=256),
    "1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096, freq_dim=256),
}
# our target names -> diffusers' module names for the same linears
DIFFUSERS_TARGETS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0",
                     "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}


def build(case: str, args) -> tuple[torch.nn.Module, callable]:
    """(model, step function) of one case; the same initial weights for every case."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = WanDiT(**SIZES[args.size], in_channels=16, out_channels=16, patch_size=(1, 2, 2))
    bf16_base = device.type == "cuda"
    if case.startswith("diffusers"):
        from diffusers import WanTransformer3DModel

        config = {k: v for k, v in config_to_diffusers(ours.config).items()
                  if not k.startswith("_") and k not in ("pos_embed_seq_len",)}
        model = WanTransformer3DModel(**config)
        model.load_state_dict(state_dict_to_diffusers(ours.state_dict()))
        if case.endswith("lora"):
            from peft import LoraConfig

            model.requires_grad_(False)
            if bf16_base:
                model.to(torch.bfloat16)
            model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights=True,
                                         target_modules=[DIFFUSERS_TARGETS[t] for t in DEFAULT_TARGETS]))
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.data = p.data.float()
        if args.checkpointing:
            model.enable_gradient_checkpointing()
    else:
        model = ours
        if case.endswith("lora"):
            add_lora(model, rank=args.rank, alpha=args.rank, base_dtype="bfloat16" if bf16_base else None)
        model.gradient_checkpointing = args.checkpointing
    model.to(device).train()
    return model, make_step(case, model, args, device)


def make_step(case: str, model, args, device):
    grid = ((args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(args.clips, 16, *grid, generator=g).to(device)
    eps = torch.randn(x0.shape, generator=g).to(device)
    text = torch.randn(args.clips, args.text_tokens, SIZES[args.size]["text_dim"], generator=g).to(device)
    t = torch.rand(args.clips, generator=g).to(device)
    xt = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * eps
    target = eps - x0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    if case.startswith("ours"):
        samples = [dict(latent=xt[i], context=text[i], t=float(t[i])) for i in range(args.clips)]
        packed = pack_samples(samples, (1, 2, 2), 10**9)[0].to(device)

        def predict():
            return torch.stack(model.forward_packed(packed))
    else:
        def predict():
            return model(xt, 1000 * t, text, return_dict=False)[0]

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = (predict().float() - target).square().mean()
        loss.backward()
        opt.step()

    step.opt, step.params = opt, params
    return step


def checkpoint_bytes(step) -> int:
    """Bytes of what a training checkpoint keeps: the trainable weights and AdamW's state."""
    buf = io.BytesIO()
    torch.save({"weights": [p.detach() for p in step.params], "optim": step.opt.state_dict()}, buf)
    return buf.tell()


def measure_memory(case: str, args) -> dict:
    """In this (fresh) process: peak memory of one step above the loaded model."""
    model, step = build(case, args)
    step()  # allocate the optimizer state and warm up
    device = torch.device(args.device)
    out = {"step_peak": peak_bytes(step, device)}
    if device.type == "cuda":
        out["absolute_peak"] = torch.cuda.max_memory_allocated()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--json", default=None)
    parser.add_argument("--memory-of", choices=CASES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:  # the subprocess of one case's memory figure
        print(json.dumps(measure_memory(args.memory_of, args)))
        return
    device = torch.device(args.device)
    clock = time.process_time if device.type == "cpu" and args.clock == "cpu" else time.perf_counter
    grid = ((args.frames - 1) // 4 + 1, args.height // 16, args.width // 16)
    print(f"{datetime.date.today()} {args.size} model, {args.clips} clip(s) of {args.frames}x{args.height}x"
          f"{args.width} ({math.prod(grid)} tokens each, {args.text_tokens} text tokens), rank {args.rank}, "
          f"checkpointing {args.checkpointing}, {args.device}, clock {args.clock if device.type == 'cpu' else 'wall'}")
    rows = {}
    for case in args.cases:  # memory first, each case in its own process (a clean baseline)
        cmd = [sys.executable, __file__, "--memory-of", case] + [
                a for a in sys.argv[1:] if not a.startswith("--json")]
        # glibc: tensors above 64 KiB mmap'd and unmapped when freed, so RSS follows live memory
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        rows[case] = json.loads(out.strip().splitlines()[-1])
    steps = {}
    for case in args.cases:
        _, step = build(case, args)
        step()  # warm-up (and the optimizer state)
        rows[case].update(trainable=sum(p.numel() for p in step.params), checkpoint=checkpoint_bytes(step))
        steps[case] = step
    times = {case: [] for case in args.cases}
    for _ in range(args.repeats):
        for case in args.cases:
            sync(device)
            start = clock()
            steps[case]()
            sync(device)
            times[case].append(clock() - start)
    for case in args.cases:
        rows[case]["step_s"] = statistics.median(times[case])
    print(f"{'case':<16}{'trainable':>14}{'step (s)':>10}{'step peak':>14}{'checkpoint':>14}")
    for case, r in rows.items():
        print(f"{case:<16}{r['trainable']:>14,}{r['step_s']:>10.3f}{mib(r['step_peak']):>14}{mib(r['checkpoint']):>14}"
              + (f"   absolute peak {r['absolute_peak'] / 2**30:.1f} GiB" if "absolute_peak" in r else ""))
    ratios = {}
    for mode in ("full", "lora"):
        a, b = rows.get(f"ours_{mode}"), rows.get(f"diffusers_{mode}")
        if a and b:
            ratios[f"{mode}_time_ours_over_diffusers"] = a["step_s"] / b["step_s"]
            ratios[f"{mode}_peak_ours_over_diffusers"] = a["step_peak"] / b["step_peak"]
    if "ours_full" in rows and "ours_lora" in rows:
        for key in ("step_s", "step_peak", "checkpoint"):
            ratios[f"ours_lora_over_full_{key}"] = rows["ours_lora"][key] / rows["ours_full"][key]
    for k, v in ratios.items():
        print(f"{k:<40}{v:8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=rows, ratios=ratios), indent=2))


if __name__ == "__main__":
    main()
