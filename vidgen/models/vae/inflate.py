"""Inflate a 2D image WanVAE (stage 1) into the 3D causal WanVAE (stage 2).

Every 2D conv kernel [O, I, 1, kh, kw] goes to the newest temporal tap of the 3D kernel
[O, I, 3, kh, kw] (index -1: causal padding puts the current frame last); the older taps
are zero. Temporal resampling layers, which the 2D model does not have, start as frame
repetition (upsample) and keep-the-newest-frame (downsample). Everything else (norm gains,
attention, 1x1 convs, the 2D parts of the resamplers) is copied as is.

Why the 1-frame clip reproduces the 2D model exactly: the first frame is padded with zero
history, so only the newest tap sees data, and Resample passes frame 0 through its temporal
part untouched. On longer clips the inflated encoder maps frames 0, 4, 8, ... to the 2D
latents of those frames, and the decoder repeats each decoded latent frame 4 times.
"""

from __future__ import annotations

import torch

from vidgen.models.vae.layers import Resample
from vidgen.models.vae.vae import WanVAE

# Config keys that fix parameter shapes: the 3D model must share them with the 2D one.
SHARED_KEYS = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "in_channels")
# Keys the caller may change when inflating.
OVERRIDABLE_KEYS = ("temporal_downsample", "dropout", "latents_mean", "latents_std")


def _normalise(value):
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else value


def inflate_2d_to_3d(vae2d: WanVAE, **overrides) -> WanVAE:
    """A 3D WanVAE with vae2d's widths and weights (see module docstring for the mapping).

    overrides: any of temporal_downsample, dropout, latents_mean, latents_std; shape-defining
    keys (base_dim, z_dim, ...) may be passed only with the 2D model's own values.
    The result is on vae2d's device and dtype, in train mode like a freshly built module.
    """
    if not isinstance(vae2d, WanVAE):
        raise TypeError(f"inflate_2d_to_3d needs a WanVAE, got {type(vae2d).__name__}")
    config = vae2d.config
    if config["temporal"]:
        raise ValueError(
            "inflate_2d_to_3d needs a 2D model (temporal=False); this one is already 3D"
        )
    unknown = sorted(set(overrides) - set(SHARED_KEYS) - set(OVERRIDABLE_KEYS) - {"temporal"})
    if unknown:
        raise ValueError(
            f"unknown WanVAE option(s) {unknown}; inflation accepts {list(OVERRIDABLE_KEYS)}"
        )
    if overrides.get("temporal", True) is not True:
        raise ValueError("inflate_2d_to_3d builds a 3D model; temporal=False cannot be overridden")
    clashes = {
        k: (config[k], overrides[k])
        for k in SHARED_KEYS
        if k in overrides and _normalise(overrides[k]) != _normalise(config[k])
    }
    if clashes:
        detail = ", ".join(f"{k}: 2D has {a}, asked for {b}" for k, (a, b) in clashes.items())
        raise ValueError(
            f"the 3D model must keep the 2D model's widths to inherit its weights; {detail}"
        )

    config.update(overrides, temporal=True)
    vae3d = WanVAE(**config)
    param = next(vae2d.parameters())
    vae3d.to(device=param.device, dtype=param.dtype)

    src = vae2d.state_dict()
    dst = vae3d.state_dict()
    new_only = {name for name in dst if ".time_conv." in name}
    # the latent statistics come through the config (the 2D model's, or the overrides)
    stats = {"latents_mean", "latents_std"}
    if set(src) != set(dst) - new_only:
        raise RuntimeError(  # a bug in WanVAE, not a user error: layouts must line up
            f"2D/3D layouts differ: only in 2D {sorted(set(src) - set(dst))[:5]}, "
            f"only in 3D {sorted(set(dst) - set(src) - new_only)[:5]}"
        )
    with torch.no_grad():
        for name, target in dst.items():
            if name in new_only or name in stats:
                continue
            source = src[name]
            if source.shape == target.shape:
                target.copy_(source)
            elif (
                source.dim() == 5
                and source.shape[2] == 1
                and (source.shape[:2] + source.shape[3:] == target.shape[:2] + target.shape[3:])
            ):
                target.zero_()
                target[:, :, -1] = source[:, :, 0]  # the newest tap
            else:
                raise RuntimeError(
                    f"cannot inflate {name}: 2D {tuple(source.shape)} -> 3D {tuple(target.shape)}"
                )
        for module in vae3d.modules():
            if isinstance(module, Resample):
                module.init_time_identity_()
    return vae3d
