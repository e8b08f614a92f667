"""Low-rank adapters (LoRA) over a frozen DiT: a model that is the teacher plus trained low-rank deltas.

The DOLLAR step's fake score starts as a copy of the teacher and follows the student's distribution. Kept as a
full copy, it costs the parameters, Adam's moments and a gradient of a whole DiT (for Wan2.1-14B the largest
item of the state). With `distill.fake_lora_rank = r` it is instead the frozen teacher plus, on every linear
kernel of the blocks (self- and cross-attention q, k, v, out; the FFN's two layers),
    W = W_teacher + (alpha / r) * down @ up,    down [in, r] ~ N(0, 1 / in),  up [r, out] = 0,
so that it equals the teacher at the start, as the full copy does (MagicDistillation and FastVideo train their
fake score this way). Only `down` and `up` are trained and stored.

Parameters are pure dicts mirroring the model's: each adapted linear's dict {"kernel", "bias"} has a LoRA twin
{"lora_down", "lora_up"} at the same path (stacked over layers like the kernels, with their logical axes).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

ADAPTED = ("to_q", "to_k", "to_v", "to_out", "fc_in", "fc_out")  # the linear layers of every block


def _walk_adapted(tree: Mapping, leaf_fn) -> dict:
    """{...: leaf_fn(linear's subtree)} for every adapted linear layer under tree["blocks"], nested as in tree."""
    def walk(sub):
        out = {}
        for name, child in sub.items():
            if not isinstance(child, Mapping):
                continue
            if name in ADAPTED and "kernel" in child:
                out[name] = leaf_fn(child)
            else:
                inner = walk(child)
                if inner:
                    out[name] = inner
        return out

    return {"blocks": walk(tree["blocks"])}


def lora_init(params: Mapping, rank: int, key: jax.Array, dtype=jnp.float32) -> dict:
    """LoRA parameters at `rank` for the blocks of `params` (a DiT's pure dict; abstract shapes work too, under
    jax.eval_shape): down ~ N(0, 1 / in), up = 0, so that the adapted model starts as the base."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    keys = itertools.count()

    def adapter(linear):
        *stack, d_in, d_out = linear["kernel"].shape
        k = jax.random.fold_in(key, next(keys))
        down = jax.random.normal(k, (*stack, d_in, rank), jnp.float32) / jnp.sqrt(float(d_in))
        return {"lora_down": down.astype(dtype), "lora_up": jnp.zeros((*stack, rank, d_out), dtype)}

    return _walk_adapted(params, adapter)


def lora_axes(axes: Mapping) -> dict:
    """The adapters' logical axes from the model's: down keeps the kernel's input axis, up its output axis
    (the rank is never split), both keep the stacked-layers axis."""
    def adapter(linear):
        *lead, ax_in, ax_out = linear["kernel"]
        return {"lora_down": (*lead, ax_in, None), "lora_up": (*lead, None, ax_out)}

    return _walk_adapted(axes, adapter)


def lora_merge(base: Mapping, lora: Mapping, scale: float) -> dict:
    """`base` with W + scale * down @ up on every kernel `lora` adapts; every other parameter is `base`'s own.
    The merged kernels are float32 whatever the base's dtype: rounding W + delta back to a bfloat16 teacher's
    precision would drop every delta smaller than half a bfloat16 ulp of W (most of them, early on)."""
    def walk(b, adapters):
        if "lora_down" in adapters:
            delta = jnp.einsum("...ir,...ro->...io", adapters["lora_down"].astype(jnp.float32),
                               adapters["lora_up"].astype(jnp.float32))
            return {**b, "kernel": b["kernel"].astype(jnp.float32) + scale * delta}
        return {name: walk(sub, adapters[name]) if name in adapters else sub for name, sub in b.items()}

    return walk(base, lora)


def lora_scale(rank: int, alpha: float) -> float:
    """alpha / rank; alpha 0 means alpha = rank (scale 1)."""
    return (alpha or rank) / rank
