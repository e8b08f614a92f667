"""The latent-reward losses: regress the pixel reward from latents, then climb the regressor.

    L_LRM = mean over labelled examples (R_lrm(z, text) - R(decode(z), prompt))^2
    L_FT  = -mean R_lrm(G(eps), text)
Neither touches the decoder or the pixel reward: their only gradient path is the small LRM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lrm_regression_loss(lrm, latents, text, scores, valid):
    """MSE over the examples with valid = 1 (none valid: 0, and zero gradients)."""
    pred = lrm(latents, text)
    w = valid.astype(jnp.float32)
    loss = jnp.sum(w * jnp.square(pred - scores)) / jnp.maximum(jnp.sum(w), 1.0)
    return loss, pred


def reward_finetune_loss(lrm, x, text):
    """-mean LRM score of the student's samples (gradient flows into x, and from there into the student)."""
    return -jnp.mean(lrm(x, text))


def pearson(a, b) -> jax.Array:
    a, b = a - jnp.mean(a), b - jnp.mean(b)
    return jnp.sum(a * b) / jnp.maximum(jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b)), 1e-12)
