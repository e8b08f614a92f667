"""A small video encoder trained on the embedded world to recognise its factors (the evaluation features).

It plays the role Inception/I3D features play for FID/FVD and the paper's Vendi "Inception" column:
128-d features of a CNN trained to classify colour, shape, direction and size of real clips. Built like the
autoencoder's encoder (a space-to-depth patch, then stride-1 convolutions at low resolution) because strided
convolutions train slowly on CPU.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from dollar_jax.models.layers import Conv, Dense, GroupNorm


class WorldEncoder(nnx.Module):
    def __init__(self, classes: dict[str, int], width: int = 64, features: int = 128, *, rngs: nnx.Rngs):
        w, axes = width, ("conv_in", "conv_out")
        self.patch = (2, 4, 4)
        self.embed = Dense(2 * 4 * 4 * 3, w, axes, rngs=rngs)
        self.conv1 = Conv(w, w, (3, 3, 3), rngs=rngs)
        self.norm1 = GroupNorm(w, 8, rngs=rngs)
        self.conv2 = Conv(w, w, (3, 3, 3), rngs=rngs)
        self.norm2 = GroupNorm(w, 8, rngs=rngs)
        self.proj = Dense(w, features, axes, rngs=rngs)
        self.heads = nnx.Dict({name: Dense(features, n, axes, rngs=rngs) for name, n in classes.items()})

    def features(self, video: jax.Array) -> jax.Array:
        x = video.astype(jnp.float32) / 255.0 if video.dtype == jnp.uint8 else video.astype(jnp.float32)
        pt, ph, pw = self.patch
        x = einops.rearrange(2 * x - 1, "b (t pt) (h ph) (w pw) c -> b t h w (pt ph pw c)", pt=pt, ph=ph, pw=pw)
        h = jax.nn.silu(self.embed(x))
        h = h + self.conv1(jax.nn.silu(self.norm1(h)))
        h = h + self.conv2(jax.nn.silu(self.norm2(h)))
        # Mean and max pooling: position-free features that still see a small shape on a large background.
        pooled = jnp.concatenate([h.mean(axis=(1, 2, 3)), h.max(axis=(1, 2, 3))], axis=-1)
        return self.proj(pooled[..., : h.shape[-1]] + pooled[..., h.shape[-1]:])

    def __call__(self, video: jax.Array) -> dict[str, jax.Array]:
        f = jax.nn.silu(self.features(video))
        return {name: head(f) for name, head in self.heads.items()}
