"""Diffusion maths: schedules, prediction types, guidance, samplers, the consistency parameterisation."""

from dollar_jax.diffusion.consistency import boundary_scalings, consistency_denoiser
from dollar_jax.diffusion.guidance import CFG_CONVENTIONS, guide
from dollar_jax.diffusion.predictions import PREDICTION_TYPES, from_x0_eps, to_x0_eps
from dollar_jax.diffusion.samplers import ddim_step, guided_output, make_denoiser, sample
from dollar_jax.diffusion.schedules import FlowSchedule, VPSchedule, make_schedule

__all__ = [
    "CFG_CONVENTIONS",
    "PREDICTION_TYPES",
    "FlowSchedule",
    "VPSchedule",
    "boundary_scalings",
    "consistency_denoiser",
    "ddim_step",
    "from_x0_eps",
    "guide",
    "guided_output",
    "make_denoiser",
    "make_schedule",
    "sample",
    "to_x0_eps",
]
