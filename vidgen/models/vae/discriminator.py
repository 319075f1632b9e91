"""3D patch discriminator for VAE stage 3 (GAN fine-tuning).

A PatchGAN (pix2pix / taming-transformers `NLayerDiscriminator`) lifted to video: every
logit judges one spatio-temporal patch of the clip, so the adversarial signal is local and
the model works for any clip size above a small minimum.

Choices and why:
- Kernels are (temporal_kernel, 4, 4). Spatially we use the usual 4x4 / stride 2 / pad 1
  convs (H -> H/2). Temporally the kernel is odd with "same" padding, so a stride-2
  temporal conv maps T -> (T - 1) // 2 + 1 and never reaches zero: 17 -> 9 -> 5 -> 3,
  and a single image (T = 1) stays T = 1. One model then judges stage-3 clips of every
  length, including 1-frame ones.
- No BatchNorm: per-GPU batches in stage 3 are one or two clips, so batch statistics are
  noise and differ between the real and the fake pass. GroupNorm (or nothing) instead.
  The discriminator does not need to be causal, so normalising over time is fine here.
- Optional spectral norm on every conv, for users who want it instead of (or on top of)
  LeCam / R1.
- Init N(0, 0.02) for convs and N(1, 0.02) for norm scales, as in DCGAN / taming.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Discriminator3D"]


def _group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= max_groups that divides `channels`."""
    groups = max(g for g in range(1, max_groups + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


class Discriminator3D(nn.Module):
    """3D convolutional patch discriminator for videos.

    Layout (num_layers = n):
        conv(s=2) -> LReLU
        n - 1 x [conv(s=2) -> norm -> LReLU]
        conv(s=1) -> norm -> LReLU
        conv(s=1) -> 1 channel (logits)
    Channels double per layer from `base_channels`, capped at `max_channels`. Strided
    layers halve H and W and (with temporal_kernel > 1) roughly halve T.

    Args:
        in_channels: channels of the input video (3 for RGB).
        base_channels: width of the first layer.
        num_layers: number of stride-2 layers; each halves H and W.
        max_channels: cap on the width.
        temporal_kernel: odd temporal kernel size; 1 makes the model a per-frame 2D
            discriminator (no temporal mixing, no temporal striding).
        norm: "group" (GroupNorm) or "none".
        spectral_norm: wrap every conv in spectral normalisation.

    Input:  x [B, C, T, H, W] in [-1, 1], T >= 1, H and W >= `min_spatial_size()`.
    Output: logits [B, 1, T', H', W'], see `output_shape` (e.g. T=17, 32x32, n=3 ->
            [B, 1, 3, 2, 2]).
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        num_layers: int = 3,
        max_channels: int = 512,
        temporal_kernel: int = 3,
        norm: str = "group",
        spectral_norm: bool = False,
    ):
        super().__init__()
        if temporal_kernel < 1 or temporal_kernel % 2 == 0:
            raise ValueError(
                f"temporal_kernel must be odd and >= 1 (so T never shrinks to 0), got {temporal_kernel}"
            )
        if norm not in ("group", "none"):
            raise ValueError(
                f"norm must be 'group' or 'none' (no BatchNorm by design), got {norm!r}"
            )
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self.temporal_kernel = temporal_kernel
        t_stride = 2 if temporal_kernel > 1 else 1
        t_pad = temporal_kernel // 2

        def conv(c_in: int, c_out: int, stride: int, t_stride: int, bias: bool) -> nn.Module:
            layer = nn.Conv3d(
                c_in,
                c_out,
                kernel_size=(temporal_kernel, 4, 4),
                stride=(t_stride, stride, stride),
                padding=(t_pad, 1, 1),
                bias=bias,
            )
            return nn.utils.parametrizations.spectral_norm(layer) if spectral_norm else layer

        def norm_act(c: int) -> list[nn.Module]:
            # A conv followed by GroupNorm needs no bias: the norm removes it.
            return ([_group_norm(c)] if norm == "group" else []) + [nn.LeakyReLU(0.2, inplace=True)]

        has_norm = norm == "group"
        width = [min(base_channels * 2**i, max_channels) for i in range(num_layers + 1)]
        layers: list[nn.Module] = [
            # First layer sees raw pixels: no norm (as in pix2pix / taming).
            conv(in_channels, width[0], 2, t_stride, bias=True),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        for i in range(1, num_layers):
            layers += [
                conv(width[i - 1], width[i], 2, t_stride, bias=not has_norm),
                *norm_act(width[i]),
            ]
        layers += [conv(width[num_layers - 1], width[num_layers], 1, 1, bias=not has_norm)]
        layers += norm_act(width[num_layers])
        layers += [conv(width[num_layers], 1, 1, 1, bias=True)]
        self.net = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Conv3d):
            # Under spectral norm `m.weight` is recomputed on access; initialise the
            # stored original instead.
            w = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            nn.init.normal_(w, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ shapes

    def output_shape(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """Logit grid (T', H', W') for an input of T x H x W frames (pure arithmetic)."""
        k_t, pad_t = self.temporal_kernel, self.temporal_kernel // 2
        s_t = 2 if k_t > 1 else 1
        for _ in range(self.num_layers):
            t, h, w = _conv_out(t, k_t, s_t, pad_t), _conv_out(h, 4, 2, 1), _conv_out(w, 4, 2, 1)
        for _ in range(2):  # the two stride-1 layers: T kept, H and W shrink by 1 each
            t, h, w = _conv_out(t, k_t, 1, pad_t), _conv_out(h, 4, 1, 1), _conv_out(w, 4, 1, 1)
        return t, h, w

    def min_spatial_size(self) -> int:
        """Smallest H (= W) that still gives at least one logit."""
        # Inverse of output_shape: the two stride-1 layers need 3 pixels, each stride-2
        # layer maps h -> h // 2, so at least 3 * 2**n pixels are needed.
        return 3 * 2**self.num_layers

    # ----------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, T, H, W] -> patch logits [B, 1, T', H', W'] (unbounded reals)."""
        if x.ndim != 5:
            raise ValueError(
                f"Discriminator3D expects a video [B, C, T, H, W], got shape {tuple(x.shape)}"
            )
        _, _, t, h, w = x.shape
        if min(h, w) < self.min_spatial_size():
            raise ValueError(
                f"Discriminator3D with num_layers={self.num_layers} needs H, W >= "
                f"{self.min_spatial_size()}, got {h}x{w}; use fewer layers or larger crops"
            )
        return self.net(x)

    def extra_repr(self) -> str:
        n_params = sum(p.numel() for p in self.parameters())
        return f"params={n_params / 1e6:.2f}M, min_spatial_size={self.min_spatial_size()}"
