"""Variational score distillation in the DMD2 form (no GAN term).

For a student sample x = G(eps), diffuse it to x_t at t ~ U[t_min, t_max], denoise with the real score
(the teacher, with CFG) and the fake score (trained online on the student's samples, no CFG):
    grad = (x0_fake - x0_real) / mean|x - x0_real|        (per example; DMD2's normalisation)
    L    = 0.5 * mean (x - stop_grad(x - grad))^2
so dL/dx = grad / numel: the student moves away from where the fake score says its samples are and toward
the teacher's. When the fake score equals the real one the gradient is exactly zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dollar_jax.diffusion.predictions import broadcast_to
from dollar_jax.diffusion.samplers import Denoiser
from dollar_jax.losses.denoising import sample_timesteps

NORMALISER_FLOOR = 1e-6


def vsd_gradient(x: jax.Array, x0_real: jax.Array, x0_fake: jax.Array) -> jax.Array:
    """(x0_fake - x0_real) / mean|x - x0_real| per example; finite by construction (DMD2 zeroes NaNs)."""
    axes = tuple(range(1, x.ndim))
    weight = jnp.maximum(jnp.mean(jnp.abs(x - x0_real), axis=axes, keepdims=True), NORMALISER_FLOOR)
    return jnp.nan_to_num((x0_fake - x0_real) / weight)


def vsd_surrogate(x: jax.Array, grad: jax.Array) -> jax.Array:
    return 0.5 * jnp.mean(jnp.square(x - jax.lax.stop_gradient(x - grad)))


def vsd_loss(x: jax.Array, real: Denoiser, fake: Denoiser, rng: jax.Array, schedule, t_min: float, t_max: float):
    """Returns (loss, aux). Only `x` carries gradient; real and fake see a stop-gradient copy."""
    k_t, k_eps = jax.random.split(rng)
    x_sg = jax.lax.stop_gradient(x.astype(jnp.float32))
    t = sample_timesteps(k_t, x.shape[0], schedule, t_min, t_max)
    eps = jax.random.normal(k_eps, x.shape, jnp.float32)
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = broadcast_to(alpha, x_sg) * x_sg + broadcast_to(sigma, x_sg) * eps
    x0_real, _ = real(x_t, t)
    x0_fake, _ = fake(x_t, t)
    grad = jax.lax.stop_gradient(vsd_gradient(x_sg, x0_real, x0_fake))
    return vsd_surrogate(x.astype(jnp.float32), grad), {"t": t, **vsd_statistics(x_sg, x0_real, x0_fake, grad)}


def vsd_statistics(x, x0_real, x0_fake, grad) -> dict:
    """Scalars that show what VSD is doing: the denoisers' predictions and DMD2's normaliser
    mean|x - x0_real| (a normaliser shrinking towards 0 while |x0_fake - x0_real| does not is a blow-up)."""
    return {"vsd_grad_abs": jnp.mean(jnp.abs(grad)), "vsd_normaliser": jnp.mean(jnp.abs(x - x0_real)),
            "vsd_real_fake_gap": jnp.mean(jnp.abs(x0_fake - x0_real)),
            "x0_real_mean": jnp.mean(x0_real), "x0_real_std": jnp.std(x0_real),
            "x0_fake_mean": jnp.mean(x0_fake), "x0_fake_std": jnp.std(x0_fake)}
