"""Checks of the shipped Wan2.1 configs on a given number of (virtual) devices.

Imported by tests/test_any_slice.py on the 8 devices conftest gives, and run as a script for device counts
conftest cannot give (JAX fixes the count at start-up):

    XLA_FLAGS=--xla_force_host_platform_device_count=16 JAX_PLATFORMS=cpu python tests/slice_checks.py CHECK...

prints one JSON object per check.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dollar_jax.compile_effort import step_options  # noqa: E402
from dollar_jax.config import config_from_file, dit_config  # noqa: E402
from dollar_jax.models import WanDiT, preset  # noqa: E402
from dollar_jax.models.layers import logical_axes  # noqa: E402
from dollar_jax.parallel import axis_rules, make_mesh, tree_shardings  # noqa: E402
from dollar_jax.train.planner import CPU_PLANNING_KERNEL, abstract_distill_step  # noqa: E402
from dollar_jax.train.state import init_state  # noqa: E402


def wan_config(variant: str):
    return config_from_file(f"configs/wan21_distill.py:{variant}")


class Replications(logging.Handler):
    """Collects the 'replicated Nx' warnings of dollar_jax.parallel.sharding."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        if "replicated" in record.getMessage():
            self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("dollar_jax.parallel.sharding").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("dollar_jax.parallel.sharding").removeHandler(self)


def _random_like(tree, key, scale=0.02):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([(scale * jax.random.normal(k, a.shape)).astype(a.dtype) for k, a in zip(keys, leaves)])


def distill_step(variant: str, mesh_shape: dict | None = None, run: bool = True, devices=None,
                 compile: bool = True, **distill_overrides) -> dict:
    """The shipped `wan21_distill.py:<variant>` step on its own mesh (or `mesh_shape`): one real step on
    random weights and data (`run`), else compiled abstractly (nothing allocated); with `compile=False` only
    lowered (traced, with every input's sharding fixed: the per-device argument bytes then come from those
    shardings, not from XLA's memory analysis, and XLA's partitioner is not run)."""
    config = wan_config(variant)
    config.distill.update(distill_overrides)
    config.step_compile = "light"  # one step: compiling dominates
    if mesh_shape is not None:
        config.mesh.update(mesh_shape)
    dit = dit_config(config)
    dit = dit.replace(attention=CPU_PLANNING_KERNEL.get(dit.attention, dit.attention)) if not run else dit
    mesh = make_mesh(dict(config.mesh), devices=devices)
    out = {"mesh": {k: int(v) for k, v in zip(mesh.axis_names, mesh.devices.shape)}}
    with Replications() as warned, jax.set_mesh(mesh), axis_rules(None):
        planned = abstract_distill_step(config, dit, mesh)
        out["batch"] = int(planned.batch["latents"].shape[0])
        if run:
            shard = lambda t: jax.tree.map(lambda a: a.sharding, t)
            params = _random_like(planned.step.abstract_params, jax.random.key(0))
            state = jax.jit(lambda p: init_state(planned.step.roles, p, 0), out_shardings=shard(planned.state))(params)
            frozen = jax.device_put(_random_like(planned.frozen, jax.random.key(1), 1.0), shard(planned.frozen))
            batch = jax.device_put(_random_like(planned.batch, jax.random.key(2), 1.0), shard(planned.batch))
            state, metrics = planned.jitted(state, frozen, batch)
            out["metrics"] = {k: float(v) for k, v in metrics.items() if jnp.ndim(v) == 0}
            out["step"] = int(state.step)
        else:
            lowered = planned.jitted.lower(planned.state, planned.frozen, planned.batch)
            if compile:
                out["argument_bytes"] = int(lowered.compile().memory_analysis().argument_size_in_bytes)
            else:  # the abstract inputs carry the shardings the step is lowered with
                out["argument_bytes"] = int(sum(np.prod(a.sharding.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
                                                for a in jax.tree.leaves((planned.state, planned.frozen,
                                                                          planned.batch))))
            out["state_bytes"] = int(sum(np.prod(a.shape) * jnp.dtype(a.dtype).itemsize
                                         for a in jax.tree.leaves((planned.state, planned.frozen))))
    out["replicated"] = warned.messages
    return out


def padded_context_loss(context: int, grid=(3, 4, 6)) -> dict:
    """Loss and gradients of a tiny DiT whose token count (3*2*3 = 18) the context axis does not divide:
    unsharded vs. tokens padded and split over `context` devices."""
    cfg = preset("tiny", attention_head_dim=16)  # width 32: parameters split over (fsdp, context)
    graphdef, state = nnx.split(WanDiT(cfg, rngs=nnx.Rngs(0)))
    params = _random_like(nnx.to_pure_dict(state), jax.random.key(1), 0.05)
    params = jax.tree.map(lambda p, q: p + q, nnx.to_pure_dict(state), params)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *grid, cfg.in_channels)).astype(np.float32)
    t = np.asarray([100.0, 700.0], np.float32)
    text = rng.standard_normal((2, 5, cfg.text_dim)).astype(np.float32)

    def loss(p, x, t, text):
        return jnp.mean(nnx.merge(graphdef, p)(x, t, text) ** 2)

    fn = jax.jit(jax.value_and_grad(loss), compiler_options=step_options("light"))  # run twice: compiling dominates
    ref_loss, ref_grads = fn(params, x, t, text)
    mesh = make_mesh({"context": context})
    with Replications() as warned, jax.set_mesh(mesh):
        placed = jax.device_put(params, tree_shardings(mesh, params, logical_axes(state)))
        hlo = fn.lower(placed, x, t, text).as_text()
        got_loss, grads = fn(placed, x, t, text)
    grad_err = max(float(jnp.max(jnp.abs(g - r) / (jnp.abs(r) + 1e-3)))
                   for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    tokens = int(np.prod(grid)) // 4
    return {"tokens": tokens, "padded_tokens": -(-tokens // context) * context, "loss": float(got_loss),
            "ref_loss": float(ref_loss), "grad_rel_err": grad_err, "replicated": warned.messages,
            "gathers": hlo.count("all_gather") + hlo.count("all-gather")}


# The distillation-step checks lower the step (shardings fixed) without compiling it: XLA:CPU compiles of the
# step on 16 virtual devices took most of 4 minutes on 2 cores; test_any_slice compiles and runs the local step on 8.
CHECKS = {
    "padded_context_16": lambda: padded_context_loss(16),
    "local_sharding": lambda: distill_step("local", run=False, compile=False),
    "local_fewer_clips": lambda: distill_step("local", {"data": 1, "fsdp": 2, "context": 8}, run=False,
                                              compile=False, batch_size=2),
    "1.3b_sharding": lambda: distill_step("1.3b", run=False, compile=False),
}

if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(json.dumps({"check": name, "devices": jax.device_count(), **CHECKS[name]()}), flush=True)
