"""Models as plain `nn.Module`s (no Hydra, no Lightning): the causal video VAE, the DiT."""

from vidgen.models.vae import WanVAE, inflate_2d_to_3d

__all__ = ["WanVAE", "inflate_2d_to_3d"]
