"""Building blocks of the Wan2.1 causal VAE: causal conv, RMS norm, residual, attention, resample.

Every block takes `x: [B, C, T, H, W]` and an optional `cache`:

- `cache is None`: the whole-clip path. Time is zero-padded on the left, so frame t only
  sees frames <= t.
- `cache` a dict: the chunked path. The clip arrives in consecutive chunks; each layer that
  looks back in time stores what it needs of its past under its own module object
  (`cache[self]`), so a chunk sees exactly the frames the whole-clip path would have shown it.
  Keys are modules, never positions in a global counter, so a block can be re-run (activation
  checkpointing) without shifting everyone else's state.

Module and parameter names mirror diffusers' `AutoencoderKLWan` (conv_in, down_blocks,
mid_block.resnets / attentions, up_blocks[i].upsamplers[0], norm_out, conv_out,
resample.1, time_conv, norm1 / conv1 / norm2 / conv2 / conv_shortcut, gamma) so importing
or exporting its weights is a key-for-key copy.

A 2D (image) model is the same network with temporal kernel size 1 (`kt=1`) and only
`downsample2d` / `upsample2d` resampling: every frame is processed on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Cache = dict[nn.Module, torch.Tensor] | None


def run_block(fn: Callable, x: torch.Tensor, cache: Cache, checkpointing: bool) -> torch.Tensor:
    """Call `fn(x, cache)`, optionally under activation checkpointing.

    With a cache, the recomputation in backward must read the history as it was *before*
    this call, not what the call wrote. So the block runs on a private copy of the (small)
    cache dict: the original forward and the recomputation both start from the same snapshot,
    and only the original forward's writes are published to the caller's cache.
    """
    if not (checkpointing and torch.is_grad_enabled()):
        return fn(x, cache)
    if cache is None:
        return checkpoint(fn, x, None, use_reentrant=False)
    snapshot = dict(cache)

    def run(x):
        local = dict(snapshot)
        return fn(x, local), local

    out, written = checkpoint(run, x, use_reentrant=False)
    cache.update(written)
    return out


def _frames_to_images(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W] (frame-major, as diffusers does)."""
    return x.transpose(1, 2).flatten(0, 1)


def _images_to_frames(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[B*T, C, H, W] -> [B, C, T, H, W]."""
    return x.unflatten(0, (batch, -1)).transpose(1, 2)


# --------------------------------------------------------------------------- primitives


class CausalConv3d(nn.Conv3d):
    """Stride-1 Conv3d, zero-padded on the left in time and symmetrically in space.

    kernel (kt, kh, kw): output frame t sees input frames t-kt+1 .. t. With a cache the
    layer keeps its last kt-1 input frames (2 for the usual kt=3) under `cache[self]`;
    a missing entry means "start of the clip", i.e. zero history.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int, int]):
        kt, kh, kw = kernel_size
        super().__init__(in_channels, out_channels, kernel_size, padding=(0, kh // 2, kw // 2))
        self.history = kt - 1

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        """x: [B, Cin, T, H, W] -> [B, Cout, T, H, W]."""
        k = self.history
        if k > 0:
            if cache is None:
                x = F.pad(x, (0, 0, 0, 0, k, 0))
            else:
                past = cache.get(self)
                if past is None:
                    past = x.new_zeros(x.shape[0], x.shape[1], k, *x.shape[3:])
                x = torch.cat([past, x], dim=2)
                # clone: a slice would keep the whole chunk's storage alive in the cache
                cache[self] = x[:, :, -k:].clone()
        return super().forward(x)


def _rms_norm(x, gamma, bias, scale: float, silu: bool) -> torch.Tensor:
    low = x.dtype in (torch.float16, torch.bfloat16)
    y = F.normalize(x.float() if low else x, dim=1).to(x.dtype) * scale * gamma
    y = y if bias is None else y + bias
    return F.silu(y) if silu else y


class _RMSNormSiLU(torch.autograd.Function):
    """silu(rms_norm(x)) that saves only x for backward and recomputes the rest there.

    Plain autograd keeps two more full-size tensors per norm + SiLU (the scaled normalised
    x and the SiLU input) besides x; a residual block has two such pairs. Recomputing them
    costs a few cheap elementwise ops and cuts the training step's peak memory by about a
    third (bench/bench_vae.py).
    """

    @staticmethod
    def forward(ctx, x, gamma, bias, scale):
        ctx.scale = scale
        ctx.save_for_backward(x, gamma, bias)
        return _rms_norm(x, gamma, bias, scale, silu=True)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        inputs = [
            t.detach().requires_grad_(need) if t is not None else None
            for t, need in zip(saved, ctx.needs_input_grad)
        ]
        with torch.enable_grad():
            y = _rms_norm(*inputs, ctx.scale, silu=True)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, grad))
        return (*(next(grads) if t is not None and t.requires_grad else None for t in inputs), None)


class RMSNorm(nn.Module):
    """RMS norm over channels (dim 1) with a learned per-channel gain (and optional bias).

    Normalising over channels only (not over time like GroupNorm) keeps the encoder causal.
    `ndim` is the rank of the input: 5 for [B, C, T, H, W], 4 for [N, C, H, W].
    y = x / ||x||_C * sqrt(C) * gamma + bias, computed in fp32 for half-precision inputs.
    """

    def __init__(self, dim: int, ndim: int = 5, bias: bool = False):
        super().__init__()
        shape = (dim,) + (1,) * (ndim - 2)
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        """x: [B, C, ...] -> same shape; silu=True fuses the following SiLU (memory-lean)."""
        if silu and torch.is_grad_enabled():
            return _RMSNormSiLU.apply(x, self.gamma, self.bias, self.scale)
        return _rms_norm(x, self.gamma, self.bias, self.scale, silu)


# --------------------------------------------------------------------------- blocks


class ResidualBlock(nn.Module):
    """norm-SiLU-conv-norm-SiLU-dropout-conv plus a (1x1x1 conv when widths differ) shortcut."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0, kt: int = 3):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, (kt, 3, 3))
        self.norm2 = RMSNorm(out_dim)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_dim, out_dim, (kt, 3, 3))
        self.conv_shortcut = (
            CausalConv3d(in_dim, out_dim, (1, 1, 1)) if in_dim != out_dim else nn.Identity()
        )

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        """x: [B, in_dim, T, H, W] -> [B, out_dim, T, H, W]."""
        h = self.conv1(self.norm1(x, silu=True), cache)
        h = self.conv2(self.dropout(self.norm2(h, silu=True)), cache)
        return h + self.conv_shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (never across frames)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, ndim=4)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        # As in Wan2.1: the block starts as the identity (plus the bias), which matters
        # when training from scratch.
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        """x: [B, C, T, H, W] -> same shape. Stateless in time, so `cache` is unused."""
        b, c, t, h, w = x.shape
        frames = _frames_to_images(x)  # [BT, C, H, W]
        qkv = self.to_qkv(self.norm(frames)).flatten(2).transpose(1, 2)  # [BT, HW, 3C]
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # each [BT, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        return x + _images_to_frames(self.proj(out), b)


RESAMPLE_MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")


class Resample(nn.Module):
    """2x spatial down/upsampling, optionally with 2x temporal down/upsampling.

    The first frame of a clip is special in time (it is compressed spatially only):

    - downsample3d (spatial first, then time): out[0] = in[0]; out[j] = time_conv over input
      frames (2j-2, 2j-1, 2j) (kernel 3, stride 2, no padding). T = 1+2m -> 1+m.
    - upsample3d (time first, then spatial): out[0] = in[0]; every later frame i becomes two
      frames, the two channel halves of a causal kernel-3 conv over frames 1.. (zero history
      before frame 1; frame 0 never enters it). T = 1+m -> 1+2m.

    The whole-clip path and the chunked path run this same rule. The chunked path keeps under
    `cache[self]` the frames the next window needs (downsample: 1-2 frames not yet consumed;
    upsample: the last 2 inputs); a missing entry means this chunk starts the clip.
    upsample convs output dim // 2 channels, as in Wan2.1.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in RESAMPLE_MODES:
            raise ValueError(f"Resample mode must be one of {RESAMPLE_MODES}, got {mode!r}")
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                nn.Conv2d(dim, dim // 2, 3, padding=1),
            )
        else:
            # pad right/bottom only: a stride-2 3x3 conv then covers pixels (2i, 2i+1, 2i+2)
            self.resample = nn.Sequential(
                nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2)
            )
        if mode == "upsample3d":
            self.time_conv = nn.Conv3d(dim, dim * 2, (3, 1, 1))
        elif mode == "downsample3d":
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        """x: [B, C, T, H, W] -> [B, C', T', H*2 or H/2, W*2 or W/2] (T' per the rules above)."""
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)
        x = _images_to_frames(self.resample(_frames_to_images(x)), x.shape[0])
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return x

    def _upsample_time(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        starts_clip = cache is None or self not in cache
        head = x[:, :, :1] if starts_clip else None
        rest = x[:, :, 1:] if starts_clip else x
        past = rest.new_zeros(*rest.shape[:2], 2, *rest.shape[3:]) if starts_clip else cache[self]
        seq = torch.cat([past, rest], dim=2)
        if cache is not None:
            cache[self] = seq[:, :, -2:].clone()
        if rest.shape[2] == 0:
            return head
        y = self.time_conv(seq)  # [B, 2C, T_rest, H, W]
        b, c2, t = y.shape[:3]
        # channel half 0 -> frame 2i, half 1 -> frame 2i+1
        y = (
            y.unflatten(1, (2, c2 // 2))
            .permute(0, 2, 3, 1, 4, 5)
            .reshape(b, c2 // 2, 2 * t, *y.shape[3:])
        )
        return y if head is None else torch.cat([head, y], dim=2)

    def _downsample_time(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        starts_clip = cache is None or self not in cache
        head = x[:, :, :1] if starts_clip else None
        seq = x if starts_clip else torch.cat([cache[self], x], dim=2)
        windows = (seq.shape[2] - 1) // 2  # windows start at 0, 2, 4, ... and need 3 frames
        if cache is not None:
            cache[self] = seq[:, :, 2 * windows :].clone()  # the next window starts here
        if windows == 0:
            return head if head is not None else x[:, :, :0]
        y = self.time_conv(seq[:, :, : 2 * windows + 1])
        return y if head is None else torch.cat([head, y], dim=2)

    @torch.no_grad()
    def init_time_identity_(self) -> None:
        """Set time_conv to frame repetition (upsample) / keep-the-newest-frame (downsample).

        Used by 2D->3D inflation: with it, a 3D model whose spatial layers came from a 2D model
        maps every frame as the 2D model would.
        """
        if not hasattr(self, "time_conv"):
            return
        w = self.time_conv.weight  # [Cout, C, 3, 1, 1]
        eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
        w.zero_()
        self.time_conv.bias.zero_()
        for half in w.split(w.shape[1], dim=0):  # 1 half (down) or 2 halves (up)
            half[:, :, -1, 0, 0] = eye


# --------------------------------------------------------------------------- containers


class MidBlock(nn.Module):
    """resnet - attention - resnet at the lowest resolution."""

    def __init__(self, dim: int, dropout: float = 0.0, kt: int = 3):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout, kt) for _ in range(2)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: torch.Tensor, cache: Cache = None, checkpointing: bool = False):
        x = run_block(self.resnets[0], x, cache, checkpointing)
        x = run_block(self.attentions[0], x, cache, checkpointing)
        return run_block(self.resnets[1], x, cache, checkpointing)


class UpBlock(nn.Module):
    """num_res_blocks + 1 residual blocks, then an optional Resample (`upsamplers[0]`)."""

    def __init__(self, in_dim, out_dim, num_res_blocks, dropout=0.0, upsample_mode=None, kt=3):
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList(
            [ResidualBlock(i, o, dropout, kt) for i, o in zip(dims[:-1], dims[1:])]
        )
        self.upsamplers = (
            nn.ModuleList([Resample(out_dim, upsample_mode)]) if upsample_mode else None
        )

    def forward(self, x: torch.Tensor, cache: Cache = None, checkpointing: bool = False):
        for block in self.resnets:
            x = run_block(block, x, cache, checkpointing)
        if self.upsamplers is not None:
            x = run_block(self.upsamplers[0], x, cache, checkpointing)
        return x


class Encoder(nn.Module):
    """[B, in_channels, T, H, W] -> [B, out_dim, T', H/s, W/s] (out_dim = 2 * z_dim in the VAE).

    Widths base_dim * [1] + dim_mult; num_res_blocks residual blocks per level (plus an
    attention block after each at the scales in attn_scales: 1.0, 0.5, ...); a Resample
    between levels, temporal where temporal_downsample[i] (and kt > 1).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        base_dim: int,
        out_dim: int,
        dim_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_scales: tuple[float, ...],
        temporal_downsample: tuple[bool, ...],
        dropout: float = 0.0,
        kt: int = 3,
    ):
        super().__init__()
        dims = [base_dim * m for m in (1, *dim_mult)]
        self.conv_in = CausalConv3d(in_channels, dims[0], (kt, 3, 3))
        blocks, scale = [], 1.0
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(d_in, d_out, dropout, kt))
                if scale in attn_scales:
                    blocks.append(AttentionBlock(d_out))
                d_in = d_out
            if i < len(dim_mult) - 1:
                temporal = temporal_downsample[i] and kt > 1
                blocks.append(Resample(d_out, "downsample3d" if temporal else "downsample2d"))
                scale /= 2.0
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1], dropout, kt)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], out_dim, (kt, 3, 3))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = run_block(block, x, cache, ckpt)
        x = self.mid_block(x, cache, ckpt)
        return self.conv_out(self.norm_out(x, silu=True), cache)


class Decoder(nn.Module):
    """[B, z_dim, T', h, w] -> [B, out_channels, T, h*s, w*s], the encoder mirrored.

    Level i has widths dims[i] -> dims[i+1] with dims = base_dim * [m_last, *reversed(dim_mult)];
    every upsample halves the width, so level i > 0 starts from dims[i] // 2. As in diffusers'
    Wan2.1 decoder, attn_scales adds no attention here (the released config uses none).
    """

    def __init__(
        self,
        *,
        z_dim: int,
        base_dim: int,
        out_channels: int,
        dim_mult: tuple[int, ...],
        num_res_blocks: int,
        temporal_upsample: tuple[bool, ...],
        dropout: float = 0.0,
        kt: int = 3,
    ):
        super().__init__()
        dims = [base_dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
        self.conv_in = CausalConv3d(z_dim, dims[0], (kt, 3, 3))
        self.mid_block = MidBlock(dims[0], dropout, kt)
        blocks = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            mode = None
            if i < len(dim_mult) - 1:
                mode = "upsample3d" if temporal_upsample[i] and kt > 1 else "upsample2d"
            blocks.append(
                UpBlock(d_in if i == 0 else d_in // 2, d_out, num_res_blocks, dropout, mode, kt)
            )
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], out_channels, (kt, 3, 3))
        self.gradient_checkpointing = False

    def _head(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        return self.conv_out(self.norm_out(x, silu=True), cache)

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        x = self.conv_in(x, cache)
        x = self.mid_block(x, cache, ckpt)
        for block in self.up_blocks:
            x = block(x, cache, ckpt)
        # the head runs at full resolution: its activations are the largest of all
        return run_block(self._head, x, cache, ckpt)
