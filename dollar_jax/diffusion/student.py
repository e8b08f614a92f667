"""How the few-step student makes its training samples.

  backward_simulation (DMD2, default): from pure noise, run the student's own chain (predict x0, re-noise
      to the next timestep) without gradient for a random number j of steps, then take the student's
      prediction at timestep T[j] with gradient. Every step of the chain is trained on inputs the student
      itself produces, exactly the distribution it meets when sampling.
  noised_data: forward-diffuse a real latent to a random student timestep T[j] and predict x0 from it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dollar_jax.diffusion.predictions import broadcast_to
from dollar_jax.diffusion.samplers import Denoiser

SAMPLE_MODES = ("backward_simulation", "noised_data")


def training_sample(student: Denoiser, student_no_grad: Denoiser, noise: jax.Array, timesteps, schedule,
                    rng: jax.Array, mode: str = "backward_simulation", data: jax.Array | None = None):
    """(x0 with gradient [B, ...], the student timestep it was predicted at [B]).

    `student_no_grad` must be the same denoiser with stopped parameters (the chain carries no gradient).
    """
    timesteps = jnp.asarray(timesteps, jnp.float32)
    n = timesteps.shape[0]
    k_j, k_chain, k_data = jax.random.split(rng, 3)
    j = jax.random.randint(k_j, (), 0, n)
    batch = noise.shape[:1]
    if mode == "backward_simulation":

        def body(i, carry):
            x, key = carry
            key, sub = jax.random.split(key)
            x0, _ = student_no_grad(x, jnp.broadcast_to(timesteps[i], batch))
            a, s = schedule.alpha_sigma(timesteps[i + 1])
            return a * x0 + s * jax.random.normal(sub, x.shape, jnp.float32), key

        x_j, _ = jax.lax.fori_loop(0, j, body, (noise.astype(jnp.float32), k_chain))
        x_j = jax.lax.stop_gradient(x_j)
    elif mode == "noised_data":
        if data is None:
            raise ValueError("sample mode 'noised_data' needs real data latents")
        a, s = schedule.alpha_sigma(jnp.broadcast_to(timesteps[j], batch))
        x_j = broadcast_to(a, noise) * data.astype(jnp.float32) + broadcast_to(s, noise) * noise
    else:
        raise ValueError(f"sample mode must be one of {SAMPLE_MODES}, got {mode!r}")
    t_j = jnp.broadcast_to(timesteps[j], batch)
    x0, _ = student(x_j, t_j)
    return x0, t_j
