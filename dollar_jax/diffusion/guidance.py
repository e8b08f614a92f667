"""Classifier-free guidance, with its convention named.

Codebases disagree on what "guidance scale w" means, and the difference is a shift of the scale by one:
  "uncond_anchor":  out = u + w (c - u)   diffusers, Ho & Salimans; w = 1 is no guidance.
  "cond_anchor":    out = c + w (c - u)   the DOLLAR paper's CD teacher (v_c + w (v_c - v_u)); w = 0 is none.
So cond_anchor at w equals uncond_anchor at w + 1. Guidance is linear, so it can be applied to any
prediction type (or to x0/eps) with the same result.
"""

from __future__ import annotations

import jax

CFG_CONVENTIONS = {"uncond_anchor": "u + w (c - u)", "cond_anchor": "c + w (c - u)"}


def guide(cond: jax.Array, uncond: jax.Array, scale: float | jax.Array, convention: str) -> jax.Array:
    if convention == "uncond_anchor":
        return uncond + scale * (cond - uncond)
    if convention == "cond_anchor":
        return cond + scale * (cond - uncond)
    raise ValueError(f"Unknown CFG convention {convention!r}; choose one of {sorted(CFG_CONVENTIONS)}")


def is_unguided(scale: float, convention: str) -> bool:
    """True when the guided output equals the conditional one (no need for the unconditional pass)."""
    return (convention == "uncond_anchor" and scale == 1.0) or (convention == "cond_anchor" and scale == 0.0)
