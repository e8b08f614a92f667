"""The consistency-model parameterisation with LCM's boundary scalings.

f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t), with (for sigma_data = 0.5, timestep scale 10)
  c_skip = sd^2 / ((10 t)^2 + sd^2),   c_out = 10 t / sqrt((10 t)^2 + sd^2)
so f(x, 0) = x exactly (the boundary condition) and f ~ x0_hat at the grid's timesteps (t >= 19).
The student and its EMA target are both evaluated through this function.
"""

from __future__ import annotations

import jax.numpy as jnp

from dollar_jax.diffusion.predictions import broadcast_to
from dollar_jax.diffusion.samplers import Denoiser


def boundary_scalings(t, sigma_data: float = 0.5, timestep_scale: float = 10.0):
    scaled = jnp.asarray(t, jnp.float32) * timestep_scale
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / jnp.sqrt(scaled**2 + sigma_data**2)
    return c_skip, c_out


def consistency_denoiser(denoiser: Denoiser, schedule, sigma_data: float = 0.5,
                         timestep_scale: float = 10.0) -> Denoiser:
    """Wrap a denoiser so that its x0 is the consistency function f; eps is made consistent with it."""

    def f(x_t, t):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x_t.shape[:1])
        x0_hat, _ = denoiser(x_t, t)
        c_skip, c_out = boundary_scalings(t, sigma_data, timestep_scale)
        x0 = broadcast_to(c_skip, x_t) * x_t.astype(jnp.float32) + broadcast_to(c_out, x_t) * x0_hat
        alpha, sigma = schedule.alpha_sigma(t)
        eps = (x_t - broadcast_to(alpha, x_t) * x0) / jnp.maximum(broadcast_to(sigma, x_t), 1e-8)
        return x0, eps

    return f
