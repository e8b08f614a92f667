"""Attention for the video DiT: 3D rotary position embedding and the attention kernels.

Layout everywhere: q, k, v are [batch, tokens, heads, head_dim] ("BTNH").
Kernels, chosen by `DiTConfig.attention`:
  xla    - plain einsum/softmax attention with float32 softmax; runs everywhere and is the reference.
  cudnn  - fused flash attention through `jax.nn.dot_product_attention(implementation="cudnn")` (GPU only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

ATTENTION_KERNELS = ("xla", "cudnn")


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """How Wan splits head_dim over (frames, height, width): h = w = 2 * (d // 6), t gets the rest."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


@functools.lru_cache(maxsize=64)
def rope_tables(head_dim: int, grid: tuple[int, int, int], theta: float, max_seq_len: int):
    """cos/sin tables [tokens, head_dim // 2] (float32) for a (frames, height, width) token grid.

    Computed in float64 with NumPy at trace time: the grid is static, so the tables are constants.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    if max(grid) > max_seq_len:
        raise ValueError(f"token grid {grid} exceeds rope_max_seq_len={max_seq_len}")
    angles_per_axis = []
    for dim, n in zip(rope_axis_dims(head_dim), grid):
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles_per_axis.append(np.outer(np.arange(n, dtype=np.float64), freqs))  # [n, dim/2]
    f, h, w = grid
    a_t = np.broadcast_to(angles_per_axis[0][:, None, None, :], (f, h, w, angles_per_axis[0].shape[1]))
    a_h = np.broadcast_to(angles_per_axis[1][None, :, None, :], (f, h, w, angles_per_axis[1].shape[1]))
    a_w = np.broadcast_to(angles_per_axis[2][None, None, :, :], (f, h, w, angles_per_axis[2].shape[1]))
    angles = np.concatenate([a_t, a_h, a_w], axis=-1).reshape(f * h * w, head_dim // 2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, T, N, H] by per-token angles [T, H/2]."""
    dtype = x.dtype
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.reshape(x.shape).astype(dtype)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    scale = 1.0 / np.sqrt(q.shape[-1])
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32) * scale
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknh->bqnh", weights, v)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, kernel: str = "xla") -> jax.Array:
    """Full (non-causal, unmasked) attention, [B, Tq, N, H] x [B, Tk, N, H] -> [B, Tq, N, H]."""
    if kernel == "xla":
        return xla_attention(q, k, v)
    if kernel == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    raise ValueError(f"Unknown attention kernel {kernel!r}; choose one of {ATTENTION_KERNELS}")
