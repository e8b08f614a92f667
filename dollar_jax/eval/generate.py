"""Jitted generation from any DiT parameters: the teacher's guided multi-step sampler and the student's
few-step consistency sampler are the same function with different grids, guidance and re-noising.

A student samples with the consistency scalings (sigma_data, timestep_scale) it was trained with: the
distillation job writes them to the student folder's config.json ("student" section) and every sampler
builds its spec from that section (`student_sampler`), never from defaults."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp

from dollar_jax.compile_effort import light_jit
from dollar_jax.diffusion.consistency import consistency_denoiser
from dollar_jax.diffusion.samplers import make_denoiser, sample


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    timesteps: tuple[float, ...]  # descending grid
    guidance_scale: float | None = None  # None: unguided (one forward per step)
    convention: str = "uncond_anchor"
    renoise: str = "ddim"  # "ddim" (teacher) | "fresh" (consistency multistep, the student)
    consistency: bool = False  # wrap with the LCM boundary scalings (students)
    sigma_data: float = 0.5  # ... and their constants (only read when consistency is True)
    timestep_scale: float = 10.0

    @property
    def network_evaluations(self) -> int:
        guided = self.guidance_scale is not None and not (
            (self.convention == "uncond_anchor" and self.guidance_scale == 1.0)
            or (self.convention == "cond_anchor" and self.guidance_scale == 0.0))
        return len(self.timesteps) * (2 if guided else 1)


def teacher_spec(schedule, steps: int, guidance_scale: float, convention: str) -> SamplerSpec:
    return SamplerSpec(tuple(float(t) for t in schedule.sampling_timesteps(steps)), guidance_scale, convention)


def student_spec(timesteps, sigma_data: float, timestep_scale: float) -> SamplerSpec:
    """The consistency multistep sampler on `timesteps`, with the boundary scalings the student trained with."""
    return SamplerSpec(tuple(float(t) for t in timesteps), None, renoise="fresh", consistency=True,
                       sigma_data=float(sigma_data), timestep_scale=float(timestep_scale))


STUDENT_KEYS = ("timesteps", "sigma_data", "timestep_scale")


def thin_grid(trained, steps: int) -> tuple[float, ...]:
    """`steps` timesteps evenly thinned from the trained grid ({999, 749, 499, 249} -> {999, 499} -> {999})."""
    trained = tuple(float(t) for t in trained)
    if steps < 1 or steps > len(trained) or len(trained) % steps:
        raise ValueError(f"This student was trained on {list(trained)}; it samples in a divisor of "
                         f"{len(trained)} steps, not {steps}")
    return trained[:: len(trained) // steps]


def student_grid(grids, steps: int | None = None) -> tuple[float, ...]:
    """The grid to sample a student in `steps` steps (default: its longest). `grids`: the grids it trained on,
    longest first. Trained on one grid: thinned from it; on several at once: exactly one of them."""
    grids = [tuple(float(t) for t in g) for g in grids]
    n = steps or len(grids[0])
    if len(grids) > 1:
        by_length = {len(g): g for g in grids}
        if n not in by_length:
            raise ValueError(f"This student was trained on the grids {[list(g) for g in grids]}; it samples in "
                             f"{sorted(by_length)} steps, not {n}")
        return by_length[n]
    return thin_grid(grids[0], n)


def student_sampler(section: dict, steps: int | None = None) -> SamplerSpec:
    """The spec for a student from its model folder's "student" section (or the same dict built from the
    distillation config), at `steps` steps (default: the trained grid)."""
    missing = [k for k in STUDENT_KEYS if k not in section]
    if missing:
        raise ValueError(f"The student section {sorted(section)} lacks {missing}: cannot sample it as trained")
    grids = section.get("grids") or [section["timesteps"]]
    return student_spec(student_grid(grids, steps), section["sigma_data"], section["timestep_scale"])


def make_generate(module_fn: Callable, schedule, prediction_type: str, spec: SamplerSpec):
    """jit(params, noise, text, null_text, rng) -> clean latents (float32). `module_fn(params)` gives the DiT."""

    def generate(params, noise, text, null_text, rng):
        model = module_fn(params)
        denoise = make_denoiser(model, schedule, prediction_type, text, null_text, spec.guidance_scale,
                                spec.convention)
        if spec.consistency:
            denoise = consistency_denoiser(denoise, schedule, spec.sigma_data, spec.timestep_scale)
        return sample(denoise, noise, jnp.asarray(spec.timesteps), schedule, renoise=spec.renoise, rng=rng)

    return light_jit(generate)
