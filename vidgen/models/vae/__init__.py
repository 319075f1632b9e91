"""The Wan2.1-style causal video VAE (3D) and its 2D image variant, plus 2D->3D inflation."""

from vidgen.models.vae.inflate import inflate_2d_to_3d
from vidgen.models.vae.load import load_vae
from vidgen.models.vae.vae import VAE_PRESETS, WanVAE, build_wan_vae

__all__ = ["VAE_PRESETS", "WanVAE", "build_wan_vae", "inflate_2d_to_3d", "load_vae"]
