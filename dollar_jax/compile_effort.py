"""How hard XLA:CPU's compiler works on a program: full effort for train steps, light for everything else.

On CPU, LLVM's level 2 pays for itself only in programs that run thousands of times. Samplers, evaluators,
encoders, parameter initialisers and noise draws run a handful of times per stage, and level 2 compiles some of
them pathologically slowly: one `jax.random.normal` of the world's 128 evaluation latents takes 5-8 s at level 2
and 0.3-0.45 s at level 1 (same bits; measured 2026-11-24, BENCHMARKS.md "Compile effort"). `light_jit` compiles
at level 1 on CPU; train steps keep the default (the teacher's step runs about 5% slower at level 1).

Other backends are untouched, and so is a level the user chose in XLA_FLAGS (the test suite sets 1 for all),
with one exception: config.step_compile = "light" compiles the train step at level 0 (`step_options`).
"""

from __future__ import annotations

import functools
import os

import jax

from dollar_jax.config import check_step_compile

LEVEL_FLAG = "xla_backend_optimization_level"


def light_options() -> dict | None:
    """Compiler options for a program that runs a few times; None (the defaults) off CPU or if XLA_FLAGS sets
    the level. Asks for the backend: call it when compiling, not at import time."""
    if LEVEL_FLAG in os.environ.get("XLA_FLAGS", "") or jax.default_backend() != "cpu":
        return None
    return {LEVEL_FLAG: 1}


def step_options(setting: str, platform: str | None = None) -> dict | None:
    """Compiler options for a train step, from config.step_compile: "full" (None: XLA's defaults, or the level
    XLA_FLAGS sets) or "light", LLVM level 0 on CPU for runs of a few steps (smoke runs, tests), even where
    XLA_FLAGS sets a level (which still governs every other program); other backends are untouched. `platform`:
    the devices the program is compiled for (a TPU plan compiled on a CPU host), by default the default backend's.

    Level 0 pays only for a short run of small steps (BENCHMARKS.md, "config.step_compile"): the tests' tiny
    DOLLAR steps compile 18-33% faster than at level 1 and run about 3x slower (milliseconds), but the default
    demo's step, 15% faster to compile than at level 2, runs 4.1 against 1.35 s a step: it loses from its
    second step on."""
    check_step_compile(setting)
    if setting == "full" or (platform or jax.default_backend()) != "cpu":
        return None
    return {LEVEL_FLAG: 0}


def light_jit(fun, **jit_kwargs):
    """`jax.jit(fun, **jit_kwargs)` compiled with `light_options()`, decided at the first call (so that a module
    can define one at import time, before the backend or jax.distributed starts). Supports calls only."""

    @functools.cache
    def jitted():
        return jax.jit(fun, compiler_options=light_options(), **jit_kwargs)

    @functools.wraps(fun)
    def call(*args, **kwargs):
        return jitted()(*args, **kwargs)

    return call


def normal(key, shape, dtype=jax.numpy.float32):
    """`jax.random.normal(key, shape, dtype)` (the same values) through a lightly compiled program."""
    return _normal_program(tuple(shape), jax.numpy.dtype(dtype))(key)


@functools.cache
def _normal_program(shape, dtype):
    return light_jit(lambda key: jax.random.normal(key, shape, dtype))
