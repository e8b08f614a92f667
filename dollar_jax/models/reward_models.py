"""Latent reward models (LRMs): small networks that predict a pixel-space reward from latents.

The paper's image LRM (its Table 8.1), applied per frame and averaged over frames:
    conv 4x4 stride 4 (C -> 128) + GroupNorm + SiLU, conv 3x3 stride 2 + GroupNorm + SiLU,
    average pool, 1x1 conv, linear 128 -> 1                                   (189,441 parameters)
and the text-conditioned one: plus a text MLP, pooling and single-head cross-attention (763,009).

kind="paper_image" / "paper_text" reproduce those counts exactly for C = 16 latent channels and text
dim D = 4096 (Wan/umT5). The arithmetic (weights + biases):
    conv 4x4, 16 -> 128            4*4*16*128 + 128 =  32,896
    GroupNorm(128)                       128 + 128 =     256
    conv 3x3, 128 -> 128           3*3*128*128 + 128 = 147,584
    GroupNorm(128)                       128 + 128 =     256
    1x1 conv 128 -> 128, 2 groups      2*64*64 + 128 =   8,320
    linear 128 -> 1                          128 + 1 =     129
                                                       -------
    image LRM                                          189,441
    text MLP: linear 4096 -> 128      4096*128 + 128 = 524,416
    cross-attention Wq, Wk, Wv (no bias)   3*128*128 =  49,152
                                                       -------
    text-conditioned LRM                               763,009
The paper does not say how its 1x1 convolution is shaped; a dense one would give 197,633 (8,192 more), a
grouped one with 2 groups is the one standard layer that lands on 189,441 with every width the paper
names. The difference between the two counts, 573,568, is exactly the text linear + three bias-free
128 x 128 projections, and does not depend on C. (With C = 4 the description with a dense 1x1 conv gives
173,057, 16,384 short - the reading an earlier version of this module took.)
In the text LRM the pooled frame feature is the single query; the text tokens (after the MLP) are keys and
values, all-zero (padding) tokens masked; the attended text is added to the pooled feature before the
1x1 conv.

The other kinds are this project's own alternatives: "frame" (dense 1x1 conv, 173,057 at C = 4),
"frame_text" (gated cross-attention from every image token) and "video3d" (spatio-temporal convolutions).
Every variant maps latents [B, F, H, W, C] (+ text [B, L, D]) to one score per clip [B].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dollar_jax.models.layers import Conv, Dense, GroupNorm, lecun_normal, param, zeros

LRM_KINDS = ("frame", "frame_text", "video3d", "paper_image", "paper_text")
PAPER_KINDS = ("paper_image", "paper_text")
PAPER_POINTWISE_GROUPS = 2  # the grouping of the 1x1 conv that gives the paper's 189,441 (module docstring)


@dataclasses.dataclass(frozen=True)
class LRMConfig:
    kind: str = "frame"
    latent_channels: int = 16
    width: int = 128
    text_dim: int = 32  # only for the text-conditioned kinds
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
        if cfg.kind in PAPER_KINDS:
            raise ValueError(f"LRM kind {cfg.kind!r} is PaperLatentRewardModel's: build it with make_lrm")
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


class GroupedPointwise(nnx.Module):
    """A 1x1 convolution with `groups` groups on pooled features [..., w]: block-diagonal w x w + bias."""

    def __init__(self, width: int, groups: int, *, rngs: nnx.Rngs):
        if width % groups:
            raise ValueError(f"A 1x1 conv of width {width} cannot be split into {groups} groups")
        per = width // groups
        self.kernel = param(rngs, lecun_normal, (groups, per, per), (None, None, None), jnp.float32)
        self.bias = param(rngs, zeros, (width,), (None,), jnp.float32)
        self.groups = groups

    def __call__(self, x: jax.Array) -> jax.Array:
        g = x.reshape(*x.shape[:-1], self.groups, x.shape[-1] // self.groups)
        y = jnp.einsum("...gi,gio->...go", g, self.kernel[...])
        return y.reshape(x.shape) + self.bias[...]


class PaperLatentRewardModel(nnx.Module):
    """The paper's per-frame LRM ("paper_image") and its text-conditioned form ("paper_text")."""

    def __init__(self, cfg: LRMConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        w = cfg.width
        self.trunk = _Trunk(cfg, False, rngs=rngs)
        if cfg.kind == "paper_text":
            self.text_mlp = Dense(cfg.text_dim, w, ("text_embed", None), rngs=rngs)
            self.to_q = Dense(w, w, (None, None), use_bias=False, rngs=rngs)
            self.to_k = Dense(w, w, (None, None), use_bias=False, rngs=rngs)
            self.to_v = Dense(w, w, (None, None), use_bias=False, rngs=rngs)
        self.pointwise = GroupedPointwise(w, PAPER_POINTWISE_GROUPS, rngs=rngs)
        self.head = Dense(w, 1, (None, None), rngs=rngs)

    def __call__(self, latents: jax.Array, text: jax.Array | None = None) -> jax.Array:
        b, f = latents.shape[:2]
        x = latents.astype(jnp.float32)
        h = self.trunk(x.reshape(b * f, *x.shape[2:]))  # [B*F, H', W', w]
        pooled = h.mean(axis=(1, 2)).reshape(b, f, -1)  # average pool: one feature per frame
        if self.config.kind == "paper_text":
            if text is None:
                raise ValueError("The text-conditioned LRM needs text embeddings")
            text = text.astype(jnp.float32)
            tokens = jax.nn.silu(self.text_mlp(text))  # [B, L, w]
            q, k, v = self.to_q(pooled), self.to_k(tokens), self.to_v(tokens)
            logits = jnp.einsum("bfd,bld->bfl", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
            # Padding tokens (all zero, as precomputed umT5 embeddings are) take no attention; a clip whose
            # text is all padding (the null text) attends to every token alike.
            real = jnp.any(text != 0, axis=-1)  # [B, L]
            real = real | ~jnp.any(real, axis=-1, keepdims=True)
            logits = jnp.where(real[:, None, :], logits, -1e30)
            pooled = pooled + jnp.einsum("bfl,bld->bfd", jax.nn.softmax(logits, axis=-1), v)
        per_frame = self.head(jax.nn.silu(self.pointwise(pooled)))[..., 0]  # [B, F]
        return per_frame.mean(axis=1)


def make_lrm(cfg: LRMConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """The LRM of `cfg.kind`: the paper's layouts or this project's alternatives (module docstring)."""
    if cfg.kind in PAPER_KINDS:
        return PaperLatentRewardModel(cfg, rngs=rngs)
    return LatentRewardModel(cfg, rngs=rngs)


def parameter_count(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
