#!/usr/bin/env python
"""Time the whole DOLLAR distillation step (generator + fake-score updates [+ LRM]) and report MFU per role.

    python benchmarks/distill_step.py --config=configs/wan21_distill.py:1.3b --config.distill.batch_size=1 \\
        --config.mesh.fsdp=1          # one GPU (attention "auto": cuDNN): 81 frames 480p, batch 1
    python benchmarks/distill_step.py --config=configs/wan21_distill.py:local --config.mesh.fsdp=1   # CPU smoke
    # a restart's compile: run twice with the same cache folder (first cold, then loaded from the cache)
    python benchmarks/distill_step.py --config=... --compilation_cache=/tmp/cc

Weights are random (drawn inside jit on the mesh: nothing passes through the host); the batch is random
latents/text of config.data.latent_shape/text_shape. Prints one JSON line: compile time (of which tracing and
lowering; and the compiled program's fusions and while loops, which set XLA's share), mean step time over
--iters steps after one warm-up, analytic TFLOPs per role, achieved TFLOP/s per device and MFU (per role and
total) against the device's bf16 peak (train/flops.py).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from dollar_jax.config import dit_config
from dollar_jax.train.dollar_step import step_flops
from dollar_jax.models.dit import WanDiT
from dollar_jax.data.pipeline import with_global_batch
from dollar_jax.parallel import axis_rules, make_mesh
from dollar_jax.train.planner import abstract_distill_step
from dollar_jax.train.flops import peak_flops, utilisation
from dollar_jax.train.state import init_state, split_model

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
_ITERS = flags.DEFINE_integer("iters", 5, "Timed steps after the warm-up step.")
_CACHE = flags.DEFINE_string("compilation_cache", "", "Persistent compilation cache folder (as config."
                             "compilation_cache): run twice to time a restart's compile (cold, then warm).")


def main(_):
    config = _CONFIG.value
    if _CACHE.value:
        from dollar_jax import compilation_cache

        compilation_cache.enable(_CACHE.value, "")
    dit = dit_config(config)
    latent_shape, text_shape = tuple(config.data.latent_shape), tuple(config.data.text_shape)
    mesh = make_mesh(dict(config.mesh))
    config = with_global_batch(config, "distill", dict(zip(mesh.axis_names, mesh.devices.shape)))  # -1: per shard
    with jax.set_mesh(mesh), axis_rules(list(config.sharding_rules) if config.sharding_rules else None):
        planned = abstract_distill_step(config, dit, mesh)  # the trainer's step, jitted as the trainer jits it
        step, sharding_of = planned.step, lambda tree: jax.tree.map(lambda a: a.sharding, tree)

        def random_dit(param_dtype):
            return split_model("m", WanDiT(dit.replace(param_dtype=param_dtype), rngs=nnx.Rngs(0)))[1]

        def init():
            params = {"student": random_dit(dit.param_dtype)}
            params["fake"] = step.fake_init(params["student"])
            if step.reward is not None:
                params["lrm"] = step.reward.make_params()
            return init_state(step.roles, params, 0)

        state = jax.jit(init, out_shardings=sharding_of(planned.state))()
        frozen = {"teacher": jax.jit(lambda: random_dit(config.distill.teacher_dtype),
                                     out_shardings=sharding_of(planned.frozen["teacher"]))(),
                  "null_text": jax.device_put(jnp.zeros(text_shape, jnp.float32), planned.frozen["null_text"].sharding)}
        keys = iter(jax.random.split(jax.random.key(1), len(planned.batch)))
        batch = {k: jax.device_put(jax.random.normal(next(keys), a.shape, a.dtype) if k in ("latents", "text")
                                   else jnp.zeros(a.shape, a.dtype), a.sharding)  # no labels: the LRM idles
                 for k, a in planned.batch.items()}
        n = int(config.distill.batch_size)
        t0 = time.perf_counter()
        lowered = planned.jitted.lower(state, frozen, batch)  # tracing (Python) and lowering to StableHLO
        lower_s = time.perf_counter() - t0
        compiled = lowered.compile()  # XLA: HLO passes and code generation
        compile_s = time.perf_counter() - t0
        program = compiled.as_text()  # what the compiler made of it: its size explains the compile time
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(_ITERS.value):
            state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - t0) / _ITERS.value
        flops = step_flops(config, dit, latent_shape, text_shape, step.reward)
    print(json.dumps({
        "device": jax.devices()[0].device_kind, "devices": mesh.devices.size, "mesh": dict(config.mesh),
        "model_layers": dit.num_layers, "width": dit.inner_dim, "latent_shape": latent_shape,
        "batch": n, "attention": dit.attention, "remat": dit.remat_policy, "compile_s": round(compile_s, 1),
        "trace_and_lower_s": round(lower_s, 1), "fusions": program.count(" fusion("),
        "while_loops": program.count(" while("),
        "step_s": round(seconds, 4), "tflops_per_step": {k: round(v / 1e12, 3) for k, v in flops.items()},
        **{k: round(v, 4) for k, v in utilisation(flops, 1, seconds, mesh.devices.size, peak_flops()).items()},
    }))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
