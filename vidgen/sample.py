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

Function API (evaluation uses it)::

    videos = generate(dit, vae, text_encoder, captions, num_frames=17, height=64, width=64,
                      steps=30, solver="euler", cfg_scale=5.0, seed=0)   # [B, 3, T, H, W] in [-1, 1]

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
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vidgen.diffusion.generate import PIPELINE_NAME, generate_latents, sampling_shift


def check_latent_grid(latent_shape: Sequence[int], patch_size: Sequence[int], height: int, width: int, vae):
    """Raise when the latent (t, h, w) is not divisible by the DiT patch (names valid sizes)."""
    _, t, h, w = latent_shape
    pt, ph, pw = patch_size
    s = vae.spatial_compression
    bad = []
    if t % pt:
        bad.append(f"latent frames {t} not a multiple of {pt}")
    if h % ph or w % pw:
        bad.append(f"height/width must be multiples of {s * ph}/{s * pw} pixels "
                   f"(VAE {s}x times patch {ph}x{pw}), got {height}x{width}")
    if bad:
        raise ValueError("; ".join(bad))


@torch.no_grad()
def generate(
    dit,
    vae,
    text_encoder,
    captions: Sequence[str],
    num_frames: int,
    height: int,
    width: int,
    steps: int = 30,
    solver: str = "euler",
    cfg_scale: float = 5.0,
    seed: int = 0,
    shift: float | None = None,
    negative_prompt: str = "",
    flow: dict | None = None,
    images: Tensor | None = None,
    image_encoder=None,
    image_cfg_scale: float = 1.0,
) -> Tensor:
    """Text (and image) to video: [B, 3, num_frames, height, width] in [-1, 1] (float32, on the
    DiT's device).

    ``images``: [B, 3, height, width] in [-1, 1], the first frames of an I2V DiT (required
    exactly when the DiT has conditioning channels); ``image_encoder`` gives their tokens
    (required exactly when the DiT has ``image_dim``).
    ``num_frames`` must be a length the VAE decodes to (1 + 4k for the Wan VAE; the error
    names the nearest valid ones), height / width multiples of VAE compression x patch size.
    ``shift``: schedule shift; None derives it from the training ``flow`` settings (see
    ``sampling_shift``), 1.0 when those are unknown.
    """
    if isinstance(captions, str) or not captions:
        raise ValueError("captions must be a non-empty list of strings")
    latent_shape = vae.latent_shape(num_frames, height, width)  # validates the frame count
    if latent_shape[0] != dit.out_channels:
        raise ValueError(
            f"the VAE makes {latent_shape[0]}-channel latents but the DiT expects {dit.out_channels}"
        )
    cond, image_tokens = i2v_inputs(dit, vae, image_encoder, images, len(captions), num_frames, height, width)
    check_latent_grid(latent_shape, dit.patch_size, height, width, vae)
    if text_encoder.dim != dit.config["text_dim"]:
        raise ValueError(
            f"the text encoder gives {text_encoder.dim}-d embeddings, the DiT expects "
            f"text_dim={dit.config['text_dim']}: use the encoder it was trained with"
        )
    from vidgen.text import trim_padding

    emb, mask = text_encoder.encode([*captions, negative_prompt])
    texts = trim_padding(emb.float(), mask)
    if shift is None:
        tokens = math.prod(n // p for n, p in zip(latent_shape[1:], dit.patch_size))
        shift = sampling_shift(flow, tokens)
    z = generate_latents(
        dit, texts[:-1], texts[-1], latent_shape, steps=steps, solver=solver,
        cfg_scale=cfg_scale, shift=shift, seed=seed, cond=cond, image=image_tokens,
        image_cfg_scale=image_cfg_scale,
    )
    vae_device = next(vae.parameters()).device
    video = vae.decode(vae.denormalize(z.to(vae_device)))
    return video.float().clamp(-1, 1)


def i2v_inputs(dit, vae, image_encoder, images, batch, num_frames, height, width):
    """(cond, image tokens) of the first frames ``images`` for an I2V DiT; (None, None) for T2V."""
    if not dit.cond_channels:
        if images is not None:
            raise ValueError("image= given but this DiT is text-to-video (no conditioning channels)")
        return None, None
    if images is None:
        raise ValueError("this DiT is image-to-video: pass image=<png | jpg> (the first frame)")
    if tuple(images.shape) != (batch, 3, height, width):
        raise ValueError(f"images must be [B={batch}, 3, {height}, {width}], got {tuple(images.shape)}")
    if (image_encoder is None) != (dit.image_dim is None):
        raise ValueError(f"this DiT takes image tokens of width {dit.image_dim}; image encoder: "
                         f"{'none' if image_encoder is None else image_encoder.dim}")
    from vidgen.i2v import encode_condition

    vae_device = next(vae.parameters()).device
    video = images.to(vae_device).float()[:, :, None].expand(-1, -1, num_frames, -1, -1)
    cond = encode_condition(vae, video)
    if cond.shape[1] != dit.cond_channels:
        raise ValueError(f"the VAE makes a {cond.shape[1]}-channel condition, the DiT takes "
                         f"{dit.cond_channels}")
    tokens = None if image_encoder is None else image_encoder.encode(images.to(vae_device))
    return cond, tokens


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


def read_pipeline(ckpt: str | os.PathLike, trust: bool = False) -> dict:
    """The pipeline.json next to an exported DiT (run folder or dit/ folder), or the record a
    .ckpt keeps (loaded weights-only unless ``trust``); {} when there is neither."""
    from vidgen.utils.checkpoint import load_checkpoint_file

    path = Path(ckpt)
    for candidate in (path / "dit" / PIPELINE_NAME, path / PIPELINE_NAME):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    if path.is_file():
        ckpt_data = load_checkpoint_file(path, trust=trust)
        return dict(ckpt_data.get("vidgen", {}).get("pipeline") or {})
    return {}


def recorded_latent_stats(pipeline: dict) -> tuple[dict, str] | None:
    """({"mean", "std"}, where they were read) the DiT's latents were normalised with, or None.

    Training records them in pipeline.json (``latent_stats``); older exports only name the
    latents folder, whose ``latents_info.json`` holds the encoding VAE's config.
    """
    from vidgen.data.latents import INFO_NAME

    if pipeline.get("latent_stats"):
        rec = pipeline["latent_stats"]
        return dict(mean=rec["mean"], std=rec["std"]), f"{PIPELINE_NAME}, from {rec.get('source')}"
    info = Path(pipeline["latents"]) / INFO_NAME if pipeline.get("latents") else None
    if info is not None and info.is_file():
        vae_config = json.loads(info.read_text())["vae_config"]
        return dict(mean=vae_config["latents_mean"], std=vae_config["latents_std"]), str(info)
    return None


def check_decoding_vae(
    vae, vae_ref: str | os.PathLike, pipeline: dict, *, allow_identity: bool, allow_mismatch: bool
) -> None:
    """Refuse a VAE whose latent statistics are the defaults or differ from the DiT's latents'.

    The opt-outs are ``allow_latent_stats_mismatch`` / ``allow_identity_latent_stats``.
    """
    from vidgen.models.vae.stats import check_not_identity, check_same_stats, stats_of

    stats = stats_of(vae)
    recorded = recorded_latent_stats(pipeline)
    if recorded is not None:
        trained = pipeline.get("vae")
        if trained and os.path.abspath(trained) == os.path.abspath(vae_ref):
            fix = ("Its statistics changed after the latents were made (latent_stats ran on it "
                   "again?): restore them, or re-encode the latents with it and retrain the DiT")
        else:
            fix = (f"Decode with the VAE the DiT's latents were made with ({trained}: drop or "
                   "change vae=), or re-encode the latents with this VAE and retrain the DiT")
        check_same_stats(*recorded, stats, vae_ref, allow=allow_mismatch, fix=fix)
    check_not_identity(stats, vae_ref, allow=allow_identity)


def run(cfg) -> list[str]:
    """The CLI body (cfg: the composed ``configs/sample.yaml``); returns the mp4 paths written."""
    from vidgen.data.video import write_mp4
    from vidgen.models.dit import load_dit
    from vidgen.models.vae import load_vae
    from vidgen.text import build_text_encoder

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
    text_encoder = build_text_encoder(encoder_name, device=device)
    images, image_encoder, image_paths = None, None, []
    if cfg.image:
        image_paths = [cfg.image] if isinstance(cfg.image, str) else list(cfg.image)
        if len(image_paths) == 1:
            image_paths = image_paths * len(prompts)
        if len(image_paths) != len(prompts):
            raise ValueError(f"{len(image_paths)} images for {len(prompts)} prompts: give one, or one per prompt")
        images = torch.stack([load_image(p, cfg.height, cfg.width) for p in image_paths]).to(device)
        if dit.image_dim is not None:
            from vidgen.image_encoder import build_image_encoder

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

    from vidgen.utils.rundir import register_resolvers

    register_resolvers()
    config_dir = str(Path(__file__).resolve().parents[1] / "configs")
    hydra.main(version_base="1.3", config_path=config_dir, config_name="sample")(run)()


if __name__ == "__main__":
    main()
