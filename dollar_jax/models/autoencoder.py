"""A miniature video autoencoder for the embedded world (the role Wan's VAE plays for real videos).

Videos [B, T, H, W, 3] (uint8 or [0, 1] floats) <-> latents [B, T/ft, H/fs, W/fs, C]. Like Wan's VAE it
compresses time and space and has a Gaussian posterior (a small KL term keeps the latent space smooth, so
the decoder tolerates the imperfect latents a diffusion model produces). Unlike it, it is built for two
CPU cores: the first layer is a space-to-depth reshape (a patch of ft x fs x fs pixels becomes one
voxel), and all convolutions run at latent resolution.

Latents handed to diffusion models are *normalised*: (z - mean) / std per channel, with statistics measured
on the training set after training (`Autoencoder.set_latent_stats`), as Wan/SD scale their VAE latents.
"""

from __future__ import annotations

import dataclasses

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from dollar_jax.models.layers import Conv, Dense, GroupNorm, zeros


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    latent_channels: int = 8
    width: int = 64  # channels of the convolutions at latent resolution
    blocks: int = 2  # residual blocks in the encoder (the decoder gets one more)
    temporal_kernel: int = 1  # 1: spatial 3x3 convs (the patch already mixes ft frames); 3: full 3x3x3
    temporal_downsample: int = 2
    spatial_downsample: int = 4

    FIELDS = ("latent_channels", "width", "blocks", "temporal_kernel", "temporal_downsample", "spatial_downsample")

    @classmethod
    def from_config(cls, c) -> AutoencoderConfig:
        return cls(**{k: int(c[k]) for k in cls.FIELDS})

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.FIELDS}

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        ft, fs = self.temporal_downsample, self.spatial_downsample
        if num_frames % ft or height % fs or width % fs:
            raise ValueError(f"Video {(num_frames, height, width)} is not divisible by the autoencoder's "
                             f"downsampling ({ft}, {fs}, {fs})")
        return num_frames // ft, height // fs, width // fs, self.latent_channels


class ResBlock(nnx.Module):
    def __init__(self, channels: int, temporal_kernel: int, *, rngs: nnx.Rngs):
        groups, window = min(8, channels), (temporal_kernel, 3, 3)
        self.norm1 = GroupNorm(channels, groups, rngs=rngs)
        self.conv1 = Conv(channels, channels, window, rngs=rngs)
        self.norm2 = GroupNorm(channels, groups, rngs=rngs)
        self.conv2 = Conv(channels, channels, window, rngs=rngs, kernel_init=zeros)

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        return x + self.conv2(jax.nn.silu(self.norm2(h)))


class Autoencoder(nnx.Module):
    def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        patch = cfg.temporal_downsample * cfg.spatial_downsample**2 * 3
        w, axes = cfg.width, ("conv_in", "conv_out")
        # Encoder: patchify -> per-voxel MLP -> residual convs at latent resolution -> (mean, log-variance).
        self.enc_in = Dense(patch, w, axes, rngs=rngs)
        self.enc_blocks = nnx.List([ResBlock(w, cfg.temporal_kernel, rngs=rngs) for _ in range(cfg.blocks)])
        self.enc_norm = GroupNorm(w, min(8, w), rngs=rngs)
        self.enc_out = Dense(w, 2 * cfg.latent_channels, axes, rngs=rngs)
        # Decoder: the mirror image, ending in a per-voxel MLP back to a pixel patch.
        self.dec_in = Conv(cfg.latent_channels, w, (cfg.temporal_kernel, 3, 3), rngs=rngs)
        self.dec_blocks = nnx.List([ResBlock(w, cfg.temporal_kernel, rngs=rngs) for _ in range(cfg.blocks + 1)])
        self.dec_norm = GroupNorm(w, min(8, w), rngs=rngs)
        self.dec_hidden = Dense(w, 2 * w, axes, rngs=rngs)
        self.dec_out = Dense(2 * w, patch, axes, rngs=rngs)
        # Latent normalisation statistics (set after training; identity until then).
        self.latent_mean = nnx.BatchStat(jnp.zeros((cfg.latent_channels,)))
        self.latent_std = nnx.BatchStat(jnp.ones((cfg.latent_channels,)))

    # ---- pixels <-> voxels ----------------------------------------------------------------------------
    def _patchify(self, video):
        c = self.config
        x = video.astype(jnp.float32) / 255.0 if video.dtype == jnp.uint8 else video.astype(jnp.float32)
        x = 2.0 * x - 1.0
        return einops.rearrange(x, "b (t pt) (h ph) (w pw) c -> b t h w (pt ph pw c)",
                                pt=c.temporal_downsample, ph=c.spatial_downsample, pw=c.spatial_downsample)

    def _unpatchify(self, x):
        c = self.config
        x = einops.rearrange(x, "b t h w (pt ph pw c) -> b (t pt) (h ph) (w pw) c",
                             pt=c.temporal_downsample, ph=c.spatial_downsample, pw=c.spatial_downsample, c=3)
        return (x + 1.0) / 2.0

    # ---- the two halves --------------------------------------------------------------------------------
    def posterior(self, video):
        """(mean, log-variance) of the raw (unnormalised) latent posterior."""
        h = self.enc_in(self._patchify(video))
        for block in self.enc_blocks:
            h = block(h)
        mean, logvar = jnp.split(self.enc_out(jax.nn.silu(self.enc_norm(h))), 2, axis=-1)
        return mean, jnp.clip(logvar, -20.0, 5.0)

    def decode_raw(self, z):
        """Raw latents -> video in [0, 1] (float32, not clipped)."""
        h = self.dec_in(z)
        for block in self.dec_blocks:
            h = block(h)
        h = self.dec_hidden(jax.nn.silu(self.dec_norm(h)))
        return self._unpatchify(self.dec_out(jax.nn.silu(h)))

    # ---- what diffusion jobs use: normalised latents ----------------------------------------------------
    def encode(self, video):
        """Video -> normalised latents (the posterior mean, deterministic)."""
        mean, _ = self.posterior(video)
        return (mean - self.latent_mean[...]) / self.latent_std[...]

    def decode(self, latents):
        """Normalised latents -> video in [0, 1], clipped."""
        z = latents.astype(jnp.float32) * self.latent_std[...] + self.latent_mean[...]
        return jnp.clip(self.decode_raw(z), 0.0, 1.0)

    def set_latent_stats(self, mean, std):
        self.latent_mean[...] = jnp.asarray(mean, jnp.float32)
        self.latent_std[...] = jnp.maximum(jnp.asarray(std, jnp.float32), 1e-6)


def autoencoder_loss(model: Autoencoder, video, rng, kl_weight: float):
    """Reconstruction MSE on [0, 1] pixels + kl_weight * KL(q(z|x) || N(0, I)) per latent element."""
    mean, logvar = model.posterior(video)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    recon = model.decode_raw(z)
    target = video.astype(jnp.float32) / 255.0 if video.dtype == jnp.uint8 else video
    mse = jnp.mean(jnp.square(recon - target))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return mse + kl_weight * kl, {"mse": mse, "kl": kl, "psnr": -10.0 * jnp.log10(mse)}


def psnr(video_a, video_b) -> jax.Array:
    """Per-clip PSNR in dB between videos in [0, 1] (or uint8)."""
    a = video_a.astype(jnp.float32) / (255.0 if video_a.dtype == jnp.uint8 else 1.0)
    b = video_b.astype(jnp.float32) / (255.0 if video_b.dtype == jnp.uint8 else 1.0)
    mse = jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-12))


__all__ = ["Autoencoder", "AutoencoderConfig", "autoencoder_loss", "psnr"]
