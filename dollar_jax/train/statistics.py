"""Sample statistics that reveal collapse while training (losses alone do not tell whether VSD works).

Pure jnp on latents [B, F, H, W, C] (or pixel videos): cheap enough to compute inside the jitted step.
Peers' commonest silent failures each have a number here: collapse (diversity), static video (motion),
over-saturation (mass beyond the data's range) and a drifting mean (DMD with v-prediction).
"""

from __future__ import annotations

import jax.numpy as jnp


def sample_statistics(x: jnp.ndarray, prefix: str = "sample", group_size: int = 1) -> dict[str, jnp.ndarray]:
    """For latents [B, F, H, W, C]: mean, std, batch diversity and motion between frames.

    diversity: per-element std across the batch, averaged (0 when every sample is the same);
    diversity_within (group_size K > 1: rows come in groups of K that share a caption): the same std taken
    within each group, averaged over groups - the spread of one prompt's samples (0 when the student
    ignores its noise);
    motion: mean |x[:, f+1] - x[:, f]| (0 for static video).
    """
    x = x.astype(jnp.float32)
    out = {
        f"{prefix}_mean": jnp.mean(x),
        f"{prefix}_std": jnp.std(x),
        f"{prefix}_diversity": jnp.mean(jnp.std(x, axis=0)),
        f"{prefix}_motion": jnp.mean(jnp.abs(x[:, 1:] - x[:, :-1])) if x.shape[1] > 1 else jnp.zeros(()),
    }
    if group_size > 1:
        groups = x.reshape(x.shape[0] // group_size, group_size, *x.shape[1:])
        out[f"{prefix}_diversity_within"] = jnp.mean(jnp.std(groups, axis=1))
    return out


def channel_moments(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-channel (last axis) mean and std over every other axis."""
    x = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    return jnp.mean(x, axis=axes), jnp.std(x, axis=axes)


def saturation(x: jnp.ndarray, mean: jnp.ndarray, std: jnp.ndarray, sigmas: float) -> jnp.ndarray:
    """Fraction of elements farther than `sigmas` standard deviations from the per-channel mean - a bound
    taken from the data (latents have no fixed range; for Gaussian-like data 4 sigma leaves ~6e-5)."""
    bound = sigmas * jnp.maximum(std, 1e-6)
    return jnp.mean((jnp.abs(x.astype(jnp.float32) - mean) > bound).astype(jnp.float32))


def mean_drift(x: jnp.ndarray, mean: jnp.ndarray, std: jnp.ndarray) -> jnp.ndarray:
    """The largest per-channel distance between x's mean and the data's, in data standard deviations."""
    x_mean, _ = channel_moments(x)
    return jnp.max(jnp.abs(x_mean - mean) / jnp.maximum(std, 1e-6))


def pixel_saturation(videos: jnp.ndarray, margin: float = 2.0 / 255.0) -> jnp.ndarray:
    """Fraction of pixel values at the ends of the range (uint8 videos, or floats in [0, 1])."""
    v = jnp.asarray(videos)
    v = v.astype(jnp.float32) / 255.0 if v.dtype == jnp.uint8 else v.astype(jnp.float32)
    return jnp.mean(((v <= margin) | (v >= 1.0 - margin)).astype(jnp.float32))
