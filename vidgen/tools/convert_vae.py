"""Convert VAE checkpoints between diffusers ``AutoencoderKLWan`` (Wan2.1) and our ``WanVAE``.

    python -m vidgen.tools.convert_vae --from-diffusers Wan2.1-T2V-1.3B-Diffusers/vae --out ckpt/wan21_vae
    python -m vidgen.tools.convert_vae --to-diffusers outputs/vae_stage3/<run> --out export/vae

diffusers side: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (or its sharded form,
``diffusion_pytorch_model.safetensors.index.json`` + shards). Ours: ``config.json`` +
``model.safetensors`` as written by ``WanVAE.save_pretrained``; ``--to-diffusers`` also takes a
run folder or a Lightning ``.ckpt`` (EMA weights when the run kept them, unless ``--no-ema``).

Parameter names are the same on both sides, so tensors are copied as they are (never renamed,
reshaped or cast unless ``--dtype`` asks), and a round trip is bit-exact. The per-channel latent
statistics live in diffusers' config.json (``latents_mean`` / ``latents_std``) and in ours both
as buffers in the weights file and in config.json; both sides apply them the same way,
z = (mu - mean) / std.

Config mapping (diffusers -> ours): base_dim, z_dim, dim_mult, num_res_blocks, attn_scales,
dropout, latents_mean, latents_std unchanged; ``temperal_downsample`` (diffusers' spelling) ->
``temporal_downsample``; in_channels (= out_channels) -> in_channels. Refused, because our VAE
cannot represent them: Wan 2.2 VAEs (``is_residual``, ``patch_size``, a ``decoder_base_dim``
other than base_dim), in_channels != out_channels, and, on export, our 2D model
(``temporal=False``) and temporal compressions other than 4 (diffusers' encoder reads clips in
chunks of 1, 4, 4, ... frames, hard-coded) and non-empty attn_scales (diffusers builds the
encoder's attention blocks but cannot run them). Importing such a diffusers model works.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from vidgen.models.export import CONFIG_NAME, WEIGHTS_NAME
from vidgen.models.vae import load_vae
from vidgen.models.vae.vae import WanVAE

DIFFUSERS_CLASS = "AutoencoderKLWan"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"
# Written into exported configs when diffusers itself is not installed: the first release
# that has AutoencoderKLWan.
MIN_DIFFUSERS_VERSION = "0.33.0"
LATENT_BUFFERS = ("latents_mean", "latents_std")

# Keys every AutoencoderKLWan config.json written by diffusers has (the Wan2.1 release included).
_REQUIRED = (
    "base_dim",
    "z_dim",
    "dim_mult",
    "num_res_blocks",
    "attn_scales",
    "temperal_downsample",
    "dropout",
    "latents_mean",
    "latents_std",
)
# Keys later diffusers versions added (for Wan 2.2), with the defaults diffusers gives them.
_OPTIONAL = {
    "decoder_base_dim": None,
    "is_residual": False,
    "in_channels": 3,
    "out_channels": 3,
    "patch_size": None,
    "scale_factor_temporal": None,  # diffusers: 4 / 8, used only by its own tiling
    "scale_factor_spatial": None,
}


# --------------------------------------------------------------------------------------
# Config mapping (pure functions)
# --------------------------------------------------------------------------------------


def config_from_diffusers(cfg: dict) -> dict:
    """diffusers AutoencoderKLWan config -> WanVAE kwargs; ValueError for what we cannot hold."""
    cls = cfg.get("_class_name", DIFFUSERS_CLASS)
    if cls != DIFFUSERS_CLASS:
        raise ValueError(f"config is for a {cls!r}, expected {DIFFUSERS_CLASS!r}")
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in (*_REQUIRED, *_OPTIONAL))
    if unknown:
        raise ValueError(
            f"config keys {unknown} are unknown to this converter; known keys: "
            f"{sorted((*_REQUIRED, *_OPTIONAL))}"
        )
    cfg = {**_OPTIONAL, **cfg}
    wan22 = [
        f"{k}={cfg[k]!r}" for k in ("is_residual", "patch_size") if cfg[k] not in (None, False)
    ]
    if cfg["decoder_base_dim"] not in (None, cfg.get("base_dim")):
        wan22.append(
            f"decoder_base_dim={cfg['decoder_base_dim']!r} != base_dim={cfg.get('base_dim')!r}"
        )
    if wan22:
        raise ValueError(
            f"{', '.join(wan22)}: this is a Wan 2.2-style VAE (residual up/down blocks, "
            "patchified input, wider decoder); WanVAE implements the Wan2.1 architecture only "
            "(is_residual=False, patch_size=None, decoder_base_dim=None or = base_dim)"
        )
    if cfg["in_channels"] != cfg["out_channels"]:
        raise ValueError(
            f"in_channels={cfg['in_channels']} != out_channels={cfg['out_channels']}: WanVAE "
            "reconstructs its input, so it has one channel count for both"
        )
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ValueError(
            f"config lacks {missing}; an AutoencoderKLWan config.json written by diffusers has "
            f"all of {list(_REQUIRED)} (add them; the Wan2.1 release's values are in its "
            "vae/config.json)"
        )
    kwargs = dict(
        base_dim=int(cfg["base_dim"]),
        z_dim=int(cfg["z_dim"]),
        dim_mult=[int(m) for m in cfg["dim_mult"]],
        num_res_blocks=int(cfg["num_res_blocks"]),
        attn_scales=[float(s) for s in cfg["attn_scales"]],
        temporal_downsample=[bool(t) for t in cfg["temperal_downsample"]],
        dropout=float(cfg["dropout"]),
        in_channels=int(cfg["in_channels"]),
        temporal=True,
        latents_mean=[float(v) for v in cfg["latents_mean"]],
        latents_std=[float(v) for v in cfg["latents_std"]],
    )
    for name in LATENT_BUFFERS:
        if len(kwargs[name]) != kwargs["z_dim"]:
            raise ValueError(
                f"{name} has {len(kwargs[name])} values but z_dim={kwargs['z_dim']}: one per "
                "latent channel is needed"
            )
    spatial = 2 ** (len(kwargs["dim_mult"]) - 1)
    temporal = 2 ** sum(kwargs["temporal_downsample"])
    for key, derived in (("scale_factor_spatial", spatial), ("scale_factor_temporal", temporal)):
        if cfg[key] is not None and int(cfg[key]) != derived:
            raise ValueError(
                f"{key}={cfg[key]} contradicts the architecture, which compresses by {derived} "
                f"(dim_mult={kwargs['dim_mult']}, temperal_downsample="
                f"{kwargs['temporal_downsample']})"
            )
    return kwargs


def config_to_diffusers(cfg: dict) -> dict:
    """WanVAE config (``WanVAE.config``) -> diffusers AutoencoderKLWan config.json contents."""
    if not cfg.get("temporal", True):
        raise ValueError(
            "temporal=False: this is our 2D image VAE (stage 1, temporal kernel 1), which has no "
            "diffusers equivalent; inflate it to 3D (vidgen.models.vae.inflate_2d_to_3d, "
            "stage 2) before exporting"
        )
    temporal = 2 ** sum(bool(t) for t in cfg["temporal_downsample"])
    if temporal != 4:
        raise ValueError(
            f"temporal_downsample={list(cfg['temporal_downsample'])} compresses time by "
            f"{temporal}; diffusers' AutoencoderKLWan encodes clips in chunks of 1, 4, 4, ... "
            "frames (hard-coded), so only a temporal compression of 4 (two True flags) "
            "gives the same latents there"
        )
    if cfg["attn_scales"]:
        raise ValueError(
            f"attn_scales={list(cfg['attn_scales'])}: diffusers' AutoencoderKLWan builds these "
            "encoder attention blocks but its encoder cannot run them (it passes them the "
            "causal cache they do not take), and the original Wan2.1 code would add decoder "
            "attention as well; every released Wan VAE uses attn_scales=[]"
        )
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": _diffusers_version(),
        "base_dim": cfg["base_dim"],
        "decoder_base_dim": None,
        "z_dim": cfg["z_dim"],
        "dim_mult": list(cfg["dim_mult"]),
        "num_res_blocks": cfg["num_res_blocks"],
        "attn_scales": list(cfg["attn_scales"]),
        "temperal_downsample": list(cfg["temporal_downsample"]),  # diffusers' spelling
        "dropout": cfg["dropout"],
        "latents_mean": [_short(v) for v in cfg["latents_mean"]],
        "latents_std": [_short(v) for v in cfg["latents_std"]],
        "is_residual": False,
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["in_channels"],
        "patch_size": None,
        "scale_factor_temporal": temporal,
        "scale_factor_spatial": 2 ** (len(cfg["dim_mult"]) - 1),
    }


def _short(v: float) -> float:
    """The shortest decimal that reads back as the same float32 (-0.7571, not -0.75709998...)."""
    return float(str(np.float32(v)))


def _diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return MIN_DIFFUSERS_VERSION


# --------------------------------------------------------------------------------------
# Directory conversion
# --------------------------------------------------------------------------------------


def load_diffusers_dir(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of a diffusers model folder, single-file or sharded safetensors."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{path / CONFIG_NAME} not found: expected a diffusers {DIFFUSERS_CLASS} folder "
            f"({CONFIG_NAME} + {DIFFUSERS_WEIGHTS})"
        )
    config = json.loads((path / CONFIG_NAME).read_text())
    if (path / DIFFUSERS_WEIGHTS).is_file():
        files = [DIFFUSERS_WEIGHTS]
    elif (path / DIFFUSERS_INDEX).is_file():
        weight_map = json.loads((path / DIFFUSERS_INDEX).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        present = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
        raise FileNotFoundError(
            f"neither {DIFFUSERS_WEIGHTS} nor {DIFFUSERS_INDEX} in {path} (weight files there: "
            f"{present or 'none'}; .bin and variant files are not read, re-save as safetensors)"
        )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name)))
    return config, state


def from_diffusers(src: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> WanVAE:
    """Convert a diffusers AutoencoderKLWan folder into a WanVAE folder (save_pretrained layout)."""
    config, state = load_diffusers_dir(src)
    kwargs = config_from_diffusers(config)
    stats = {name: kwargs.pop(name) for name in LATENT_BUFFERS}
    clash = sorted(set(LATENT_BUFFERS) & set(state))
    if clash:
        raise ValueError(f"{src}: weights hold {clash}, which diffusers keeps in config.json")
    # meta: no random init of weights that are overwritten at once (the Wan2.1 VAE is 127M)
    with torch.device("meta"):
        model = WanVAE(**kwargs)
    state = dict(
        state, latents_mean=torch.zeros(kwargs["z_dim"]), latents_std=torch.ones(kwargs["z_dim"])
    )
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{src}: the weights do not fit its config.json: {err}") from err
    model.set_latent_stats(stats["latents_mean"], stats["latents_std"])  # validates them too
    model.save_pretrained(out)
    return model


def to_diffusers(
    src: str | Path, out: str | Path, dtype: torch.dtype | None = None, prefer_ema: bool = True,
    trust: bool = False,
) -> Path:
    """Convert our VAE (folder, run folder or .ckpt) into a diffusers AutoencoderKLWan folder
    (a .ckpt is loaded weights-only unless `trust`)."""
    from safetensors.torch import save_file

    model = load_vae(src, prefer_ema=prefer_ema, trust=trust)
    config = config_to_diffusers(model.config)
    state = {
        k: (v if dtype is None else v.to(dtype)).detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if k not in LATENT_BUFFERS
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(out / DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
    return out


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--from-diffusers",
        metavar="DIR",
        help=f"diffusers {DIFFUSERS_CLASS} folder ({CONFIG_NAME} + {DIFFUSERS_WEIGHTS})",
    )
    direction.add_argument(
        "--to-diffusers",
        metavar="PATH",
        help=f"our VAE: a save_pretrained folder ({CONFIG_NAME} + {WEIGHTS_NAME}), a run "
        "folder with vae/, or a Lightning .ckpt",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)"
    )
    parser.add_argument(
        "--no-ema",
        action="store_true",
        help="--to-diffusers from a .ckpt: export the raw weights, not the EMA ones",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="--to-diffusers from a .ckpt that names code beyond tensors: unpickle it in full, "
        "which runs that code (only for a file you trust as you would a script)",
    )
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.from_diffusers:
        from_diffusers(args.from_diffusers, args.out, dtype)
    else:
        to_diffusers(args.to_diffusers, args.out, dtype, prefer_ema=not args.no_ema,
                     trust=args.trust_checkpoint)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
