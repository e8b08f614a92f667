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


VAE_BACKENDS = ("torch", "flax")


def wan_latent_stats(vae_path: str) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel (latents_mean, latents_std) of a diffusers AutoencoderKLWan folder (its config.json)."""
    import json
    import os

    path = os.path.join(vae_path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--vae {vae_path}: no config.json there (expected a diffusers AutoencoderKLWan folder, "
                         f"e.g. Wan2.1-T2V-1.3B-Diffusers/vae)")
    with open(path) as f:
        cfg = json.load(f)
    mean, std = (np.asarray(cfg.get(k) or [], np.float32) for k in ("latents_mean", "latents_std"))
    if len(mean) != cfg.get("z_dim") or len(std) != cfg.get("z_dim"):
        raise ValueError(f"--vae {vae_path}: latents_mean/latents_std have {len(mean)}/{len(std)} entries, "
                         f"z_dim is {cfg.get('z_dim')}")
    return mean, std


def _torch_wan_decode(vae_path: str, device: str, dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    """diffusers' AutoencoderKLWan: un-normalised channels-last latents -> float pixels [N, T, H, W, 3]."""
    import torch
    from diffusers import AutoencoderKLWan

    torch_device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    try:
        vae = AutoencoderKLWan.from_pretrained(vae_path, torch_dtype=getattr(torch, dtype), local_files_only=True)
    except Exception as e:
        raise ValueError(f"--vae {vae_path}: cannot load a diffusers AutoencoderKLWan ({type(e).__name__}: {e})") from e
    vae = vae.to(torch_device).eval()

    def decode(z: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(z.transpose(0, 4, 1, 2, 3)))
            video = vae.decode(x.to(torch_device, vae.dtype)).sample  # [N, 3, T, H, W] in [-1, 1]
            return video.float().permute(0, 2, 3, 4, 1).cpu().numpy()

    return decode


def _flax_wan_decode(vae_path: str, dtype: str, batch_size: int):
    """The Flax Wan VAE (dollar_jax/models/wan_vae.py) under jit on the default device, no torch: the same
    contract as `_torch_wan_decode`, plus the (latents_mean, latents_std) it was loaded with. `vae_path` is a
    converted model folder or a diffusers AutoencoderKLWan folder. Every call runs on `batch_size` rows (the
    last batch padded), so one latent shape compiles once."""
    import jax
    from flax import nnx

    from dollar_jax.checkpoint import load_wan_vae

    vae = load_wan_vae(vae_path, dtype=dtype)
    graphdef, state = nnx.split(vae)
    to_pixels = jax.jit(lambda state, z: nnx.merge(graphdef, state).decode(z).astype("float32"))

    def decode(z: np.ndarray) -> np.ndarray:
        n = len(z)
        padded = np.concatenate([z, np.zeros((batch_size - n, *z.shape[1:]), z.dtype)]) if n < batch_size else z
        return np.asarray(to_pixels(state, padded))[:n]

    stats = (np.asarray(vae.config.latents_mean, np.float32), np.asarray(vae.config.latents_std, np.float32))
    return decode, stats


def wan_vae_decoder(vae_path: str, device: str = "cpu", batch_size: int = 2, backend: str = "torch",
                    dtype: str = "float32") -> Callable[[np.ndarray], np.ndarray]:
    """Normalised latents [N, F, H, W, C] -> uint8 videos [N, T, H, W, 3] with the Wan VAE of `vae_path`.

    Latents are normalised the way tools/precompute_latents.py writes them, (z - latents_mean) / latents_std
    per channel. Only the network differs between backends ("torch": diffusers' AutoencoderKLWan; "flax": the
    Flax port); the un-normalisation, batching and uint8 quantisation here are shared.
    """
    if backend not in VAE_BACKENDS:
        raise ValueError(f"--vae_backend must be one of {VAE_BACKENDS}, got {backend!r}")
    if backend == "torch":
        network, (mean, std) = _torch_wan_decode(vae_path, device, dtype), wan_latent_stats(vae_path)
    else:
        network, (mean, std) = _flax_wan_decode(vae_path, dtype, batch_size)

    def decode(latents: np.ndarray) -> np.ndarray:
        latents = np.asarray(latents, np.float32)
        if latents.ndim != 5 or latents.shape[-1] != len(mean):
            raise ValueError(f"Latents of shape {latents.shape} do not fit the VAE at {vae_path}: it decodes "
                             f"[N, F, H, W, {len(mean)}]")
        out = []
        for i in range(0, len(latents), batch_size):
            video = network(latents[i:i + batch_size] * std + mean)
            out.append(((np.clip(video, -1.0, 1.0) + 1.0) * np.float32(127.5)).round().astype(np.uint8))
        return np.concatenate(out)

    return decode


def wan_vae_flax_decoder(vae_path: str, batch_size: int = 2, dtype: str = "float32"):
    """The reward labeller's accelerator decoder: `wan_vae_decoder` with the Flax backend."""
    return wan_vae_decoder(vae_path, batch_size=batch_size, backend="flax", dtype=dtype)


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
