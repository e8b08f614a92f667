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


def _flax_wan_decode(vae_path: str) -> Callable[[np.ndarray], np.ndarray]:
    """The Flax Wan VAE (dollar_jax/models/wan_vae.py): the same contract as `_torch_wan_decode`."""
    try:
        from dollar_jax.models import wan_vae  # noqa: F401
    except ImportError as e:
        raise ValueError("--vae_backend=flax needs the Flax Wan VAE (dollar_jax/models/wan_vae.py), which this build "
                         "does not have yet; use --vae_backend=torch") from e
    raise ValueError("--vae_backend=flax: dollar_jax/models/wan_vae.py is present but not wired into "
                     "dollar_jax/rewards/decoders.py (_flax_wan_decode) yet; use --vae_backend=torch")


def wan_vae_decoder(vae_path: str, device: str = "cpu", batch_size: int = 2, backend: str = "torch",
                    dtype: str = "float32") -> Callable[[np.ndarray], np.ndarray]:
    """Normalised latents [N, F, H, W, C] -> uint8 videos [N, T, H, W, 3] with the Wan VAE of `vae_path`.

    Latents are normalised the way tools/precompute_latents.py writes them, (z - latents_mean) / latents_std
    per channel. Only the network differs between backends ("torch": diffusers' AutoencoderKLWan; "flax": the
    Flax port); the un-normalisation, batching and uint8 quantisation here are shared.
    """
    if backend not in VAE_BACKENDS:
        raise ValueError(f"--vae_backend must be one of {VAE_BACKENDS}, got {backend!r}")
    mean, std = wan_latent_stats(vae_path)
    network = _torch_wan_decode(vae_path, device, dtype) if backend == "torch" else _flax_wan_decode(vae_path)

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
