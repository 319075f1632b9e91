"""How fast our DiT and diffusers' Wan fit the same few latent clips, side by side.

    python bench/bench_dit_fit.py --latents outputs/demo/latents/train --bucket 9x32x32

Both models get the demo DiT's widths (or ``--dim`` ...), fresh initialisations, the same
``--clips`` latents with their caption embeddings (latent shards from
``vidgen.tools.encode_latents``), AdamW at ``--lr`` and full-batch flow-matching steps with
the same noise and timesteps. Printed: the flow loss on those clips at five fixed
timesteps with fixed noise, every quarter of the run. A model that cannot memorise a
handful of clips as fast as the reference has a bug; one that fits as fast as the
reference, but not fast enough, needs more steps, not a fix.
"""

from __future__ import annotations

import argparse
import glob
import os
import tarfile
import time

import torch
from safetensors.torch import load

from vidgen.models.dit.model import TIMESTEP_SCALE, WanDiT

TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)


def load_clips(folder: str, bucket: str, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents [N, C, T, H, W], text [N, L, D], text mask [N, L]) of the first ``count``
    samples of ``bucket`` in the latent shards of ``folder``."""
    samples = []
    for shard in sorted(glob.glob(os.path.join(folder, "*.tar"))):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(f"_{bucket}.safetensors"):
                    samples.append(load(tar.extractfile(member).read()))
                    if len(samples) == count:
                        break
        if len(samples) == count:
            break
    if len(samples) < count:
        raise SystemExit(f"{folder}: {len(samples)} latents at bucket {bucket}, need --clips {count}")
    length = max(s["text"].shape[0] for s in samples)
    text = torch.zeros(count, length, samples[0]["text"].shape[1])
    mask = torch.zeros(count, length, dtype=torch.bool)
    for i, s in enumerate(samples):
        text[i, : len(s["text"])], mask[i, : len(s["text"])] = s["text"].float(), True
    return torch.stack([s["latent"].float() for s in samples]), text, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", required=True, help="latent shard folder (encode_latents out=)")
    parser.add_argument("--bucket", default="9x32x32")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--ffn-dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--freq-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from diffusers import WanTransformer3DModel

    torch.set_num_threads(args.threads)
    x0, text, mask = load_clips(args.latents, args.bucket, args.clips)
    channels, text_dim = x0.shape[1], text.shape[2]
    torch.manual_seed(0)  # the initialisations
    models = {
        "ours": WanDiT(dim=args.dim, ffn_dim=args.ffn_dim, num_heads=args.heads, num_layers=args.layers,
                       freq_dim=args.freq_dim, text_dim=text_dim, in_channels=channels, out_channels=channels,
                       patch_size=(1, 2, 2)),
        "diffusers": WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.dim // args.heads,
            in_channels=channels, out_channels=channels, text_dim=text_dim, freq_dim=args.freq_dim,
            ffn_dim=args.ffn_dim, num_layers=args.layers),
    }
    predict = {
        "ours": lambda m, xt, t: m(xt, t, text, mask),
        # diffusers attends to every text position: padding is zeros, as in its pipelines
        "diffusers": lambda m, xt, t: m(xt, t * TIMESTEP_SCALE, text, return_dict=False)[0],
    }
    eval_noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    print(f"{args.clips} clips {tuple(x0.shape[1:])} from {args.latents}; flow loss at t = {TIMESTEPS}")
    for name, model in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(0)  # the same noise and timesteps for both

        def loss_at(t: torch.Tensor, noise: torch.Tensor, f=predict[name], model=model) -> torch.Tensor:
            tt = t.view(-1, 1, 1, 1, 1)
            return (f(model, (1 - tt) * x0 + tt * noise, t) - (noise - x0)).square().mean()

        start = time.perf_counter()
        for step in range(args.steps + 1):
            if step % max(1, args.steps // 4) == 0:
                with torch.no_grad():
                    losses = [float(loss_at(torch.full((args.clips,), t), eval_noise)) for t in TIMESTEPS]
                print(f"{name:<10} step {step:>5}  " + " ".join(f"{v:.3f}" for v in losses)
                      + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
            if step == args.steps:
                break
            t = torch.sigmoid(torch.randn(args.clips, generator=gen))  # logit-normal, as training
            noise = torch.randn(x0.shape, generator=gen)
            opt.zero_grad()
            loss_at(t, noise).backward()
            opt.step()


if __name__ == "__main__":
    main()
