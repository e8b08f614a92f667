"""How the few-step student makes its training samples, and on which timestep grids.

  backward_simulation (DMD2, default): from pure noise, run the student's own chain (predict x0, re-noise
      to the next timestep) without gradient for a random number j of steps, then take the student's
      prediction at timestep T[j] with gradient. Every step of the chain is trained on inputs the student
      itself produces, exactly the distribution it meets when sampling.
  noised_data: forward-diffuse a real latent to a random student timestep T[j] and predict x0 from it.

A student may train on several grids at once (e.g. 4, 2 and 1 steps) so that one model serves every step
count: `StudentGrids` holds them, already warped by the schedule (the flow shift), padded into one table.
The grid is drawn once per batch ("per_iteration") or per example ("per_example").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dollar_jax.diffusion.predictions import broadcast_to
from dollar_jax.diffusion.samplers import Denoiser

SAMPLE_MODES = ("backward_simulation", "noised_data")
GRID_SAMPLING = ("per_iteration", "per_example")


@dataclasses.dataclass(frozen=True)
class StudentGrids:
    """Descending timestep grids in model units, after the schedule's warp. `table` is [G, N] (each row padded
    with its last timestep), `lengths` [G] the real lengths."""
    grids: tuple[tuple[float, ...], ...]

    @property
    def table(self) -> np.ndarray:
        n = max(len(g) for g in self.grids)
        return np.asarray([list(g) + [g[-1]] * (n - len(g)) for g in self.grids], np.float32)

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([len(g) for g in self.grids], np.int32)


def student_grids(nominal, schedule) -> StudentGrids:
    """`nominal`: one grid (t_1 > ... > t_n, in the paper's units, e.g. 999/749/499/249) or several; each
    goes through `schedule.warp_timesteps` (the flow shift; identity on VP)."""
    nominal = [nominal] if np.ndim(nominal[0]) == 0 else list(nominal)
    grids = []
    for g in nominal:
        g = np.asarray(g, np.float64)
        if g.ndim != 1 or len(g) < 1 or np.any(np.diff(g) >= 0) or g[-1] < 0 or g[0] > schedule.t_max:
            raise ValueError(f"a student grid must be strictly descending timesteps in [0, {schedule.t_max}], "
                             f"got {tuple(g.tolist())}")
        grids.append(tuple(float(t) for t in np.asarray(schedule.warp_timesteps(g), np.float32)))
    return StudentGrids(tuple(grids))


def draw_grid_positions(rng: jax.Array, grids: StudentGrids, batch: int, per_example: bool):
    """(grid index [B], position j [B]): a grid, then a step uniformly among that grid's steps."""
    k_g, k_j = jax.random.split(rng)
    lengths = jnp.asarray(grids.lengths)
    shape = (batch,) if per_example else ()
    g = jax.random.randint(k_g, shape, 0, lengths.shape[0])
    j = jnp.floor(jax.random.uniform(k_j, shape) * lengths[g]).astype(jnp.int32)
    j = jnp.minimum(j, lengths[g] - 1)
    return jnp.broadcast_to(g, (batch,)), jnp.broadcast_to(j, (batch,))


def training_sample(student: Denoiser, student_no_grad: Denoiser, noise: jax.Array, grids, schedule,
                    rng: jax.Array, mode: str = "backward_simulation", data: jax.Array | None = None,
                    per_example: bool = False):
    """(x0 with gradient [B, ...], the student timestep it was predicted at [B]).

    `grids`: a StudentGrids, or one descending grid of model timesteps (used as given).
    `student_no_grad` must be the same denoiser with stopped parameters (the chain carries no gradient).
    """
    if not isinstance(grids, StudentGrids):
        grids = StudentGrids((tuple(float(t) for t in np.asarray(grids, np.float32)),))
    table = jnp.asarray(grids.table)
    k_pos, k_chain, k_data = jax.random.split(rng, 3)
    batch = noise.shape[0]
    g, j = draw_grid_positions(k_pos, grids, batch, per_example)
    if mode == "backward_simulation":

        def body(i, carry):
            x, key = carry
            key, sub = jax.random.split(key)
            x0, _ = student_no_grad(x, table[g, i])
            a, s = schedule.alpha_sigma(table[g, jnp.minimum(i + 1, table.shape[1] - 1)])
            step = broadcast_to(a, x) * x0 + broadcast_to(s, x) * jax.random.normal(sub, x.shape, jnp.float32)
            # Examples already at their own position j keep their x (per-example grids stop at different i).
            return jnp.where((i < j).reshape((-1,) + (1,) * (x.ndim - 1)), step, x), key

        x_j, _ = jax.lax.fori_loop(0, jnp.max(j), body, (noise.astype(jnp.float32), k_chain))
        x_j = jax.lax.stop_gradient(x_j)
    elif mode == "noised_data":
        if data is None:
            raise ValueError("sample mode 'noised_data' needs real data latents")
        a, s = schedule.alpha_sigma(table[g, j])
        x_j = broadcast_to(a, noise) * data.astype(jnp.float32) + broadcast_to(s, noise) * noise
    else:
        raise ValueError(f"sample mode must be one of {SAMPLE_MODES}, got {mode!r}")
    t_j = table[g, j]
    x0, _ = student(x_j, t_j)
    return x0, t_j
