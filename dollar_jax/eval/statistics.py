"""Sample statistics that reveal collapse while training (losses alone do not tell whether VSD works)."""

from __future__ import annotations

import jax.numpy as jnp


def sample_statistics(x: jnp.ndarray, prefix: str = "sample") -> dict[str, jnp.ndarray]:
    """For latents [B, F, H, W, C]: mean, std, batch diversity and motion between frames.

    diversity: per-element std across the batch, averaged (0 when every sample is the same);
    motion: mean |x[:, f+1] - x[:, f]| (0 for static video).
    """
    x = x.astype(jnp.float32)
    return {
        f"{prefix}_mean": jnp.mean(x),
        f"{prefix}_std": jnp.std(x),
        f"{prefix}_diversity": jnp.mean(jnp.std(x, axis=0)),
        f"{prefix}_motion": jnp.mean(jnp.abs(x[:, 1:] - x[:, :-1])) if x.shape[1] > 1 else jnp.zeros(()),
    }
