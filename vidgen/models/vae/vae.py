"""WanVAE: the Wan2.1 causal 3D video VAE and, with `temporal=False`, its 2D image variant.

    vae = WanVAE(base_dim=96, z_dim=16)               # the Wan2.1 architecture
    mu, logvar = vae.encode(video)                    # video [B, 3, 1+4k, H, W] in [-1, 1]
    z = vae.normalize(mu)                             # what the DiT sees
    video = vae.decode(vae.denormalize(z))            # [B, 3, 1+4k, H, W], clamped to [-1, 1]
    recon, mu, logvar = vae(video)                    # training path (whole clip, no clamp)

Two execution paths give the same numbers (fp32, up to float rounding):

- whole clip (`chunked=False`): one pass over all frames; the training path.
- chunked (`chunked=True`, the default for encode/decode): the encoder sees frame 0 alone,
  then chunks of `temporal_compression` frames, one latent frame out per chunk; the decoder
  takes one latent frame at a time. Each causal layer carries a tiny cache of its past
  (layers.py), so activation memory is bounded by one chunk whatever the clip length.

Parameter names mirror diffusers' `AutoencoderKLWan` (encoder.*, quant_conv, post_quant_conv,
decoder.*), plus two buffers `latents_mean` / `latents_std` that diffusers keeps in its config.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from vidgen.models.export import load_model, save_model
from vidgen.models.vae.layers import CausalConv3d, Decoder, Encoder


class WanVAE(nn.Module):
    """Causal VAE: [B, C, T, H, W] <-> latents [B, z_dim, 1 + (T-1)/4, H/8, W/8].

    base_dim: width of the first level; level widths are base_dim * dim_mult.
    z_dim: latent channels. The encoder outputs 2 * z_dim (mu and logvar).
    dim_mult: width multipliers; len(dim_mult) - 1 spatial 2x downsamples (8x by default).
    num_res_blocks: residual blocks per encoder level (the decoder has one more).
    attn_scales: extra encoder attention at these scales (1.0 = full resolution, 0.5, ...).
    temporal_downsample: per downsample, whether it also halves time (decoder mirrors it).
        Unused when temporal=False, but kept so inflation knows the 3D layout to build.
    dropout: inside residual blocks.
    in_channels: image channels (also the output channels).
    temporal: False builds the 2D image VAE (temporal kernel 1, no temporal resampling):
        each frame is encoded and decoded on its own and any T is accepted.
    latents_mean, latents_std: per-channel latent statistics (default 0 / 1), see normalize().
    """

    def __init__(
        self,
        base_dim: int = 96,
        z_dim: int = 16,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_scales: Sequence[float] = (),
        temporal_downsample: Sequence[bool] = (False, True, True),
        dropout: float = 0.0,
        in_channels: int = 3,
        temporal: bool = True,
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
    ):
        super().__init__()
        dim_mult = tuple(int(m) for m in dim_mult)
        attn_scales = tuple(float(s) for s in attn_scales)
        temporal_downsample = tuple(bool(t) for t in temporal_downsample)
        if not dim_mult or min(dim_mult) < 1 or min(base_dim, z_dim, num_res_blocks) < 1:
            raise ValueError(
                "need base_dim, z_dim, num_res_blocks >= 1 and a non-empty dim_mult of positive "
                f"ints; got base_dim={base_dim}, z_dim={z_dim}, num_res_blocks={num_res_blocks}, "
                f"dim_mult={dim_mult}"
            )
        if len(temporal_downsample) != len(dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs one flag per downsample, i.e. len(dim_mult) - 1 = "
                f"{len(dim_mult) - 1} flags; got {len(temporal_downsample)}: {temporal_downsample}"
            )
        self._config = dict(
            base_dim=int(base_dim),
            z_dim=int(z_dim),
            dim_mult=dim_mult,
            num_res_blocks=int(num_res_blocks),
            attn_scales=attn_scales,
            temporal_downsample=temporal_downsample,
            dropout=float(dropout),
            in_channels=int(in_channels),
            temporal=bool(temporal),
        )
        shared = dict(
            base_dim=base_dim,
            dim_mult=dim_mult,
            num_res_blocks=num_res_blocks,
            dropout=dropout,
            kt=3 if temporal else 1,  # the 2D model: temporal kernel size 1 everywhere
        )
        self.encoder = Encoder(
            in_channels=in_channels,
            out_dim=2 * z_dim,
            attn_scales=attn_scales,
            temporal_downsample=temporal_downsample,
            **shared,
        )
        self.quant_conv = CausalConv3d(2 * z_dim, 2 * z_dim, (1, 1, 1))
        self.post_quant_conv = CausalConv3d(z_dim, z_dim, (1, 1, 1))
        self.decoder = Decoder(
            z_dim=z_dim,
            out_channels=in_channels,
            temporal_upsample=temporal_downsample[::-1],
            **shared,
        )
        self.register_buffer("latents_mean", torch.zeros(z_dim))
        self.register_buffer("latents_std", torch.ones(z_dim))
        if latents_mean is not None or latents_std is not None:
            self.set_latent_stats(
                latents_mean if latents_mean is not None else torch.zeros(z_dim),
                latents_std if latents_std is not None else torch.ones(z_dim),
            )

    # ------------------------------------------------------------------ config and shapes

    @property
    def config(self) -> dict:
        """Constructor kwargs (JSON-friendly), including the current latent statistics."""
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in self._config.items()}
        cfg["latents_mean"] = self.latents_mean.float().tolist()
        cfg["latents_std"] = self.latents_std.float().tolist()
        return cfg

    @property
    def temporal(self) -> bool:
        return self._config["temporal"]

    @property
    def z_dim(self) -> int:
        return self._config["z_dim"]

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self._config["dim_mult"]) - 1)

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(self._config["temporal_downsample"]) if self.temporal else 1

    def check_frames(self, num_frames: int) -> None:
        """Raise ValueError unless num_frames = 1 + f*k (f = temporal_compression)."""
        f = self.temporal_compression
        if num_frames >= 1 and (num_frames - 1) % f == 0:
            return
        if num_frames < 1:
            raise ValueError(f"got {num_frames} frames; valid lengths are 1+{f}k, nearest 1")
        lo = 1 + (num_frames - 1) // f * f
        raise ValueError(
            f"got {num_frames} frames; valid lengths are 1+{f}k, nearest {lo} or {lo + f}"
        )

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError unless height and width are multiples of spatial_compression."""
        s = self.spatial_compression
        bad = [(n, v) for n, v in (("height", height), ("width", width)) if v < s or v % s]
        if bad:

            def nearest(v):
                return " or ".join(str(m) for m in sorted({max(s, v // s * s), v // s * s + s}))

            hints = ", ".join(f"{n} {v} (nearest {nearest(v)})" for n, v in bad)
            raise ValueError(
                f"frame size must be a positive multiple of {s} "
                f"(the spatial compression); got {hints}"
            )

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(z_dim, latent frames, h, w) for a clip of this size; validates it first."""
        self.check_frames(num_frames)
        self.check_size(height, width)
        s = self.spatial_compression
        return (
            self.z_dim,
            1 + (num_frames - 1) // self.temporal_compression,
            height // s,
            width // s,
        )

    def _check_video(self, x: torch.Tensor) -> None:
        c = self._config["in_channels"]
        if x.dim() != 5 or x.shape[1] != c:
            raise ValueError(f"expected a video [B, {c}, T, H, W], got shape {tuple(x.shape)}")
        self.check_frames(x.shape[2])
        self.check_size(x.shape[3], x.shape[4])

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.dim() != 5 or z.shape[1] != self.z_dim or z.shape[2] < 1:
            raise ValueError(
                f"expected latents [B, {self.z_dim}, T>=1, h, w], got shape {tuple(z.shape)}"
            )

    # ------------------------------------------------------------------ encode / decode

    def encode(self, x: torch.Tensor, chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, C, T, H, W] in [-1, 1] -> (mu, logvar), each [B, z_dim, 1+(T-1)/f, H/s, W/s].

        logvar is clamped to [-30, 20] (as diffusers does) so exp() stays finite.
        chunked=True: frame 0, then chunks of f frames, each causal layer carrying its cache.
        """
        self._check_video(x)
        h = self._encode_chunked(x) if chunked else self.quant_conv(self.encoder(x))
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def _encode_chunked(self, x: torch.Tensor) -> torch.Tensor:
        f, t = self.temporal_compression, x.shape[2]
        bounds = [(0, 1)] + [(s, s + f) for s in range(1, t, f)]
        cache: dict = {}
        out = None
        for i, (start, stop) in enumerate(bounds):
            h = self.quant_conv(self.encoder(x[:, :, start:stop], cache))  # [B, 2z, 1, h, w]
            if out is None:  # allocate once: no list of chunks, no final concatenation copy
                out = h.new_empty(*h.shape[:2], len(bounds), *h.shape[3:])
            out[:, :, i : i + 1] = h
        return out

    def decode(self, z: torch.Tensor, chunked: bool = True, clamp: bool = True) -> torch.Tensor:
        """z: [B, z_dim, n, h, w] (raw latents, not normalized) -> [B, C, 1+(n-1)*f, h*s, w*s].

        chunked=True decodes one latent frame at a time (frame 0 -> 1 frame, then f frames each).
        clamp: clip the output to [-1, 1] like Wan2.1 / diffusers inference; forward() skips it
        so the reconstruction loss keeps its gradient outside that range.
        """
        self._check_latent(z)
        if chunked:
            x = self._decode_chunked(z)
        else:
            x = self.decoder(self.post_quant_conv(z))
        return x.clamp(-1.0, 1.0) if clamp else x

    def _decode_chunked(self, z: torch.Tensor) -> torch.Tensor:
        f, n = self.temporal_compression, z.shape[2]
        cache: dict = {}
        out = None
        for i in range(n):
            y = self.decoder(self.post_quant_conv(z[:, :, i : i + 1]), cache)
            if out is None:  # frame 0 decodes to 1 frame, every later latent frame to f frames
                out = y.new_empty(*y.shape[:2], 1 + (n - 1) * f, *y.shape[3:])
            start = 0 if i == 0 else 1 + (i - 1) * f
            out[:, :, start : start + y.shape[2]] = y
        return out

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training path: x [B, C, T, H, W] -> (recon [B, C, T, H, W], mu, logvar).

        Runs the whole-clip path: under autograd every activation is kept for backward anyway,
        so chunking would save no memory, only add kernel launches and cache copies. To bound
        training memory, enable_gradient_checkpointing() instead. recon is not clamped.
        """
        mu, logvar = self.encode(x, chunked=False)
        z = mu
        if sample_posterior:
            # draw on the generator's device (a CPU generator may drive a GPU model), then move
            device = generator.device if generator is not None else mu.device
            eps = torch.randn(mu.shape, generator=generator, device=device, dtype=mu.dtype)
            eps = eps.to(mu.device)
            z = mu + torch.exp(0.5 * logvar) * eps
        return self.decode(z, chunked=False, clamp=False), mu, logvar

    # ------------------------------------------------------------------ training helpers

    @property
    def gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = bool(value)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> WanVAE:
        """Recompute each block's activations in backward (whole-clip and chunked paths)."""
        self.gradient_checkpointing = enabled
        return self

    def multi_frame_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters a 1-frame clip does not use: the temporal resampling convs (the
        first frame passes them untouched). Empty for the 2D model."""
        return [p for n, p in self.named_parameters() if ".time_conv." in n]

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's final conv weight (the GAN's adaptive weight uses its gradients)."""
        return self.decoder.conv_out.weight

    # ------------------------------------------------------------------ latent statistics

    def set_latent_stats(self, mean, std) -> None:
        """Store per-channel latent statistics (sequences or tensors of length z_dim)."""
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        for name, v in (("mean", mean), ("std", std)):
            if v.numel() != self.z_dim:
                raise ValueError(
                    f"latent {name} needs {self.z_dim} values (z_dim), got {v.numel()}"
                )
            if not torch.isfinite(v).all():
                raise ValueError(f"latent {name} has non-finite values: {v.tolist()}")
        if (std <= 0).any():
            raise ValueError(f"latent std must be > 0 per channel, got {std.tolist()}")
        self.latents_mean.copy_(mean)
        self.latents_std.copy_(std)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if like.dim() < 2 or like.shape[1] != self.z_dim:
            raise ValueError(
                f"expected latents [B, {self.z_dim}, ...], got shape {tuple(like.shape)}"
            )
        shape = (-1,) + (1,) * (like.dim() - 2)
        return self.latents_mean.view(shape), self.latents_std.view(shape)

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """The one place latents are normalised: z = (mu - mean) / std, per channel (dim 1)."""
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of normalize(): mu = z * std + mean."""
        mean, std = self._stats(z)
        return z * std + mean

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `config.json` and `model.safetensors` (weights + latent stats) to directory."""
        return save_model(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> WanVAE:
        """Load what save_pretrained wrote (strict: every key must match)."""
        return load_model(cls, directory, dtype=dtype, device=device, meta_init=False)


# Sizes of the VAE: every WanVAE setting but in_channels, temporal and the latent statistics.
# "wan2.1" is the released Wan2.1 VAE (8x space, 4x time); "demo" the CPU demo's (4x space:
# see configs/experiment/demo/vae_stage1.yaml).
VAE_PRESETS = {
    "wan2.1": {},  # WanVAE's defaults are the released model's
    "demo": dict(base_dim=16, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1, attn_scales=(),
                 temporal_downsample=(True, True), dropout=0.0),
}


def build_wan_vae(size: str | None, **kwargs) -> WanVAE:
    """``WanVAE`` from the preset ``size`` (None: none) with ``kwargs`` on top; a None value
    means "the preset's" (or WanVAE's default). An unknown size is an error naming the sizes."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if size is None:
        return WanVAE(**kwargs)
    if size not in VAE_PRESETS:
        raise ValueError(f"unknown WanVAE size {size!r}; valid: {', '.join(VAE_PRESETS)} (or null)")
    return WanVAE(**{**VAE_PRESETS[size], **kwargs})
