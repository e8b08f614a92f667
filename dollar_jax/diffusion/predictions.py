"""Every prediction type, converted to and from (x0_hat, eps_hat) in one place.

With x_t = a x0 + s eps (a = alpha_t, s = sigma_t):
  eps          the noise                      x0 = (x_t - s eps) / a
  x0           the clean sample               eps = (x_t - a x0) / s
  v            a eps - s x0 (Salimans & Ho)   x0 = (a x_t - s v) / (a^2 + s^2)
  flow         eps - x0 (Wan's velocity)      x0 = (x_t - s u) / (a + s)
  conjugate_v  x0 - eps (the DOLLAR paper)    x0 = (x_t + s c) / (a + s)
The v formula holds for any schedule (it reduces to a x_t - s v when a^2 + s^2 = 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PREDICTION_TYPES = ("eps", "x0", "v", "flow", "conjugate_v")


def broadcast_to(coef, x: jax.Array) -> jax.Array:
    """A per-example coefficient [B] (or scalar) shaped to broadcast against x [B, ...]."""
    coef = jnp.asarray(coef, jnp.float32)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def _check(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"Unknown prediction type {prediction_type!r}; choose one of {PREDICTION_TYPES}")


def to_x0_eps(output: jax.Array, x_t: jax.Array, alpha, sigma, prediction_type: str):
    """Model output -> (x0_hat, eps_hat), float32."""
    _check(prediction_type)
    out, x = output.astype(jnp.float32), x_t.astype(jnp.float32)
    a, s = broadcast_to(alpha, x), broadcast_to(sigma, x)
    if prediction_type == "eps":
        return (x - s * out) / a, out
    if prediction_type == "x0":
        return out, (x - a * out) / s
    if prediction_type == "v":
        norm = a * a + s * s
        return (a * x - s * out) / norm, (s * x + a * out) / norm
    if prediction_type == "flow":
        x0 = (x - s * out) / (a + s)
        return x0, out + x0
    x0 = (x + s * out) / (a + s)  # conjugate_v
    return x0, x0 - out


def from_x0_eps(x0: jax.Array, eps: jax.Array, alpha, sigma, prediction_type: str) -> jax.Array:
    """(x0, eps) -> the regression target of a prediction type (the inverse of `to_x0_eps`)."""
    _check(prediction_type)
    a, s = broadcast_to(alpha, x0), broadcast_to(sigma, x0)
    return {
        "eps": lambda: eps,
        "x0": lambda: x0,
        "v": lambda: a * eps - s * x0,
        "flow": lambda: eps - x0,
        "conjugate_v": lambda: x0 - eps,
    }[prediction_type]()
