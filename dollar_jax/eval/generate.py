"""Jitted generation from any DiT parameters: the teacher's guided multi-step sampler and the student's
few-step consistency sampler are the same function with different grids, guidance and re-noising."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dollar_jax.diffusion.consistency import consistency_denoiser
from dollar_jax.diffusion.samplers import make_denoiser, sample


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    timesteps: tuple[float, ...]  # descending grid
    guidance_scale: float | None = None  # None: unguided (one forward per step)
    convention: str = "uncond_anchor"
    renoise: str = "ddim"  # "ddim" (teacher) | "fresh" (consistency multistep, the student)
    consistency: bool = False  # wrap with the LCM boundary scalings (students)

    @property
    def network_evaluations(self) -> int:
        guided = self.guidance_scale is not None and not (
            (self.convention == "uncond_anchor" and self.guidance_scale == 1.0)
            or (self.convention == "cond_anchor" and self.guidance_scale == 0.0))
        return len(self.timesteps) * (2 if guided else 1)


def teacher_spec(schedule, steps: int, guidance_scale: float, convention: str) -> SamplerSpec:
    return SamplerSpec(tuple(float(t) for t in schedule.sampling_timesteps(steps)), guidance_scale, convention)


def student_spec(timesteps) -> SamplerSpec:
    return SamplerSpec(tuple(float(t) for t in timesteps), None, renoise="fresh", consistency=True)


def make_generate(module_fn: Callable, schedule, prediction_type: str, spec: SamplerSpec):
    """jit(params, noise, text, null_text, rng) -> clean latents (float32). `module_fn(params)` gives the DiT."""

    def generate(params, noise, text, null_text, rng):
        model = module_fn(params)
        denoise = make_denoiser(model, schedule, prediction_type, text, null_text, spec.guidance_scale,
                                spec.convention)
        if spec.consistency:
            denoise = consistency_denoiser(denoise, schedule)
        return sample(denoise, noise, jnp.asarray(spec.timesteps), schedule, renoise=spec.renoise, rng=rng)

    return jax.jit(generate)
