"""The diffusion (denoising) loss, as a pure function of parameters and a batch.

It trains the teacher (pre-training on the embedded world) and, in distillation, the fake-score model on
the student's samples. Any schedule and prediction type: the regression target is the prediction type's
own target computed from (x0, eps), so the optimum is the same denoiser whatever the parameterisation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dollar_jax.diffusion.predictions import broadcast_to, from_x0_eps

ApplyFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def sample_timesteps(rng: jax.Array, batch: int, schedule, t_min: float = 0.0, t_max: float | None = None,
                     discrete: bool | None = None, warp: bool = True,
                     logit_normal: tuple[float, float] | None = None) -> jax.Array:
    """Training timesteps in [t_min, t_max] (integers on a discrete VP schedule), then through the schedule's
    warp (the flow shift; the identity on VP) unless `warp` is False. Uniform, or with `logit_normal=(m, s)`
    at t_min + (t_max - t_min) sigmoid(m + s z), z ~ N(0, 1): SD3's density, which spends fewer samples on the
    nearly clean and the nearly pure-noise ends."""
    t_max = schedule.t_max if t_max is None else t_max
    discrete = hasattr(schedule, "alphas_cumprod") if discrete is None else discrete
    if logit_normal is not None:
        mean, std = logit_normal
        u = jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,)))
        t = t_min + u * (t_max - t_min)
        t = jnp.round(t) if discrete else t
    elif discrete:
        t = jax.random.randint(rng, (batch,), int(round(t_min)), int(round(t_max)) + 1).astype(jnp.float32)
    else:
        t = jax.random.uniform(rng, (batch,), minval=t_min, maxval=t_max)
    return schedule.warp_timesteps(t) if warp else t


def drop_text(rng: jax.Array, text: jax.Array, null_text: jax.Array, p: float) -> jax.Array:
    """Replace each example's text with the null embedding with probability p (classifier-free training)."""
    if p <= 0:
        return text
    keep = jax.random.uniform(rng, (text.shape[0],)) >= p
    return jnp.where(keep[:, None, None], text, jnp.broadcast_to(null_text, text.shape).astype(text.dtype))


def denoising_loss(apply_fn: ApplyFn, x0: jax.Array, text: jax.Array, rng: jax.Array, schedule,
                   prediction_type: str, t_min: float = 0.0, t_max: float | None = None,
                   logit_normal: tuple[float, float] | None = None):
    """Mean squared error of the model's prediction at x_t = alpha x0 + sigma eps. Returns (loss, aux).
    Timesteps uniform, or logit-normal (sample_timesteps)."""
    k_t, k_eps = jax.random.split(rng)
    x0 = x0.astype(jnp.float32)
    t = sample_timesteps(k_t, x0.shape[0], schedule, t_min, t_max, logit_normal=logit_normal)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = broadcast_to(alpha, x0) * x0 + broadcast_to(sigma, x0) * eps
    target = from_x0_eps(x0, eps, alpha, sigma, prediction_type)
    pred = apply_fn(x_t, t, text).astype(jnp.float32)
    per_example = jnp.mean(jnp.square(pred - target), axis=tuple(range(1, x0.ndim)))
    return jnp.mean(per_example), {"t": t, "per_example": per_example}
