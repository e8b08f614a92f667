"""Differentiable (JAX) twins of the host pixel rewards, for the pixel-path baseline only.

The DOLLAR step never differentiates a reward: the latent reward model carries the gradient, and the rewards in
pixel.py run on the host. The pixel-path baseline (dollar_jax/eval/reward_baselines.py) backpropagates through
the decoder and the reward, so it needs the same rewards as JAX functions of float videos in [0, 1]
[N, T, H, W, 3]; tests/test_reward_baselines.py checks each against its host version.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _top_k_mean(values: jax.Array, k: int) -> jax.Array:
    return jax.lax.top_k(values, k)[0].mean(axis=-1)


def sharpness_jax(videos: jax.Array, edges_per_1024: int = 24) -> jax.Array:
    """pixel.Sharpness on float videos in [0, 1] [N, T, H, W, 3] (no uint8 rounding)."""
    n, t, h, w, _ = videos.shape
    gx = jnp.abs(jnp.diff(videos, axis=3)).max(axis=-1).reshape(n, t, -1)
    gy = jnp.abs(jnp.diff(videos, axis=2)).max(axis=-1).reshape(n, t, -1)
    k = max(1, round(edges_per_1024 * h * w / 1024))
    return _top_k_mean(jnp.concatenate([gx, gy], axis=-1), k).mean(axis=1)


def vividness_jax(videos: jax.Array, pixels_per_1024: int = 16) -> jax.Array:
    """pixel.Vividness on float videos in [0, 1]."""
    n, t, h, w, _ = videos.shape
    chroma = (videos.max(axis=-1) - videos.min(axis=-1)).reshape(n, t, -1)
    return _top_k_mean(chroma, max(1, round(pixels_per_1024 * h * w / 1024))).mean(axis=1)


def colourfulness_jax(videos: jax.Array) -> jax.Array:
    """pixel.Colourfulness on float videos in [0, 1] (its units: 0-255 channels / 100)."""
    v = videos * 255.0
    r, g, b = v[..., 0], v[..., 1], v[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    std = jnp.sqrt(rg.var(axis=(2, 3)) + yb.var(axis=(2, 3)) + 1e-12)
    mean = jnp.sqrt(rg.mean(axis=(2, 3)) ** 2 + yb.mean(axis=(2, 3)) ** 2 + 1e-12)
    return ((std + 0.3 * mean) / 100.0).mean(axis=1)


DIFFERENTIABLE = {"sharpness": sharpness_jax, "vividness": vividness_jax, "colourfulness": colourfulness_jax}
