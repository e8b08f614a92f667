"""Latents -> uint8 videos for the labeller (no gradient, on the host's schedule)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

DECODERS = ("world_autoencoder", "wan_vae")


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


def make_decoder(kind: str, *, autoencoder_dir: str = "", vae_path: str = ""):
    if kind == "world_autoencoder":
        return world_decoder(autoencoder_dir)
    if kind == "wan_vae":
        if not vae_path:
            raise ValueError("reward.decoder='wan_vae' needs reward.vae_path (a diffusers AutoencoderKLWan folder)")
        return wan_vae_decoder(vae_path)
    raise ValueError(f"reward.decoder must be one of {DECODERS}, got {kind!r}")
