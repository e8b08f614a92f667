"""Latents -> uint8 videos for the labeller (no gradient, on the host's schedule)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

DECODERS = ("world_autoencoder", "wan_vae", "wan_vae_flax")


def world_decoder(autoencoder_dir: str) -> Callable[[np.ndarray], np.ndarray]:
    import jax

    from dollar_jax.eval import world_eval
    from dollar_jax.checkpoint import load_autoencoder

    ae = load_autoencoder(autoencoder_dir)
    return lambda latents: world_eval.decode(ae, jax.device_get(latents))


def wan_vae_decoder(vae_path: str, device: str = "cpu", batch_size: int = 2) -> Callable[[np.ndarray], np.ndarray]:
    """diffusers' AutoencoderKLWan from a local folder. Latents are normalised the way
    tools/precompute_latents.py writes them: (z - latents_mean) / latents_std per channel."""
    import torch
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(vae_path).to(device).eval()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)

    def decode(latents: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(latents), batch_size):
                z = torch.from_numpy(np.asarray(latents[i:i + batch_size], np.float32)).permute(0, 4, 1, 2, 3)
                video = vae.decode(z * std + mean).sample  # [N, 3, T, H, W] in [-1, 1]
                video = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                out.append(video.permute(0, 2, 3, 4, 1).cpu().numpy())
        return np.concatenate(out)

    return decode


def wan_vae_flax_decoder(vae_path: str, batch_size: int = 2, **numerics) -> Callable[[np.ndarray], np.ndarray]:
    """The Flax Wan VAE (dollar_jax/models/wan_vae.py) decoding on the default device under jit: no torch.

    `vae_path` is a converted model folder or a diffusers AutoencoderKLWan folder. Latents are normalised as
    tools/precompute_latents.py writes them; they are de-normalised with the config's latents_mean/std.
    Batches of `batch_size` (the last one padded) keep one compiled shape per latent shape."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dollar_jax.checkpoint import load_wan_vae

    vae = load_wan_vae(vae_path, **numerics)
    graphdef, state = nnx.split(vae)

    @jax.jit
    def to_video(state, latents):
        model = nnx.merge(graphdef, state)
        video = model.decode(model.denormalize(latents))  # [N, T, H, W, 3] in [-1, 1]
        return jnp.round((video + 1.0) * 127.5).astype(jnp.uint8)

    def decode(latents: np.ndarray) -> np.ndarray:
        latents = np.asarray(latents, np.float32)
        out = []
        for i in range(0, len(latents), batch_size):
            chunk = latents[i:i + batch_size]
            padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            out.append(np.asarray(to_video(state, padded))[:len(chunk)])
        return np.concatenate(out)

    return decode


def make_decoder(kind: str, *, autoencoder_dir: str = "", vae_path: str = ""):
    if kind == "world_autoencoder":
        return world_decoder(autoencoder_dir)
    if kind == "wan_vae":
        if not vae_path:
            raise ValueError("reward.decoder='wan_vae' needs reward.vae_path (a diffusers AutoencoderKLWan folder)")
        return wan_vae_decoder(vae_path)
    if kind == "wan_vae_flax":
        if not vae_path:
            raise ValueError("reward.decoder='wan_vae_flax' needs reward.vae_path (a converted Wan VAE model "
                             "folder or a diffusers AutoencoderKLWan folder)")
        return wan_vae_flax_decoder(vae_path)
    raise ValueError(f"reward.decoder must be one of {DECODERS}, got {kind!r}")
