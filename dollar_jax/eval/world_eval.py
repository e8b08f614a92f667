"""Scoring generated latents in the embedded world: decode with the autoencoder, read factors from pixels."""

from __future__ import annotations

import numpy as np

from dollar_jax.compile_effort import light_jit
from dollar_jax.data import world
from dollar_jax.data.text import WordEncoder


def prompt_batch(wcfg: world.WorldConfig, encoder: WordEncoder, count: int, seed: int = 0):
    """A fixed, balanced prompt set: (factors {name: [N]}, captions [N], text embeddings [N, L, D])."""
    combos = world.prompt_set(wcfg, count, seed)
    factors = {k: np.asarray([c[k] for c in combos]) for k in world.FACTORS}
    captions = [world.caption(c, wcfg) for c in combos]
    return factors, captions, encoder.encode(captions)


_decode = light_jit(lambda ae, z: ae.decode(z))


def decode(ae, latents, batch: int = 64) -> np.ndarray:
    """Latents -> uint8 videos [N, T, H, W, 3]."""
    out = [np.asarray(_decode(ae, latents[i:i + batch])) for i in range(0, len(latents), batch)]
    return (np.clip(np.concatenate(out), 0, 1) * 255 + 0.5).astype(np.uint8)


def score(videos: np.ndarray, factors: dict, wcfg: world.WorldConfig) -> dict[str, float]:
    """Per-factor caption adherence (and "all") of decoded videos."""
    return {f"adherence_{k}": float(v) for k, v in world.adherence(videos, factors, wcfg).items()}
