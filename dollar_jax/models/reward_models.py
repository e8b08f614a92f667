"""Latent reward models (LRMs): small networks that predict a pixel-space reward from latents.

The paper's image LRM, applied per frame and averaged over frames:
    conv 4x4 stride 4 (C -> 128) + GroupNorm + SiLU, conv 3x3 stride 2 + GroupNorm + SiLU,
    average pool, 1x1 conv, linear 128 -> 1
(the paper counts 189,441 parameters for 4 latent channels; this layout has 173,057 - the difference is
exactly one bias-free 128 x 128 matrix, a layer the paper's description does not name). The text-
conditioned variant adds a text MLP, pooling and a single-head cross-attention from the image features to
the text tokens. The 3-D variant replaces the per-frame convolutions with spatio-temporal ones.
Every variant maps latents [B, F, H, W, C] (+ text [B, L, D]) to one score per clip [B].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dollar_jax.models.layers import Conv, Dense, GroupNorm

LRM_KINDS = ("frame", "frame_text", "video3d")


@dataclasses.dataclass(frozen=True)
class LRMConfig:
    kind: str = "frame"
    latent_channels: int = 16
    width: int = 128
    text_dim: int = 32  # only for "frame_text"
    groups: int = 32
    # Stride of the first convolution. The paper's 4 suits latents of 60x104 (480p Wan); on the embedded world's
    # 8x8 latents it leaves a 2x2 map, so the world's configs use 2.
    first_stride: int = 4

    def __post_init__(self):
        if self.kind not in LRM_KINDS:
            raise ValueError(f"LRM kind must be one of {LRM_KINDS}, got {self.kind!r}")


class _Trunk(nnx.Module):
    """The two strided convolutions of the paper's LRM (2-D per frame, or 3-D)."""

    def __init__(self, cfg: LRMConfig, three_d: bool, *, rngs: nnx.Rngs):
        w = cfg.width
        f = cfg.first_stride
        k1, s1, k2, s2 = ((2, 4, 4), (1, f, f), (3, 3, 3), (1, 2, 2)) if three_d else ((4, 4), (f, f), (3, 3), (2, 2))
        self.conv1 = Conv(cfg.latent_channels, w, k1, strides=s1, rngs=rngs)
        self.norm1 = GroupNorm(w, cfg.groups, rngs=rngs)
        self.conv2 = Conv(w, w, k2, strides=s2, rngs=rngs)
        self.norm2 = GroupNorm(w, cfg.groups, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.silu(self.norm1(self.conv1(x)))
        return jax.nn.silu(self.norm2(self.conv2(h)))


class LatentRewardModel(nnx.Module):
    def __init__(self, cfg: LRMConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        w = cfg.width
        self.trunk = _Trunk(cfg, cfg.kind == "video3d", rngs=rngs)
        if cfg.kind == "frame_text":
            self.text_in = Dense(cfg.text_dim, w, ("text_embed", None), rngs=rngs)
            self.text_out = Dense(w, w, (None, None), rngs=rngs)
            self.to_q = Dense(w, w, (None, None), rngs=rngs)
            self.to_k = Dense(w, w, (None, None), rngs=rngs)
            self.to_v = Dense(w, w, (None, None), rngs=rngs)
            self.text_gate = Dense(w, w, (None, None), rngs=rngs)
        self.proj = Dense(w, w, (None, None), rngs=rngs)  # the 1x1 convolution after pooling
        self.head = Dense(w, 1, (None, None), rngs=rngs)

    def __call__(self, latents: jax.Array, text: jax.Array | None = None) -> jax.Array:
        b, f = latents.shape[:2]
        x = latents.astype(jnp.float32)
        if self.config.kind == "video3d":
            h = self.trunk(x)  # [B, F', H', W', w]
            tokens = h.reshape(b, -1, h.shape[-1])
            pooled = tokens.mean(axis=1)
            return self.head(jax.nn.silu(self.proj(pooled)))[:, 0]
        h = self.trunk(x.reshape(b * f, *x.shape[2:]))  # per frame: [B*F, H', W', w]
        tokens = h.reshape(b * f, -1, h.shape[-1])
        if self.config.kind == "frame_text":
            if text is None:
                raise ValueError("The text-conditioned LRM needs text embeddings")
            t = self.text_out(jax.nn.silu(self.text_in(text.astype(jnp.float32))))  # [B, L, w]
            t = jnp.repeat(t, f, axis=0)  # one copy per frame
            q, k, v = self.to_q(tokens), self.to_k(t), self.to_v(t)
            attn = jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", q, k) / jnp.sqrt(q.shape[-1]), axis=-1)
            tokens = tokens + jnp.einsum("bqk,bkd->bqd", attn, v) * jax.nn.sigmoid(self.text_gate(t.mean(axis=1)))[:, None]
        pooled = tokens.mean(axis=1)
        per_frame = self.head(jax.nn.silu(self.proj(pooled)))[:, 0]
        return per_frame.reshape(b, f).mean(axis=1)


def parameter_count(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
