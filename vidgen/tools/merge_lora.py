"""Merge a LoRA into its base DiT and write the result as a ``save_pretrained`` folder.

    python -m vidgen.tools.merge_lora --base outputs/dit_stage2/<run> --lora outputs/dit_lora/<run>/lora \
        --out ckpt/merged [--scale 1.0] [--dtype bf16]

``--base``: a run folder (its ``dit/``), a ``dit/`` folder or a ``.ckpt``. ``--lora``: a LoRA
run's ``lora/`` folder or a LoRA ``.safetensors`` in diffusers', the original Wan / ComfyUI or
peft's keys. The base's ``pipeline.json`` (VAE, text encoder, latent statistics) is copied with
the LoRA recorded in it, so ``python -m vidgen.sample ckpt=<out>`` samples the merged model as
the base would be sampled. ``convert_dit --to-diffusers <out>`` then gives a diffusers folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vidgen.diffusion.generate import PIPELINE_NAME
from vidgen.diffusion.pipeline import read_pipeline
from vidgen.models.dit import load_dit
from vidgen.tools.convert_dit import DTYPES


def merge(base: str, lora: str, out: str, scale: float = 1.0, dtype: torch.dtype | None = None,
          trust: bool = False) -> Path:
    """Write ``base`` with ``lora`` merged at ``scale`` to ``out``; returns ``out``."""
    dit = load_dit(base, trust=trust, lora=lora, lora_scale=scale)
    if dtype is not None:
        dit = dit.to(dtype)
    out = Path(out)
    dit.save_pretrained(out)
    pipeline = read_pipeline(base, trust=trust)
    pipeline["merged_lora"] = dict(lora=str(Path(lora).resolve()), scale=float(scale),
                                   base=str(Path(base).resolve()))
    (out / PIPELINE_NAME).write_text(json.dumps(pipeline, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="base DiT: run folder, dit/ folder or .ckpt")
    parser.add_argument("--lora", required=True, help="LoRA: a lora/ folder or a .safetensors file")
    parser.add_argument("--out", required=True, help="output save_pretrained folder")
    parser.add_argument("--scale", type=float, default=1.0, help="W += scale * alpha/rank * B @ A")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the merged weights")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle a .ckpt base in full (it may run code: README, Trust)")
    args = parser.parse_args(argv)
    out = merge(args.base, args.lora, args.out, args.scale,
                DTYPES[args.dtype] if args.dtype else None, args.trust_checkpoint)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
