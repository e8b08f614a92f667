"""Optimisers and learning-rate schedules from config sections."""

from __future__ import annotations

import optax

OPTIMIZERS = ("adamw", "adam", "sgd")
DECAYS = ("cosine", "constant", "linear")


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


def make_optimizer(c, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    if c.name not in OPTIMIZERS:
        raise ValueError(f"optimizer name must be one of {OPTIMIZERS}, got {c.name!r}")
    lr = learning_rate_schedule(c, total_steps)
    if c.name == "adamw":
        core = optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
    elif c.name == "adam":
        core = optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps)
    else:
        core = optax.sgd(lr)
    chain = [optax.clip_by_global_norm(c.grad_clip)] if c.grad_clip and c.grad_clip > 0 else []
    return optax.chain(*chain, core), lr
