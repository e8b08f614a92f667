"""Small NNX building blocks whose parameters carry logical axis names.

Every parameter is created through `param`, which records its logical axes as `sharding_names` metadata
(read back by `logical_axes`). Eager sharding is off: models are built abstractly (`nnx.eval_shape`) or on
the host, and placement happens once, from the rules table, when the state is put on the mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None], dtype) -> nnx.Param:
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), sharding_names=tuple(axes), eager_sharding=False)


def logical_axes(state: nnx.State) -> dict:
    """Pure-dict tree of logical-axis tuples matching `nnx.to_pure_dict(state)`.

    Parameters created without logical names (none in this project's models) map to None: replicated.
    """
    specs = nnx.get_partition_spec(state)
    return jax.tree.map(
        lambda p: tuple(p) if p else None,
        nnx.to_pure_dict(specs),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec) or x is None,
    )


zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones
lecun_normal = jax.nn.initializers.lecun_normal()


class Dense(nnx.Module):
    """y = x @ kernel + bias with kernel (in, out); computes in `dtype`, stores in `param_dtype`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        axes: tuple[str | None, str | None],
        *,
        rngs: nnx.Rngs,
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init: Initializer = lecun_normal,
    ):
        self.kernel = param(rngs, kernel_init, (in_features, out_features), axes, param_dtype)
        self.bias = param(rngs, zeros, (out_features,), (axes[1],), param_dtype) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        # Flatten the leading axes: the kernel's gradient is then one plain GEMM (contracting a single axis).
        # XLA:CPU runs a contraction over (batch, tokens) as a slow generic loop, ~5x slower end to end.
        lead = x.shape[:-1]
        y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), self.kernel[...].astype(self.dtype))
        y = y.reshape(*lead, y.shape[-1])
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def layer_norm(x: jax.Array, eps: float, scale: jax.Array | None = None, bias: jax.Array | None = None) -> jax.Array:
    """LayerNorm over the last axis, always in float32 (as Wan/diffusers do); returns float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y


class LayerNorm(nnx.Module):
    """Affine LayerNorm (float32 math)."""

    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, param_dtype=jnp.float32, axis_name: str = "norm"):
        self.scale = param(rngs, ones, (dim,), (axis_name,), param_dtype)
        self.bias = param(rngs, zeros, (dim,), (axis_name,), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.eps, self.scale[...], self.bias[...])


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale, float32 math, output in the input dtype."""

    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, param_dtype=jnp.float32, axis_name: str = "norm"):
        self.scale = param(rngs, ones, (dim,), (axis_name,), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Timestep features [cos | sin] (diffusers' Timesteps with flip_sin_to_cos=True, shift 0), float32."""
    half = dim // 2
    freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Conv(nnx.Module):
    """N-d convolution, channels-last, kernel (*window, in, out); 'SAME' padding, given strides."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Sequence[int],
        *,
        rngs: nnx.Rngs,
        strides: Sequence[int] | None = None,
        padding: str | Sequence[tuple[int, int]] = "SAME",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init: Initializer = lecun_normal,
    ):
        window = tuple(kernel_size)
        axes = (None,) * len(window) + ("conv_in", "conv_out")
        self.kernel = param(rngs, kernel_init, (*window, in_features, out_features), axes, param_dtype)
        self.bias = param(rngs, zeros, (out_features,), ("conv_out",), param_dtype)
        self.strides = tuple(strides) if strides is not None else (1,) * len(window)
        self.padding = padding
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        window = kernel.shape[:-2]
        x = x.astype(self.dtype)
        if self.padding == "SAME" and all(s == 1 for s in self.strides):
            # im2col: the window's shifted views side by side, then one matmul. On CPU this is ~1.4x faster
            # than XLA's convolution for the small kernels used here, and it is the same on accelerators.
            pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in window] + [(0, 0)]
            xp = jnp.pad(x, pads)
            sizes = x.shape[1:-1]
            views = []
            for offset in np.ndindex(*window):
                index = (slice(None),) + tuple(slice(o, o + n) for o, n in zip(offset, sizes)) + (slice(None),)
                views.append(xp[index])
            y = jnp.concatenate(views, axis=-1) @ kernel.reshape(-1, kernel.shape[-1])
        else:
            spatial = "DHW"[-len(self.strides):]  # 1-, 2- or 3-d
            dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
            y = jax.lax.conv_general_dilated(x, kernel, self.strides, self.padding, dimension_numbers=dn)
        return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
    """GroupNorm over the channel (last) axis and all spatial axes, float32 math."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs, eps: float = 1e-5, param_dtype=jnp.float32):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
        self.scale = param(rngs, ones, (channels,), ("norm",), param_dtype)
        self.bias = param(rngs, zeros, (channels,), ("norm",), param_dtype)
        self.groups, self.eps = groups, eps

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        b, *spatial, c = x.shape
        g = x.astype(jnp.float32).reshape(b, -1, self.groups, c // self.groups)
        mean = g.mean(axis=(1, 3), keepdims=True)
        var = g.var(axis=(1, 3), keepdims=True)
        g = (g - mean) * jax.lax.rsqrt(var + self.eps)
        y = g.reshape(b, *spatial, c) * self.scale[...] + self.bias[...]
        return y.astype(dtype)


def abstract(make):
    """`nnx.eval_shape(make)` with no mesh in context.

    Parameters carry *logical* axis names; Flax would read them as mesh axis names if a mesh were active.
    Placement happens later, through the rules table (dollar_jax/parallel/sharding.py).
    """
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        return nnx.eval_shape(make)
