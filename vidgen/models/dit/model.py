"""Wan2.1-style video diffusion transformer (text- and image-to-video), as plain nn.Modules.

    model = WAN_PRESETS["tiny"](text_dim=384)
    v = model(x, t, context)                    # padded batch: x [B, 16, T, H, W]
    vs = model.forward_packed(packed)            # packed samples of different shapes
    i2v = WAN_PRESETS["tiny"](in_channels=36, image_dim=1280)   # Wan2.1 I2V
    v = i2v(x, t, context, cond=cond, image=image)  # cond [B, 20, T, H, W], image [B, 257, 1280]

Block (Wan2.1; parameter names and layout follow diffusers ``WanTransformer3DModel``):
patchify (Conv3d (1, 2, 2) applied as a linear map on patch tokens), then per block
self-attention with q/k RMSNorm and 3D RoPE, cross-attention to the text tokens, GELU-tanh
FFN. The timestep goes through a sinusoidal embedding and one MLP shared by all blocks
that produces 6 modulation vectors (shift/scale/gate for attention and FFN), to which
every block adds its own learned ``scale_shift_table``.

Precision: the time embedding, modulation, norms, gated residual additions and the
residual stream itself stay in fp32 under autocast (as in Wan), only the linear layers
and attention run in the autocast / parameter dtype.

Image-to-video (Wan2.1 I2V): the patch embedding takes ``in_channels = out_channels +
cond_channels``: the noisy latent followed by ``cond`` (the 4-channel first-frame mask and the
VAE latent of the first frame with zero frames after it, see ``vidgen.i2v``). With
``image_dim`` set, image-encoder tokens (CLIP ViT hidden states) go through ``image_embedding``
(Wan's MLPProj) and a second, decoupled cross-attention in every block: its own key/value
projections (``add_k_proj`` / ``add_v_proj``, key RMSNorm ``norm_added_k``) share the text
cross-attention's queries, and the two attention outputs are summed before ``to_out``.

Timesteps: ``t`` is the flow time in [0, 1] (0 = data, 1 = noise); the sinusoidal
embedding sees ``1000 * t``, the convention Wan and diffusers were trained with.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from vidgen.data.packing import (
    PackedBatch,
    grid_positions,
    pad_packed_context,
    patch_grid,
    patchify,
    unpatchify,
)
from vidgen.models.export import load_model, save_model

from .attention import BACKENDS, attention
from .context_parallel import ContextParallel, SequenceShard

TIMESTEP_SCALE = 1000.0  # t in [0, 1] -> Wan's [0, 1000] timestep embedding input


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def fp32_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` computed in fp32 whatever the autocast state or parameter dtype."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


# --------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """t: [S] -> [S, dim] fp32 sinusoidal embedding, cos half first (Wan / diffusers order)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Head-dim channels given to (t, h, w): h and w get 2*(d//6) each, t the rest (Wan)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """positions: [N, 3] (t, h, w) -> cos, sin: [N, head_dim/2] fp32, one angle per channel pair.

    Angles are formed in float64 (as Wan does) so that large positions stay exact.
    """
    angles = []
    for axis, d in enumerate(rope_split(head_dim)):
        inv_freq = 1.0 / theta ** (
            torch.arange(0, d, 2, dtype=torch.float64, device=positions.device) / d
        )
        angles.append(positions[:, axis, None].double() * inv_freq)
    angles = torch.cat(angles, dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (2i, 2i+1) of x: [B, L, H, D] by cos/sin: [L, D/2]."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[None, :, None], sin[None, :, None]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32; returns fp32 (callers modulate in fp32 before casting)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


# --------------------------------------------------------------------------------------
# Core blocks
# --------------------------------------------------------------------------------------


@dataclass
class TokenLayout:
    """How the tokens of x [B, L, dim] are grouped into samples.

    seg_ids: [N] sample index per token when packed (B == 1), None for a padded batch.
    self_attn / cross_attn / image_attn: keyword arguments for ``attention`` (offsets or key
    mask) of the self-attention, the text and the image cross-attention.
    shard: with context parallelism, the plan of this rank's slice of a packed x (the
    offsets then describe the whole sequence; see context_parallel.py).
    """

    seg_ids: Tensor | None
    self_attn: dict
    cross_attn: dict
    image_attn: dict | None = None
    shard: SequenceShard | None = None  # context parallelism: this rank's slice of x

    def per_token(self, v: Tensor) -> Tensor:
        """Per-sample vectors v: [S, dim] -> broadcastable to x: [B, 1, dim] or [1, N, dim]."""
        return v[:, None] if self.seg_ids is None else v[self.seg_ids][None]


class Attention(nn.Module):
    """Multi-head attention with q/k RMSNorm across heads and optional 3D RoPE.

    added_kv_proj_dim: width of image tokens given their own keys/values (I2V cross-attention).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qk_norm: bool = True,
        eps: float = 1e-6,
        added_kv_proj_dim: int | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, dim)
            self.norm_added_k = RMSNorm(dim, eps)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        rope=None,
        image: Tensor | None = None,
        image_attn: dict | None = None,
        shard: SequenceShard | None = None,
        **attn_kwargs,
    ) -> Tensor:
        """x: [B, L, dim]; context: [B, Lc, dim] (None = self-attention) -> [B, L, dim].

        image: [B, Li, added_kv_proj_dim] tokens attended with their own keys/values and the
        same queries; ``image_attn`` are their ``attention`` keyword arguments. shard: x is
        this rank's slice of a context-parallel sequence.
        """
        kv = x if context is None else context
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.to_k(kv)).unflatten(-1, (self.num_heads, -1))
        v = self.to_v(kv).unflatten(-1, (self.num_heads, -1))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        attend = attention if shard is None else partial(shard.attention, kv_local=context is None)
        out = attend(q, k, v, **attn_kwargs)
        if image is not None:
            k_img = self.norm_added_k(self.add_k_proj(image)).unflatten(-1, (self.num_heads, -1))
            v_img = self.add_v_proj(image).unflatten(-1, (self.num_heads, -1))
            attend = attention if shard is None else partial(shard.attention, kv_local=False)
            out = out + attend(q, k_img, v_img, **(image_attn or {}))
        return self.to_out(out.flatten(-2))


class ImageProjection(nn.Module):
    """Wan's MLPProj: image-encoder tokens [B, Li, image_dim] -> [B, Li, dim].

    LayerNorm, Linear, GELU, Linear, LayerNorm; the norms (eps 1e-5, affine) in fp32.
    """

    def __init__(self, image_dim: int, dim: int):
        super().__init__()
        self.norm1 = LayerNorm(image_dim)
        self.fc1 = nn.Linear(image_dim, image_dim)
        self.fc2 = nn.Linear(image_dim, dim)
        self.norm2 = LayerNorm(dim)

    def forward(self, image: Tensor) -> Tensor:
        dtype = self.fc1.weight.dtype
        h = self.fc2(F.gelu(self.fc1(self.norm1(image).to(dtype))))
        return self.norm2(h).to(dtype)


class WanBlock(nn.Module):
    def __init__(
        self,
        dim,
        ffn_dim,
        num_heads,
        qk_norm: bool,
        cross_attn_norm: bool,
        eps: float,
        added_kv_proj_dim: int | None = None,
    ):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = Attention(dim, num_heads, qk_norm, eps)
        self.norm2 = (
            LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        )
        self.cross_attn = Attention(dim, num_heads, qk_norm, eps, added_kv_proj_dim)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim)
        )
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: Tensor,
        e0: Tensor,
        context: Tensor,
        rope,
        layout: TokenLayout,
        image: Tensor | None = None,
    ) -> Tensor:
        """x: [B, L, dim] fp32 stream; e0: [S, 6, dim] fp32 shared modulation; context: [B, Lc, dim];
        image: [B, Li, dim] embedded image tokens (I2V) or None."""
        dtype = self.ffn[0].weight.dtype
        e = (self.scale_shift_table.float() + e0.float()).unbind(1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            layout.per_token(v) for v in e
        )

        h = modulate(self.norm1(x), shift_msa, scale_msa).to(dtype)
        x = x + self.self_attn(h, rope=rope, shard=layout.shard, **layout.self_attn).float() * gate_msa

        h = self.norm2(x).to(dtype)
        x = x + self.cross_attn(
            h, context, image=image, image_attn=layout.image_attn, shard=layout.shard,
            **layout.cross_attn,
        ).float()

        h = modulate(self.norm3(x), shift_mlp, scale_mlp).to(dtype)
        return x + self.ffn(h).float() * gate_mlp


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class WanDiT(nn.Module):
    """Wan2.1 text-to-video (and image-to-video) DiT predicting the flow velocity eps - x0.

    Args:
        in_channels, out_channels: patch-embedding input and output channels: 16 (the Wan
            VAE's latent) for T2V; 36 = 16 noisy + 4 mask + 16 first-frame latent for I2V
            (``cond_channels = in_channels - out_channels`` conditioning channels).
        patch_size: (pt, ph, pw) patch of the Conv3d patchify.
        dim, ffn_dim, num_heads, num_layers: transformer width / depth.
        text_dim: width of the text-encoder embeddings (4096 for umT5-XXL, 384 for MiniLM).
        freq_dim: width of the sinusoidal timestep embedding.
        qk_norm: RMSNorm on q and k (across heads); cross_attn_norm: LayerNorm before cross-attn.
        eps: norm epsilon. rope_theta: RoPE base.
        attn_backend: "auto", "sdpa", "sdpa_mask", "flex" or "flash_varlen" (see attention.py).
        image_dim: width of image-encoder tokens (1280 for Wan's CLIP ViT-H/14); None: no image
            tokens. added_kv_proj_dim: input width of the image keys/values (= dim, the
            default when image_dim is set; diffusers' name).
        text_len: the text convention. None (models trained here): each caption's real tokens,
            attended with a mask. An int (Wan2.1: 512, set by ``convert_dit --from-diffusers``):
            every caption zero-padded to ``text_len`` tokens and all of them attended, padding
            included, as Wan and diffusers' ``WanPipeline`` feed the model. ``forward`` and
            ``forward_packed`` pad whatever context they get, so every caller follows it.
    """

    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int = 16,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        dim: int = 1536,
        ffn_dim: int = 8960,
        num_heads: int = 12,
        num_layers: int = 30,
        text_dim: int = 4096,
        freq_dim: int = 256,
        qk_norm: bool = True,
        cross_attn_norm: bool = True,
        eps: float = 1e-6,
        rope_theta: float = 10000.0,
        attn_backend: str = "auto",
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        text_len: int | None = None,
    ):
        super().__init__()
        if text_len is not None and int(text_len) < 1:
            raise ValueError(f"text_len={text_len} must be a positive token count or None (masked)")
        if in_channels < out_channels:
            raise ValueError(
                f"in_channels={in_channels} < out_channels={out_channels}: the input is the noisy "
                "latent (out_channels) plus any conditioning channels"
            )
        if image_dim is not None:
            added_kv_proj_dim = dim if added_kv_proj_dim is None else added_kv_proj_dim
            if added_kv_proj_dim != dim:
                raise ValueError(
                    f"added_kv_proj_dim={added_kv_proj_dim} must equal dim={dim}: image tokens "
                    "reach the cross-attention through image_embedding, which outputs dim"
                )
        elif added_kv_proj_dim is not None:
            raise ValueError(
                f"added_kv_proj_dim={added_kv_proj_dim} without image_dim: set image_dim too"
            )
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim={dim} must split into num_heads={num_heads} heads of even size")
        if attn_backend != "auto" and attn_backend not in BACKENDS:
            raise ValueError(
                f"unknown attn_backend {attn_backend!r}; valid: 'auto', {', '.join(BACKENDS)}"
            )
        patch_size = tuple(int(p) for p in patch_size)
        self.config = dict(
            in_channels=in_channels,
            out_channels=out_channels,
            patch_size=list(patch_size),
            dim=dim,
            ffn_dim=ffn_dim,
            num_heads=num_heads,
            num_layers=num_layers,
            text_dim=text_dim,
            freq_dim=freq_dim,
            qk_norm=qk_norm,
            cross_attn_norm=cross_attn_norm,
            eps=eps,
            rope_theta=rope_theta,
        )
        if image_dim is not None:  # stored only for I2V so that T2V configs stay as they were
            self.config.update(image_dim=image_dim, added_kv_proj_dim=added_kv_proj_dim)
        if text_len is not None:  # likewise: only fixed-length (Wan) models store it
            self.config.update(text_len=int(text_len))
        self.text_len = None if text_len is None else int(text_len)
        self.cond_channels = in_channels - out_channels
        self.image_dim = image_dim
        self.in_channels, self.out_channels, self.patch_size = in_channels, out_channels, patch_size
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.freq_dim, self.rope_theta = freq_dim, rope_theta
        self.attn_backend = attn_backend
        self.gradient_checkpointing = False

        self.patch_embedding = nn.Conv3d(
            in_channels, dim, kernel_size=patch_size, stride=patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.image_embedding = ImageProjection(image_dim, dim) if image_dim else None
        self.blocks = nn.ModuleList(
            WanBlock(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim)
            for _ in range(num_layers)
        )
        self.norm_out = LayerNorm(dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.initialize_weights()

    def initialize_weights(self):
        """Wan's init: xavier linears with zero bias, N(0, 0.02) embedding MLPs, zero output head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.view(self.dim, -1))
        nn.init.zeros_(self.patch_embedding.bias)
        for m in (*self.text_embedding, *self.time_embedding):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        # Zero head: the untrained model predicts velocity 0 and training starts stable.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    # ---- shared pieces of both entry points ----

    def embed_time(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """t: [S] in [0, 1] -> temb [S, dim] (head modulation), e0 [S, 6, dim] (block modulation), fp32."""
        with torch.autocast(device_type=t.device.type, enabled=False):
            freqs = timestep_embedding(t * TIMESTEP_SCALE, self.freq_dim)
            temb = fp32_linear(
                self.time_embedding[2], F.silu(fp32_linear(self.time_embedding[0], freqs))
            )
            e0 = fp32_linear(self.time_projection[1], F.silu(temb)).unflatten(1, (6, self.dim))
        return temb, e0

    def _embed_patches(self, tokens: Tensor) -> Tensor:
        """tokens [B, L, pt*ph*pw*C] -> [B, L, dim] fp32: the Conv3d patchify as a linear map."""
        w = self.patch_embedding.weight  # [dim, C, pt, ph, pw] -> [dim, (pt, ph, pw, C)]
        w = w.permute(0, 2, 3, 4, 1).flatten(1)
        return F.linear(tokens.to(w.dtype), w, self.patch_embedding.bias).float()

    def _run(
        self,
        tokens: Tensor,
        t: Tensor,
        context: Tensor,
        positions: Tensor,
        layout: TokenLayout,
        image: Tensor | None = None,
    ) -> Tensor:
        """tokens [B, L, P_in], t [S], context [B, Lc, text_dim], positions [L, 3],
        image [B, Li, image_dim] or None -> [B, L, P_out]."""
        x = self._embed_patches(tokens)
        temb, e0 = self.embed_time(t)
        dtype = self.proj_out.weight.dtype
        context = self.text_embedding(context.to(dtype))
        if image is not None:
            image = self.image_embedding(image)
        rope = rope_cos_sin(positions, self.head_dim, self.rope_theta)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, e0, context, rope, layout, image, use_reentrant=False)
            else:
                x = block(x, e0, context, rope, layout, image)
        shift, scale = (self.scale_shift_table.float() + temb[:, None]).unbind(1)
        x = modulate(self.norm_out(x), layout.per_token(shift), layout.per_token(scale))
        return self.proj_out(x.to(dtype))

    # ---- entry points ----

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        context_mask: Tensor | None = None,
        cond: Tensor | None = None,
        image: Tensor | None = None,
    ) -> Tensor:
        """Padded batch, all samples of one shape.

        Args:
            x: [B, C_out, T, H, W] noisy latents x_t.
            t: [B] flow time in [0, 1].
            context: [B, L, text_dim] text embeddings.
            context_mask: [B, L] bool, True for real text tokens (None = attend to all).
            cond: [B, cond_channels, T, H, W] I2V conditioning (mask + first-frame latent).
            image: [B, Li, image_dim] image-encoder tokens (models with image_dim).
        Returns:
            [B, C_out, T, H, W] predicted velocity.
        """
        if x.ndim != 5 or x.shape[1] != self.out_channels:
            raise ValueError(f"x must be [B, {self.out_channels}, T, H, W], got {tuple(x.shape)}")
        batch = x.shape[0]
        self._check_conditioning(
            None if cond is None else cond.shape[1:2], None if image is None else image.shape[-1:]
        )
        if cond is not None and (cond.shape[0] != batch or cond.shape[2:] != x.shape[2:]):
            raise ValueError(
                f"cond must be [B, {self.cond_channels}, T, H, W] like x {tuple(x.shape)}, "
                f"got {tuple(cond.shape)}"
            )
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t
        if t.shape != (batch,):
            raise ValueError(f"t must be [B]=[{batch}], got {tuple(t.shape)}")
        self._check_context(context, batch)
        if context_mask is not None and context_mask.shape != context.shape[:2]:
            raise ValueError(
                f"context_mask must be [B, L]={tuple(context.shape[:2])}, got {tuple(context_mask.shape)}"
            )
        context, context_mask = self._fixed_length(context, context_mask)
        grid = patch_grid(x.shape, self.patch_size)
        backend = {"backend": self.attn_backend}
        cross = backend if context_mask is None else {**backend, "key_mask": context_mask.bool()}
        layout = TokenLayout(seg_ids=None, self_attn=backend, cross_attn=cross, image_attn=backend)
        tokens = patchify(x if cond is None else torch.cat([x, cond.to(x)], 1), self.patch_size)
        out = self._run(tokens, t, context, grid_positions(grid, x.device), layout, image)
        return unpatchify(out, grid, self.patch_size)

    def forward_packed(self, packed: PackedBatch, cp: ContextParallel | None = None) -> list[Tensor]:
        """Packed samples of different shapes and text lengths (see vidgen.data.packing).

        ``packed.x`` holds the noisy tokens x_t [N, pt*ph*pw*C_out], ``packed.t`` the [S]
        per-sample times; I2V models also read ``packed.cond`` (conditioning tokens) and
        ``packed.image`` (image tokens). Returns the S predicted velocities, each
        [C_out, T_i, H_i, W_i].

        cp: a context-parallel group whose ranks all pass the same ``packed``: each runs
        1/cp of the tokens (see context_parallel.py) and all return the whole output.
        """
        out = self.forward_packed_tokens(packed, cp)
        return packed.unpack(out if cp is None else cp.shard(packed.num_tokens).gather(out))

    def forward_packed_tokens(self, packed: PackedBatch, cp: ContextParallel | None = None) -> Tensor:
        """``forward_packed`` before unpacking: the predicted velocity tokens [N, pt*ph*pw*C_out];
        with ``cp``, only this rank's slice ``cp.shard(packed.num_tokens)`` of them (padded)."""
        if packed.t is None:
            raise ValueError(
                "packed.t is None: sample timesteps first (dataclasses.replace(packed, t=...))"
            )
        if tuple(packed.patch_size) != self.patch_size:
            raise ValueError(
                f"batch packed with patch_size {packed.patch_size}, model uses {self.patch_size}"
            )
        if packed.context.ndim != 2 or packed.context.shape[-1] != self.config["text_dim"]:
            raise ValueError(
                f"packed.context must be [M, {self.config['text_dim']}], got {tuple(packed.context.shape)}"
            )
        if self.text_len is not None:
            packed = pad_packed_context(packed, self.text_len)
        pt, ph, pw = self.patch_size
        self._check_conditioning(
            None if packed.cond is None else (packed.cond.shape[-1] // (pt * ph * pw),),
            None if packed.image is None else packed.image.shape[-1:],
        )
        backend = {"backend": self.attn_backend}
        self_attn = dict(cu_seqlens_q=packed.cu_seqlens, max_seqlen_q=packed.max_seqlen, **backend)
        cross_attn = dict(
            cu_seqlens_q=packed.cu_seqlens,
            cu_seqlens_k=packed.cu_seqlens_ctx,
            max_seqlen_q=packed.max_seqlen,
            max_seqlen_k=packed.max_seqlen_ctx,
            **backend,
        )
        image_attn = None
        if packed.image is not None:
            image_attn = dict(
                cu_seqlens_q=packed.cu_seqlens,
                cu_seqlens_k=packed.cu_seqlens_img,
                max_seqlen_q=packed.max_seqlen,
                max_seqlen_k=packed.max_seqlen_img,
                **backend,
            )
        tokens, positions, seg_ids, shard = packed.x, packed.positions, packed.seg_ids, None
        if packed.cond is not None:  # (pt, ph, pw, C) per token: concatenate along C
            p = pt * ph * pw
            tokens = torch.cat(
                [tokens.unflatten(-1, (p, -1)), packed.cond.to(tokens).unflatten(-1, (p, -1))], -1
            ).flatten(-2)
        if cp is not None:  # padding tokens take the last sample's id; their outputs are cut
            cp.check_heads(self.num_heads)
            shard = cp.shard(packed.num_tokens)
            tokens, positions = shard.split(tokens), shard.split(positions)
            seg_ids = shard.split(seg_ids, fill=packed.num_samples - 1)
        layout = TokenLayout(seg_ids, self_attn, cross_attn, image_attn, shard)
        image = None if packed.image is None else packed.image[None]
        return self._run(tokens[None], packed.t, packed.context[None], positions, layout, image)[0]

    def _check_conditioning(self, cond_channels: tuple | None, image_dim: tuple | None):
        """I2V inputs present exactly when the model takes them, with the right widths."""
        given = 0 if cond_channels is None else int(cond_channels[0])
        if given != self.cond_channels:
            raise ValueError(
                f"this model takes {self.cond_channels} conditioning channels (in_channels="
                f"{self.in_channels} - out_channels={self.out_channels}), got cond with {given}"
                + (" (cond=None)" if cond_channels is None else "")
            )
        width = None if image_dim is None else int(image_dim[0])
        if width != self.image_dim:
            raise ValueError(
                f"this model takes image tokens of width image_dim={self.image_dim}, got "
                + ("none" if width is None else f"width {width}")
            )

    def _fixed_length(self, context: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Wan's convention when ``text_len`` is set: the real tokens (``mask``) zero-padded to
        ``text_len``, no mask. Otherwise unchanged."""
        if self.text_len is None:
            return context, mask
        if mask is not None:
            context = context * mask[..., None].to(context.dtype)
            longest = int(mask.sum(1).max()) if mask.numel() else 0
        else:
            longest = context.shape[1]
        if longest > self.text_len:
            raise ValueError(
                f"a caption has {longest} text tokens, more than this model's text_len="
                f"{self.text_len}: encode with max_length={self.text_len} (Wan truncates there)"
            )
        if context.shape[1] > self.text_len:  # only masked padding beyond text_len
            context = context[:, : self.text_len]
        return F.pad(context, (0, 0, 0, self.text_len - context.shape[1])), None

    def _check_context(self, context: Tensor, batch: int):
        text_dim = self.config["text_dim"]
        if context.ndim != 3 or context.shape[0] != batch or context.shape[-1] != text_dim:
            raise ValueError(
                f"context must be [B={batch}, L, {text_dim}], got {tuple(context.shape)}"
            )

    # ---- checkpoints ----

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``path/config.json`` (constructor kwargs) and ``path/model.safetensors``."""
        return save_model(self, path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", **overrides) -> WanDiT:
        """Load a ``save_pretrained`` directory (weights kept in their stored dtype unless ``dtype``).

        ``overrides`` replace config values that do not change weight shapes (e.g. attn_backend).
        """
        return load_model(cls, path, dtype=dtype, device=device, **overrides)


# --------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------


def wan_tiny(**kwargs) -> WanDiT:
    """For tests: 2 layers, width 32, two heads of 16 (RoPE split t/h/w = 8/4/4)."""
    size = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=32, freq_dim=32)
    return WanDiT(**{**size, **kwargs})


def wan_1_3b(**kwargs) -> WanDiT:
    size = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096)
    return WanDiT(**{**size, **kwargs})


def wan_14b(**kwargs) -> WanDiT:
    size = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_dim=4096)
    return WanDiT(**{**size, **kwargs})


WAN_PRESETS = {"tiny": wan_tiny, "1.3B": wan_1_3b, "14B": wan_14b}


def build_wan_dit(size: str | None, **kwargs) -> WanDiT:
    """``WAN_PRESETS[size](**kwargs)`` (None: ``WanDiT(**kwargs)``); a None value means "the
    preset's" (or WanDiT's default). An unknown size is an error naming the sizes."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if size is None:
        return WanDiT(**kwargs)
    if size not in WAN_PRESETS:
        raise ValueError(f"unknown WanDiT size {size!r}; valid: {', '.join(WAN_PRESETS)} (or null)")
    return WAN_PRESETS[size](**kwargs)


@torch.no_grad()
def expand_t2v(t2v: WanDiT, cond_channels: int | None = None, image_dim: int | None = None) -> WanDiT:
    """An I2V WanDiT initialised from a T2V one: at step 0 it predicts exactly what ``t2v`` does.

    Every T2V weight is copied; the ``cond_channels`` new patch-embedding input channels
    (default: 4 mask + the latent channels) start at zero, and so does the image branch's value
    projection (``add_v_proj``), so neither the conditioning nor the image tokens change the
    output until training moves them. The image projector and key projections keep their
    random init (zero values make their gradients zero only for the first step).
    """
    cfg = dict(t2v.config)
    if cfg["in_channels"] != cfg["out_channels"] or "image_dim" in cfg:
        raise ValueError(f"expand_t2v needs a text-to-video DiT, got in_channels={cfg['in_channels']}, "
                         f"out_channels={cfg['out_channels']}, image_dim={cfg.get('image_dim')}")
    cond_channels = 4 + cfg["out_channels"] if cond_channels is None else cond_channels
    cfg["in_channels"] = cfg["out_channels"] + cond_channels
    if image_dim is not None:
        cfg["image_dim"] = image_dim
    dtype = t2v.patch_embedding.weight.dtype
    i2v = WanDiT(**cfg, attn_backend=t2v.attn_backend).to(dtype)
    state = i2v.state_dict()
    for name, value in t2v.state_dict().items():
        if name == "patch_embedding.weight":
            state[name].zero_()[:, : cfg["out_channels"]] = value
        else:
            state[name].copy_(value)
    for block in i2v.blocks:
        if image_dim is not None:
            block.cross_attn.add_v_proj.weight.zero_()
            block.cross_attn.add_v_proj.bias.zero_()
    return i2v.to(t2v.patch_embedding.weight.device)
