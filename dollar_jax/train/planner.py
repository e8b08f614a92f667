"""Plan a run before renting the slice: compile the whole distillation step abstractly for any model and mesh.

Nothing is allocated: parameters, optimiser states, the frozen teacher and the batch are ShapeDtypeStructs
with the shardings the trainer would give them, on as many virtual CPU devices as the mesh has. XLA's
compiled memory analysis then gives per-device argument, output and temporary bytes, and the analytic
count (train/flops.py) gives FLOPs per step and role. CPU and TPU/GPU compilers schedule differently, so
temporaries are an estimate (good to choose remat policy, mesh and batch), not a guarantee.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dollar_jax.config import dit_config, schedule_of
from dollar_jax.data.pipeline import batch_sharding, with_global_batch
from dollar_jax.parallel.mesh import make_mesh
from dollar_jax.parallel.rules import axis_rules
from dollar_jax.parallel.sharding import replicated, tree_shardings
from dollar_jax.train.flops import token_count
from dollar_jax.train.loop import jit_train_step
from dollar_jax.train.state import TrainState, init_state, state_shardings

# Kernels that only run on accelerators are planned with their interpreted twin: same blockwise memory.
PLANNING_KERNEL = {"splash": "splash_interpret", "cudnn": "splash_interpret", "auto": "splash_interpret"}


def _bytes(tree) -> int:
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


@dataclasses.dataclass
class AbstractStep:
    """The distillation step jitted as the trainer jits it, with its arguments as sharded ShapeDtypeStructs."""
    step: object  # jobs.distill.DistillStep
    jitted: Callable
    state: TrainState
    frozen: dict
    batch: dict


def _placed(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def abstract_distill_step(config, dit, mesh) -> AbstractStep:
    """Build config's distillation step for `dit` on `mesh` (call inside `jax.set_mesh(mesh)`); nothing allocated.

    distill.batch_size is resolved for `mesh` as the trainer resolves it (-1: batch_per_shard per batch shard).
    """
    from dollar_jax.train.dollar_step import build_step  # the trainer's own step, not a copy

    config = with_global_batch(config, "distill", dict(zip(mesh.axis_names, mesh.devices.shape)))
    if not config.data.latent_shape or not config.data.text_shape:
        raise ValueError("Planning needs config.data.latent_shape and config.data.text_shape")
    latent_shape, text_shape = tuple(config.data.latent_shape), tuple(config.data.text_shape)
    step = build_step(config, dit, schedule_of(config), config.diffusion.prediction_type, latent_shape, text_shape)
    abstract = jax.eval_shape(lambda p: init_state(step.roles, p, 0), step.abstract_params)
    batch_size = int(config.distill.batch_size)
    batch = {"latents": jax.ShapeDtypeStruct((batch_size, *latent_shape), jnp.float32),
             "text": jax.ShapeDtypeStruct((batch_size, *text_shape), jnp.float32)}
    if step.reward is not None:
        batch.update(step.reward.abstract_inputs())
    frozen = {"teacher": step.teacher_abstract, "null_text": jax.ShapeDtypeStruct(text_shape, jnp.float32)}
    shardings = state_shardings(step.roles, abstract, mesh)
    frozen_shardings = {"teacher": tree_shardings(mesh, step.teacher_abstract, step.teacher_role.axes),
                        "null_text": replicated(mesh)}
    batch_shardings = {k: batch_sharding(mesh, v.ndim) for k, v in batch.items()}
    return AbstractStep(step, jit_train_step(step.train_step, shardings, frozen_shardings, batch_shardings),
                        _placed(abstract, shardings), _placed(frozen, frozen_shardings), _placed(batch, batch_shardings))


def plan_distill_step(config, mesh_shape: dict) -> dict:
    """Compile config's distillation step on `mesh_shape` (needs that many devices) and measure it."""
    from dollar_jax.train.dollar_step import step_flops

    dit = dit_config(config)
    dit = dit.replace(attention=PLANNING_KERNEL.get(dit.attention, dit.attention))
    latent_shape, text_shape = tuple(config.data.latent_shape), tuple(config.data.text_shape)
    mesh = make_mesh(mesh_shape)
    config = with_global_batch(config, "distill", dict(zip(mesh.axis_names, mesh.devices.shape)))
    rules = list(config.sharding_rules) if config.sharding_rules else None
    with jax.set_mesh(mesh), axis_rules(rules):
        planned = abstract_distill_step(config, dit, mesh)
        memory = planned.jitted.lower(planned.state, planned.frozen, planned.batch).compile().memory_analysis()
        flops = step_flops(config, dit, latent_shape, text_shape, planned.step.reward)
    abstract, step, batch = planned.state, planned.step, int(config.distill.batch_size)
    devices = mesh.devices.size
    state_bytes = {role: _bytes(abstract.params[role]) for role in abstract.params}
    gib = 2.0 ** 30
    return {
        "devices": devices,
        "mesh": {k: v for k, v in zip(mesh.axis_names, mesh.devices.shape)},
        "batch": batch,
        "tokens_per_clip": token_count(dit, latent_shape),
        "parameters": {role: sum(math.prod(a.shape) for a in jax.tree.leaves(abstract.params[role]))
                       for role in abstract.params},
        "state_gib_total": (_bytes(abstract) + _bytes(step.teacher_abstract)) / gib,
        "params_gib": {role: b / gib for role, b in state_bytes.items()},
        "per_device_gib": {
            "arguments": memory.argument_size_in_bytes / gib,
            "outputs": memory.output_size_in_bytes / gib,
            "aliased": memory.alias_size_in_bytes / gib,
            "temporaries": memory.temp_size_in_bytes / gib,
            # Donated state is reused for the outputs, so the live peak is arguments + temporaries
            # + whatever outputs are not aliased to arguments.
            "peak": (memory.argument_size_in_bytes + memory.temp_size_in_bytes
                     + memory.output_size_in_bytes - memory.alias_size_in_bytes) / gib,
        },
        "tflops_per_step": {role: f / 1e12 for role, f in flops.items()},
        "tflops_per_device_step": sum(flops.values()) / devices / 1e12,
    }


def format_plan(plan: dict) -> str:
    mem = plan["per_device_gib"]
    mesh = ",".join(f"{k}={v}" for k, v in plan["mesh"].items() if v > 1) or "1 device"
    flops = ", ".join(f"{r} {v:.1f}" for r, v in plan["tflops_per_step"].items())
    return (f"mesh {mesh} ({plan['devices']} devices), global batch {plan['batch']}, "
            f"{plan['tokens_per_clip']} tokens/clip\n"
            f"  state (all roles + frozen teacher): {plan['state_gib_total']:.1f} GiB in total\n"
            f"  per device: arguments {mem['arguments']:.2f} GiB, temporaries {mem['temporaries']:.2f} GiB, "
            f"peak {mem['peak']:.2f} GiB\n"
            f"  TFLOPs per step: {flops} (per device {plan['tflops_per_device_step']:.1f})")
