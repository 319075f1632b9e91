"""Sample videos from a trained DiT: text -> flow ODE in latent space -> VAE decode -> mp4.

    python -m vidgen.sample ckpt=outputs/dit_stage2/<run> prompt="a red circle moves left" \
        num_frames=17 height=64 width=64 [steps=30 solver=heun cfg_scale=5 seed=0 out=samples/]
    python -m vidgen.sample ckpt=<run> 'prompt=[a red circle, a blue square]'   # several
    python -m vidgen.sample ckpt=<i2v run> image=first.png prompt="..." [image_cfg_scale=1.5]
    python -m vidgen.sample ckpt=<base> lora=<lora run>/lora [lora_scale=1.0] prompt="..."

``ckpt`` is a DiT run folder (uses its exported ``dit/``), a ``dit/`` folder or a ``.ckpt``;
the run's ``dit/pipeline.json`` names the VAE and text encoder it was trained with, so
``vae=`` / ``text_encoder=`` are only needed to override them (or for a ``.ckpt``). It also
records the latent statistics the DiT's latents were normalised with: decoding with a VAE
whose statistics differ is an error (``allow_latent_stats_mismatch=true`` overrides), and so
is a VAE without statistics (mean 0 / std 1; ``allow_identity_latent_stats=true``).

This file is the command line only: the pipeline (``generate``, ``read_pipeline``, the checks
of the decoding VAE) is ``vidgen/diffusion/pipeline.py``, which evaluation uses too.

Image-to-video (a DiT with conditioning channels, trained with ``experiment=dit/i2v``):
``image=`` (png / jpg, or a list, one per prompt) is resized to cover height x width and
centre-cropped, then becomes the first frame of the Wan2.1 condition (``vidgen.i2v``); the
run's image encoder (pipeline.json) adds its tokens. Guidance on both (``i2v_cfg_model_fn``):
``cfg_scale`` on the text, ``image_cfg_scale`` on the image (1.0: Wan2.1's guidance, image in
both branches).

Sample i starts from noise drawn on the CPU with seed ``seed + i``, so a video does not depend
on the batch it was generated in nor on the device. The unconditional branch of
classifier-free guidance uses the embedding of ``negative_prompt`` ("" by default: the same
empty caption the model saw under caption dropout).

``lora=`` merges a LoRA into the base before sampling (W += lora_scale * alpha/r * B @ A): a LoRA
run's ``lora/`` folder or any LoRA file in diffusers', the original Wan / ComfyUI or peft's
keys. ``solver=unipc`` samples as Wan2.1 and diffusers' ``WanPipeline`` do.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vidgen import text as text_encoders  # module attribute: tests swap build_text_encoder
from vidgen.data.video import write_mp4
from vidgen.diffusion.generate import PIPELINE_NAME
from vidgen.diffusion.pipeline import check_decoding_vae, generate, read_pipeline
from vidgen.image_encoder import build_image_encoder
from vidgen.models.dit import load_dit
from vidgen.models.vae import load_vae
from vidgen.utils.rundir import register_resolvers


def load_image(path: str | os.PathLike, height: int, width: int) -> Tensor:
    """A png / jpg resized to cover height x width and centre-cropped: [3, height, width] in [-1, 1]."""
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path} not found")
    img = Image.open(path).convert("RGB")
    scale = max(height / img.height, width / img.width)
    size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(size, Image.BICUBIC)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    img = img.crop((left, top, left + width, top + height))
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()
    return x / 127.5 - 1


def to_uint8_frames(video: Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] for write_mp4."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


def run(cfg) -> list[str]:
    """The CLI body (cfg: the composed ``configs/sample.yaml``); returns the mp4 paths written."""
    pipeline = read_pipeline(cfg.ckpt, trust=cfg.trust_checkpoint)
    vae_path = cfg.vae or pipeline.get("vae")
    encoder_name = cfg.text_encoder or pipeline.get("text_encoder")
    if not vae_path:
        raise ValueError(f"no VAE known for ckpt={cfg.ckpt} (no dit/{PIPELINE_NAME}): pass vae=<VAE folder>")
    if not encoder_name:
        raise ValueError(f"no text encoder known for ckpt={cfg.ckpt}: pass text_encoder=minilm|<T5 dir>")
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    prompts = [cfg.prompt] if isinstance(cfg.prompt, str) else list(cfg.prompt)
    vae = load_vae(vae_path, trust=cfg.trust_checkpoint).to(device).eval()
    check_decoding_vae(vae, vae_path, pipeline, allow_identity=cfg.allow_identity_latent_stats,
                       allow_mismatch=cfg.allow_latent_stats_mismatch)
    dit = load_dit(cfg.ckpt, trust=cfg.trust_checkpoint, lora=cfg.lora, lora_scale=cfg.lora_scale)
    dit = dit.to(device).eval()
    text_encoder = text_encoders.build_text_encoder(encoder_name, device=device)
    images, image_encoder, image_paths = None, None, []
    if cfg.image:
        image_paths = [cfg.image] if isinstance(cfg.image, str) else list(cfg.image)
        if len(image_paths) == 1:
            image_paths = image_paths * len(prompts)
        if len(image_paths) != len(prompts):
            raise ValueError(f"{len(image_paths)} images for {len(prompts)} prompts: give one, or one per prompt")
        images = torch.stack([load_image(p, cfg.height, cfg.width) for p in image_paths]).to(device)
        if dit.image_dim is not None:
            name = cfg.image_encoder or (pipeline.get("i2v") or {}).get("image_encoder")
            if not name:
                raise ValueError(f"this DiT takes image tokens: pass image_encoder=<CLIP vision dir> "
                                 f"(ckpt={cfg.ckpt} records none)")
            image_encoder = build_image_encoder(name, device=device)
    videos = generate(
        dit, vae, text_encoder, prompts, cfg.num_frames, cfg.height, cfg.width, steps=cfg.steps,
        solver=cfg.solver, cfg_scale=cfg.cfg_scale, seed=cfg.seed, shift=cfg.shift,
        negative_prompt=cfg.negative_prompt, flow=pipeline.get("flow"), images=images,
        image_encoder=image_encoder, image_cfg_scale=cfg.image_cfg_scale,
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (prompt, video) in enumerate(zip(prompts, videos)):
        slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:48] or "empty"
        path = out / f"{i:03d}_seed{cfg.seed + i}_{slug}.mp4"
        write_mp4(to_uint8_frames(video), path, fps=cfg.fps)
        # What it takes to draw this video again: `python -m vidgen.sample` with these fields.
        sidecar = dict(
            prompt=prompt, negative_prompt=cfg.negative_prompt, seed=cfg.seed + i, solver=cfg.solver,
            steps=cfg.steps, cfg_scale=cfg.cfg_scale, shift=cfg.shift, num_frames=cfg.num_frames,
            height=cfg.height, width=cfg.width, fps=cfg.fps, checkpoint=str(Path(cfg.ckpt).resolve()),
            vae=str(vae_path), text_encoder=str(encoder_name), flow=pipeline.get("flow"),
            lora=str(Path(cfg.lora).resolve()) if cfg.lora else None, lora_scale=cfg.lora_scale,
        )
        if images is not None:
            sidecar.update(image=str(Path(image_paths[i]).resolve()), image_cfg_scale=cfg.image_cfg_scale)
        path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
        paths.append(str(path))
        print(path)
    return paths


def main() -> None:
    import hydra

    register_resolvers()
    config_dir = str(Path(__file__).resolve().parents[1] / "configs")
    hydra.main(version_base="1.3", config_path=config_dir, config_name="sample")(run)()


if __name__ == "__main__":
    main()
