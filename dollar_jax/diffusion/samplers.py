"""Denoisers (model + prediction type + guidance) and the one multi-step sampler.

A *denoiser* maps (x_t, t) to (x0_hat, eps_hat). Every sampler in the project is the same loop over a
descending timestep grid: predict (x0_hat, eps_hat) at t_i, then move to t_{i+1} with
    x_{i+1} = alpha(t_{i+1}) x0_hat + sigma(t_{i+1}) * noise
where noise is eps_hat (deterministic DDIM; on the flow schedule this *is* the Euler step) or fresh
Gaussian noise (consistency multistep sampling, used by the few-step student). After the last grid point
the target is clean data (alpha = 1, sigma = 0), or `final_timestep` for partial solves (the CD teacher).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dollar_jax.diffusion.guidance import guide, is_unguided
from dollar_jax.diffusion.predictions import broadcast_to, to_x0_eps
from dollar_jax.diffusion.schedules import Schedule

ApplyFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (x_t, t[B], text[B, L, D]) -> output
Denoiser = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]  # (x_t, t[B]) -> (x0, eps)
RENOISE = ("ddim", "fresh")


def guided_output(apply_fn: ApplyFn, x_t, t, text, null_text=None, scale: float | None = None,
                  convention: str = "uncond_anchor") -> jax.Array:
    """The model's raw output with classifier-free guidance (one batched call for cond + uncond)."""
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x_t.shape[:1])
    if scale is None or (not isinstance(scale, jax.Array) and is_unguided(float(scale), convention)):
        return apply_fn(x_t, t, text)
    if null_text is None:
        raise ValueError("Guidance needs the unconditional (null) text embedding")
    null_text = jnp.broadcast_to(null_text, text.shape) if null_text.ndim == 2 or null_text.shape[0] == 1 else null_text
    if null_text.shape != text.shape:
        raise ValueError(f"null text {null_text.shape} and text {text.shape} must have the same shape (pad them)")
    both = apply_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), jnp.concatenate([text, null_text]))
    cond, uncond = jnp.split(both, 2)
    return guide(cond.astype(jnp.float32), uncond.astype(jnp.float32), scale, convention)


def make_denoiser(apply_fn: ApplyFn, schedule: Schedule, prediction_type: str, text, null_text=None,
                  guidance_scale: float | None = None, convention: str = "uncond_anchor") -> Denoiser:
    def denoise(x_t, t):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x_t.shape[:1])
        out = guided_output(apply_fn, x_t, t, text, null_text, guidance_scale, convention)
        alpha, sigma = schedule.alpha_sigma(t)
        return to_x0_eps(out, x_t, alpha, sigma, prediction_type)

    return denoise


def ddim_step(x0: jax.Array, eps: jax.Array, alpha_next, sigma_next) -> jax.Array:
    return broadcast_to(alpha_next, x0) * x0 + broadcast_to(sigma_next, x0) * eps


def sample(denoiser: Denoiser, x_start: jax.Array, timesteps, schedule: Schedule, *, renoise: str = "ddim",
           rng: jax.Array | None = None, final_timestep=None) -> jax.Array:
    """Run the grid `timesteps` (descending; static length) from `x_start` at timesteps[0].

    `timesteps` is [n] (one grid for the batch) or [n, B] (a grid per example, e.g. the CD teacher's
    partial solves); `final_timestep` is None (end at clean data), a scalar or [B].
    Returns clean samples (float32), or x at `final_timestep` when it is given.
    """
    if renoise not in RENOISE:
        raise ValueError(f"renoise must be one of {RENOISE}, got {renoise!r}")
    if renoise == "fresh" and rng is None:
        raise ValueError("renoise='fresh' (consistency sampling) needs an rng")
    batch = x_start.shape[:1]
    timesteps = jnp.asarray(timesteps, jnp.float32)
    timesteps = jnp.broadcast_to(timesteps[:, None], (timesteps.shape[0], *batch)) if timesteps.ndim == 1 else timesteps
    alphas, sigmas = schedule.alpha_sigma(timesteps)
    if final_timestep is None:
        a_end, s_end = jnp.ones((1, *batch), jnp.float32), jnp.zeros((1, *batch), jnp.float32)
    else:
        t_end = jnp.broadcast_to(jnp.asarray(final_timestep, jnp.float32), batch)
        a_end, s_end = (v[None] for v in schedule.alpha_sigma(t_end))
    alpha_next = jnp.concatenate([alphas[1:], a_end])
    sigma_next = jnp.concatenate([sigmas[1:], s_end])
    rng = jax.random.key(0) if rng is None else rng

    def step(carry, inputs):
        x, key = carry
        t, a_n, s_n = inputs
        x0, eps = denoiser(x, t)
        if renoise == "fresh":
            key, sub = jax.random.split(key)
            eps = jax.random.normal(sub, x.shape, jnp.float32)
        return (ddim_step(x0, eps, a_n, s_n), key), None

    (x, _), _ = jax.lax.scan(step, (x_start.astype(jnp.float32), rng), (timesteps, alpha_next, sigma_next))
    return x
