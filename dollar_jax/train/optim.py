"""Optimisers and learning-rate schedules from config sections."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adam", "sgd", "muon")
DECAYS = ("cosine", "constant", "linear")
MOMENT_DTYPES = ("float32", "bfloat16")


def learning_rate_schedule(c, total_steps: int) -> optax.Schedule:
    """Linear warm-up to c.learning_rate, then cosine/linear decay to final_lr_fraction (or constant)."""
    if c.decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {c.decay!r}")
    peak, warmup = float(c.learning_rate), int(c.warmup_steps)
    final = peak * float(c.final_lr_fraction)
    decay_steps = max(1, total_steps - warmup)
    if c.decay == "constant":
        after = optax.constant_schedule(peak)
    elif c.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(c.final_lr_fraction))
    else:
        after = optax.linear_schedule(peak, final, decay_steps)
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


class LeanAdamState(NamedTuple):
    count: jax.Array
    mu: optax.Updates | None  # None when b1 == 0: the first moment would be the gradient itself
    nu: optax.Updates


def scale_by_lean_adam(b1: float, b2: float, eps: float, moment_dtype=None,
                       drop_zero_first_moment: bool = True) -> optax.GradientTransformation:
    """optax.scale_by_adam with its memory trimmed, same arithmetic (bit-exact with float32 moments):

    - with b1 == 0 (DMD2's Adam) the first moment is the gradient (mu = 0 * mu + 1 * g, bias correction 1), so
      it is not stored: one parameter-sized buffer less (5 GiB for a 1.3B model in float32);
    - `moment_dtype` stores both moments in that dtype (e.g. bfloat16: half the optimiser memory; the update
      itself is computed in float32 and only the stored moments are rounded).
    """
    dtype = jnp.dtype(moment_dtype) if moment_dtype else None
    keep_mu = not (b1 == 0.0 and drop_zero_first_moment)

    def cast(tree, like):
        return jax.tree.map(lambda t, p: t.astype(dtype or p.dtype), tree, like)

    def init_fn(params):
        zeros = lambda: jax.tree.map(lambda p: jnp.zeros(p.shape, dtype or p.dtype), params)  # noqa: E731
        return LeanAdamState(count=jnp.zeros([], jnp.int32), mu=zeros() if keep_mu else None, nu=zeros())

    def update_fn(updates, state, params=None):
        del params
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        if keep_mu:
            mu = optax.tree.update_moment(updates, state.mu, b1, 1)
            mu_hat = optax.tree.bias_correction(mu, b1, count)
        else:
            mu, mu_hat = None, updates
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
        return out, LeanAdamState(count=count, mu=cast(mu, updates) if keep_mu else None, nu=cast(nu, updates))

    return optax.GradientTransformation(init_fn, update_fn)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm for real gradients, with the same arithmetic (bit-exact), but runnable where the
    optimiser state lives in host memory (`train/state.py`, opt_memory="host"): optax's norm adds each leaf's
    imaginary part squared, a zeros array that JAX places in device memory, which the host's update cannot mix
    with its host-memory gradients."""
    def update_fn(updates, state, params=None):
        del params
        squares = jax.tree.map(lambda g: jnp.sum(jnp.square(g)), updates)
        g_norm = jnp.sqrt(jax.tree.reduce(lambda a, b: a + b, squares, initializer=0))
        trigger = g_norm < max_norm
        return jax.tree.map(lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm),
                            updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def make_optimizer(c, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    if c.name not in OPTIMIZERS:
        raise ValueError(f"optimizer name must be one of {OPTIMIZERS}, got {c.name!r}")
    if c.moment_dtype not in MOMENT_DTYPES:
        raise ValueError(f"optimizer moment_dtype must be one of {MOMENT_DTYPES}, got {c.moment_dtype!r}")
    lr = learning_rate_schedule(c, total_steps)
    if c.name in ("adamw", "adam"):
        adam = scale_by_lean_adam(c.b1, c.b2, c.eps, c.moment_dtype, c.drop_zero_first_moment)
        decay = [optax.add_decayed_weights(c.weight_decay)] if c.name == "adamw" else []
        core = optax.chain(adam, *decay, optax.scale_by_learning_rate(lr))
    elif c.name == "muon":
        core = muon(lr, c)
    else:
        core = optax.sgd(lr)
    chain = [clip_by_global_norm(c.grad_clip)] if c.grad_clip and c.grad_clip > 0 else []
    return optax.chain(*chain, core), lr


def _muon_dims(params):
    """Which leaves Muon orthogonalises: the transformer blocks' weight matrices, stacked [layers, in, out] (the
    layers axis is a batch axis: each layer's matrix on its own). Everything else (the patch embedding, the
    condition embedder, the output head, biases, norms, modulation tables) takes Nesterov Adam, as Muon's authors
    prescribe for embeddings, heads and vectors. A tree without such matrices is an error, not a silent Adam."""
    from optax.contrib import MuonDimensionNumbers

    def spec(path, leaf):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if "blocks" in names and "kernel" in names and leaf.ndim == 3:
            return MuonDimensionNumbers(reduction_axis=1, output_axis=2)
        return None

    dims = jax.tree_util.tree_map_with_path(spec, params)
    if not jax.tree.leaves(dims):  # None is an empty subtree: no leaf means no block matrix
        raise ValueError("optimizer name 'muon' needs a DiT's stacked block kernels ([layers, in, out] under "
                         "'blocks'); this model has none: use 'adamw'")
    return dims


def muon(lr, c) -> optax.GradientTransformation:
    """Muon (momentum 0.95, Nesterov, 5 Newton-Schulz steps) on the block matrices, Nesterov Adam(c.b1, c.b2) on
    the rest, one learning rate for both: consistent_rms=0.2 scales Muon's updates to AdamW's RMS (Liu et al.,
    2025), so a rate tuned for AdamW carries over."""
    from optax.contrib import muon as optax_muon

    wd = float(c.weight_decay)
    return optax_muon(lr, beta=0.95, weight_decay=wd, adam_b1=float(c.b1), adam_b2=float(c.b2),
                      adam_weight_decay=wd, eps=float(c.eps), mu_dtype=jnp.dtype(c.moment_dtype),
                      muon_weight_dimension_numbers=_muon_dims, consistent_rms=0.2)
