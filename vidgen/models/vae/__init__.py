"""The Wan2.1-style causal video VAE (3D) and its 2D image variant, plus 2D->3D inflation."""

from vidgen.models.vae.inflate import inflate_2d_to_3d
from vidgen.models.vae.vae import WanVAE

__all__ = ["WanVAE", "inflate_2d_to_3d"]
