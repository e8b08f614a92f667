"""Noise schedules as x_t = alpha(t) * x0 + sigma(t) * eps, with t in the model's timestep units [0, T].

Two families cover the paper's teacher and the public one:
  VPSchedule    - variance-preserving DDPM with T = 1000 discrete training steps (the paper's teacher).
  FlowSchedule  - rectified flow x_t = (1 - s) x0 + s eps with s = t / T (Wan2.1); `shift` moves timesteps
                  towards high noise, sigma' = shift sigma / (1 + (shift - 1) sigma), exactly as Wan's
                  schedulers do.
Both give a sampling grid of timesteps, high to low, for any number of steps, and `warp_timesteps`, the map
every training timestep draw goes through (the student's grid, VSD, the fake score's denoising loss): the
identity on VP, the shift on flow. A flow teacher never saw unshifted timesteps at inference, so a student
and a fake score trained on them would spend their capacity where the teacher's sampler never goes.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


@dataclasses.dataclass(frozen=True)
class VPSchedule:
    """Discrete VP DDPM. alpha = sqrt(alphas_cumprod[t]), sigma = sqrt(1 - alphas_cumprod[t]).

    Fractional t interpolates alphas_cumprod linearly between the two neighbouring training steps.
    The sampling grid is "trailing": for 50 steps t = 999, 979, ..., 19 (the paper's teacher grid); for
    4 / 2 / 1 steps it gives {999, 749, 499, 249} / {999, 499} / {999}, the paper's student timesteps.
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")

    @property
    def alphas_cumprod(self) -> np.ndarray:
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
        elif self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float64) ** 2
        else:  # cosine (Nichol & Dhariwal), betas capped at 0.999
            f = lambda t: np.cos((t / n + 0.008) / 1.008 * np.pi / 2) ** 2
            steps = np.arange(n, dtype=np.float64)
            betas = np.minimum(1 - f(steps + 1) / f(steps), 0.999)
        return np.cumprod(1.0 - betas)

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps - 1)

    def alpha_sigma(self, t):
        acp = jnp.interp(jnp.asarray(t, jnp.float32), jnp.arange(self.num_train_timesteps, dtype=jnp.float32),
                         jnp.asarray(self.alphas_cumprod, jnp.float32))
        return jnp.sqrt(acp), jnp.sqrt(1.0 - acp)

    def warp_timesteps(self, t):
        """The identity: the VP teacher's timesteps are used as drawn."""
        return t

    def sampling_timesteps(self, num_steps: int) -> np.ndarray:
        if not 1 <= num_steps <= self.num_train_timesteps:
            raise ValueError(f"num_steps must be in [1, {self.num_train_timesteps}], got {num_steps}")
        n = self.num_train_timesteps
        return (np.round(np.arange(n, 0, -n / num_steps)) - 1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow (Wan2.1): alpha = 1 - t/T, sigma = t/T; the model sees t = sigma * T."""

    num_train_timesteps: int = 1000
    shift: float = 3.0  # Wan2.1 uses 3.0 at 480p, 5.0 at 720p

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps)

    def alpha_sigma(self, t):
        s = jnp.asarray(t, jnp.float32) / self.num_train_timesteps
        return 1.0 - s, s

    def shift_sigma(self, s):
        """Wan's shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma) (NumPy or jax arrays)."""
        return self.shift * s / (1.0 + (self.shift - 1.0) * s)

    def warp_timesteps(self, t):
        """Timesteps t in [0, T] -> T * shift_sigma(t / T): where Wan's sampler (and FastVideo's DMD) put them."""
        n = self.num_train_timesteps
        return self.shift_sigma(t / n) * n

    def sampling_timesteps(self, num_steps: int) -> np.ndarray:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        sigmas = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float64)[:-1]
        return (self.shift_sigma(sigmas) * self.num_train_timesteps).astype(np.float32)


Schedule = VPSchedule | FlowSchedule


def make_schedule(kind: str, **kwargs) -> Schedule:
    if kind == "vp":
        return VPSchedule(**kwargs)
    if kind == "flow":
        return FlowSchedule(**kwargs)
    raise ValueError(f"Unknown schedule {kind!r}; choose 'vp' or 'flow'")
