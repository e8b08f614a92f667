"""Models: the Wan-compatible video DiT (and, in later modules, the autoencoder and latent reward models)."""

from dollar_jax.models.dit import WanDiT
from dollar_jax.models.dit_config import PRESETS, DiTConfig, preset

__all__ = ["WanDiT", "DiTConfig", "PRESETS", "preset"]
