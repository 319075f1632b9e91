"""Convert DiT checkpoints between diffusers ``WanTransformer3DModel`` and our ``WanDiT``.

    python -m vidgen.tools.convert_dit --from-diffusers Wan2.1-T2V-1.3B-Diffusers/transformer --out ckpt/wan_1.3b
    python -m vidgen.tools.convert_dit --to-diffusers ckpt/wan_1.3b --out export/transformer
    python -m vidgen.tools.convert_dit --expand-t2v ckpt/wan_1.3b --out ckpt/wan_1.3b_i2v [--image-dim 1280]

diffusers side: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (or the sharded
``.safetensors.index.json`` form). Ours: ``config.json`` + ``model.safetensors`` as written
by ``WanDiT.save_pretrained``. Tensors are renamed only, never reshaped or cast (pass
``--dtype`` to cast), so a round trip is bit-exact. Text-to-video and Wan2.1 image-to-video
models convert (I2V: ``in_channels=36``, ``image_dim`` / ``added_kv_proj_dim`` set, the CLIP
projector ``condition_embedder.image_embedder`` and the ``attn2.add_k_proj`` / ``add_v_proj``
/ ``norm_added_k`` image branch); first-last-frame models (``pos_embed_seq_len``) are refused.

diffusers' I2V model takes the image tokens and the text in one sequence and cuts it at
``len - 512``: text must be padded to 512 tokens there (Wan's convention); ``WanDiT`` takes
``image=`` separately.

Text convention: Wan2.1 (its own code, and diffusers' ``WanPipeline`` with the default
``max_sequence_length=512``) zero-pads every prompt embedding to 512 tokens and attends to all
of them. ``--from-diffusers`` stores that as ``text_len: 512`` in our config (``--text-len``
changes it; ``none`` means exact tokens with a mask, as models trained here use), and every
path through ``WanDiT`` then pads the same way. ``--to-diffusers`` records ``text_len`` as
``_vidgen_text_len`` (diffusers ignores ``_`` keys) so that converting back keeps it, and warns
when diffusers' pipeline would feed the model differently.

Time convention: diffusers takes ``timestep`` in [0, 1000], we take flow time t in [0, 1];
``diffusers(x, 1000 * t, ctx) == ours(x, t, ctx)``.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import torch

from vidgen.models.dit.model import WanDiT, expand_t2v
from vidgen.models.dit.names import from_diffusers_name, to_diffusers_name
from vidgen.models.export import CONFIG_NAME, WEIGHTS_NAME

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"
WAN_TEXT_LEN = 512  # Wan2.1's text_len; WanPipeline's max_sequence_length default
TEXT_LEN_KEY = "_vidgen_text_len"  # our text_len in a diffusers config (None: masked)

# --------------------------------------------------------------------------------------
# Config and state-dict mapping (pure functions)
# --------------------------------------------------------------------------------------


def config_from_diffusers(cfg: dict) -> dict:
    """diffusers WanTransformer3DModel config -> WanDiT kwargs (``text_len`` 512, Wan's, unless
    the config came from ``config_to_diffusers`` and records another)."""
    if cfg.get("pos_embed_seq_len") is not None:
        raise ValueError(
            f"pos_embed_seq_len={cfg['pos_embed_seq_len']!r}: first-last-frame (FLF2V) Wan "
            "checkpoints are not supported (text- and image-to-video are)"
        )
    heads, head_dim = cfg.get("num_attention_heads", 40), cfg.get("attention_head_dim", 128)
    image = {}
    if cfg.get("image_dim") is not None or cfg.get("added_kv_proj_dim") is not None:
        image = dict(image_dim=cfg.get("image_dim"), added_kv_proj_dim=cfg.get("added_kv_proj_dim"))
    return dict(
        **image,
        in_channels=cfg.get("in_channels", 16),
        out_channels=cfg.get("out_channels") or cfg.get("in_channels", 16),
        patch_size=list(cfg.get("patch_size", (1, 2, 2))),
        dim=heads * head_dim,
        ffn_dim=cfg.get("ffn_dim", 13824),
        num_heads=heads,
        num_layers=cfg.get("num_layers", 40),
        text_dim=cfg.get("text_dim", 4096),
        freq_dim=cfg.get("freq_dim", 256),
        # diffusers builds q/k RMSNorm whatever its qk_norm string says, so the weights exist.
        qk_norm=True,
        cross_attn_norm=cfg.get("cross_attn_norm", True),
        eps=cfg.get("eps", 1e-6),
        text_len=cfg[TEXT_LEN_KEY] if TEXT_LEN_KEY in cfg else WAN_TEXT_LEN,
    )


def config_to_diffusers(cfg: dict) -> dict:
    """WanDiT kwargs -> diffusers WanTransformer3DModel config."""
    if not cfg.get("qk_norm", True):
        raise ValueError(
            "qk_norm=False has no diffusers equivalent (WanTransformer3DModel always normalises q/k)"
        )
    if cfg.get("rope_theta", 10000.0) != 10000.0:
        raise ValueError(
            f"rope_theta={cfg['rope_theta']} has no diffusers equivalent (fixed at 10000)"
        )
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(cfg["patch_size"]),
        "num_attention_heads": cfg["num_heads"],
        "attention_head_dim": cfg["dim"] // cfg["num_heads"],
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "text_dim": cfg["text_dim"],
        "freq_dim": cfg["freq_dim"],
        "ffn_dim": cfg["ffn_dim"],
        "num_layers": cfg["num_layers"],
        "cross_attn_norm": cfg["cross_attn_norm"],
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg["eps"],
        "image_dim": cfg.get("image_dim"),
        "added_kv_proj_dim": cfg.get("added_kv_proj_dim"),
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
        TEXT_LEN_KEY: cfg.get("text_len"),
    }


def state_dict_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        from_diffusers_name(k): v for k, v in state.items() if not k.endswith("norm_added_q.weight")
    }


def state_dict_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {to_diffusers_name(k): v for k, v in state.items()}


# --------------------------------------------------------------------------------------
# Directory conversion
# --------------------------------------------------------------------------------------


def _load_diffusers_dir(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{config_path} not found: expected a diffusers WanTransformer3DModel directory"
        )
    with open(config_path) as f:
        config = json.load(f)
    if os.path.isfile(os.path.join(path, DIFFUSERS_WEIGHTS)):
        files = [DIFFUSERS_WEIGHTS]
    elif os.path.isfile(os.path.join(path, DIFFUSERS_INDEX)):
        with open(os.path.join(path, DIFFUSERS_INDEX)) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        raise FileNotFoundError(f"neither {DIFFUSERS_WEIGHTS} nor {DIFFUSERS_INDEX} in {path}")
    state = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return config, state


def from_diffusers(
    src: str, out: str, dtype: torch.dtype | None = None, text_len: int | None | str = "auto"
) -> WanDiT:
    """Convert a diffusers WanTransformer3DModel directory into a WanDiT directory.

    text_len: "auto" (512, or what ``config_to_diffusers`` recorded), an int, or None (masked).
    """
    config, state = _load_diffusers_dir(src)
    if config.get("_class_name", "WanTransformer3DModel") != "WanTransformer3DModel":
        raise ValueError(
            f"{src} holds a {config['_class_name']!r}, expected 'WanTransformer3DModel'"
        )
    kwargs = config_from_diffusers(config)
    if text_len != "auto":
        kwargs["text_len"] = text_len
    with torch.device("meta"):
        model = WanDiT(**kwargs)
    state = state_dict_from_diffusers(state)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.save_pretrained(out)
    return model


def to_diffusers(src: str, out: str, dtype: torch.dtype | None = None):
    """Convert a WanDiT directory into a diffusers WanTransformer3DModel directory."""
    from safetensors.torch import save_file

    model = WanDiT.from_pretrained(src, dtype=dtype)
    config = config_to_diffusers(model.config)
    text_len = model.config.get("text_len")
    if text_len != WAN_TEXT_LEN:
        how = ("attends to exact tokens with a mask, which diffusers' WanTransformer3DModel cannot: "
               "its WanPipeline pads prompts to max_sequence_length and attends to the padding"
               if text_len is None else f"pads to {text_len} tokens: call WanPipeline with "
               f"max_sequence_length={text_len}")
        warnings.warn(f"{src}: this DiT {how}", stacklevel=2)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    state = {k: v.contiguous() for k, v in state_dict_to_diffusers(model.state_dict()).items()}
    save_file(state, os.path.join(out, DIFFUSERS_WEIGHTS), metadata={"format": "pt"})


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--from-diffusers", metavar="DIR", help="diffusers WanTransformer3DModel directory"
    )
    direction.add_argument(
        "--to-diffusers", metavar="DIR", help=f"WanDiT directory ({CONFIG_NAME} + {WEIGHTS_NAME})"
    )
    direction.add_argument(
        "--expand-t2v", metavar="DIR",
        help="WanDiT text-to-video directory -> an I2V WanDiT that predicts as it does (vidgen.models.dit.expand_t2v)",
    )
    parser.add_argument("--image-dim", type=int, default=None, help="--expand-t2v: image-token width")
    parser.add_argument(
        "--text-len", default="auto", metavar="N|none",
        help=f"--from-diffusers: text convention of the converted model: N tokens zero-padded (Wan: "
        f"{WAN_TEXT_LEN}), or none (exact tokens with a mask). Default: {WAN_TEXT_LEN}, or what "
        "--to-diffusers recorded",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)"
    )
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.expand_t2v:
        model = expand_t2v(WanDiT.from_pretrained(args.expand_t2v, dtype=dtype), image_dim=args.image_dim)
        model.save_pretrained(args.out)
    elif args.from_diffusers:
        text_len = args.text_len
        if text_len != "auto":
            text_len = None if text_len.lower() == "none" else int(text_len)
        from_diffusers(args.from_diffusers, args.out, dtype, text_len)
    else:
        to_diffusers(args.to_diffusers, args.out, dtype)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
