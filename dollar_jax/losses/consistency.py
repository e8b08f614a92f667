"""Consistency distillation (LCM family) with a multi-step teacher, on forward-diffused real data.

Pick a pair of teacher-grid timesteps t_high > t_low that are m grid steps apart (the paper: m = 5 DDIM
steps on the 50-step grid, 20 timesteps each), diffuse real data to x_{t_high}, let the guided teacher
solve from t_high down to t_low, and pull the student's consistency function at (x_{t_high}, t_high)
toward the EMA target's at (x_hat_{t_low}, t_low):
    L = d( f_student(x_{t_high}, t_high), stop_grad f_ema(x_hat_{t_low}, t_low) )
with d the pseudo-Huber distance sqrt(diff^2 + c^2) - c (c = 0.001) or L2.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dollar_jax.diffusion.predictions import broadcast_to
from dollar_jax.diffusion.samplers import Denoiser, sample

DISTANCES = ("huber", "l2")
ConsistencyFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t, t[B]) -> x0
TeacherSolve = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (x_high, path [m, B], t_low [B]) -> x_low


def distance(a: jax.Array, b: jax.Array, kind: str, huber_c: float = 0.001) -> jax.Array:
    diff = a.astype(jnp.float32) - b.astype(jnp.float32)
    if kind == "huber":
        return jnp.mean(jnp.sqrt(jnp.square(diff) + huber_c**2) - huber_c)
    if kind == "l2":
        return jnp.mean(jnp.square(diff))
    raise ValueError(f"CD distance must be one of {DISTANCES}, got {kind!r}")


def timestep_pairs(rng: jax.Array, batch: int, grid: np.ndarray, m: int):
    """Per example: (t_high, the m solver timesteps [m, B] from t_high down, t_low). `grid` is ascending."""
    grid = jnp.asarray(np.sort(np.asarray(grid, np.float32)))
    if not 1 <= m < grid.shape[0]:
        raise ValueError(f"CD needs 1 <= m < {grid.shape[0]} grid points, got m={m}")
    k = jax.random.randint(rng, (batch,), m, grid.shape[0])
    path = jnp.stack([grid[k - i] for i in range(m)])  # [m, B]: t_high, ..., one step above t_low
    return grid[k], path, grid[k - m]


def ddim_teacher_solve(teacher: Denoiser, schedule) -> TeacherSolve:
    """The teacher's deterministic DDIM from x_{t_high} along `path` to t_low."""
    return lambda x, path, t_low: sample(teacher, x, path, schedule, final_timestep=t_low)


def consistency_loss(student: ConsistencyFn, target: ConsistencyFn, teacher_solve: TeacherSolve, x0: jax.Array,
                     rng: jax.Array, schedule, grid: np.ndarray, m: int, kind: str = "huber",
                     huber_c: float = 0.001):
    """Returns (loss, aux). Gradient reaches only `student` (the target and the teacher are stopped)."""
    k_t, k_eps = jax.random.split(rng)
    x0 = x0.astype(jnp.float32)
    t_high, path, t_low = timestep_pairs(k_t, x0.shape[0], grid, m)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    alpha, sigma = schedule.alpha_sigma(t_high)
    x_high = broadcast_to(alpha, x0) * x0 + broadcast_to(sigma, x0) * eps
    x_low = jax.lax.stop_gradient(teacher_solve(x_high, path, t_low))
    target_x0 = jax.lax.stop_gradient(target(x_low, t_low))
    pred_x0 = student(x_high, t_high)
    return distance(pred_x0, target_x0, kind, huber_c), {"t_high": t_high}
