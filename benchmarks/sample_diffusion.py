#!/usr/bin/env python
"""The diffusion stage of `dollar_jax.sample` at a real model size, with random weights (no checkpoint needed):
the 4-step consistency student vs the 50-step CFG teacher, the same jitted sampler `dollar_jax.sample` runs.

    python benchmarks/sample_diffusion.py --preset wan2.1-1.3b --frames 21 --height 60 --width 104 \
        --text-len 512 --dtype bfloat16 --attention cudnn          # 81 frames at 480 x 832

Text encoding and VAE decoding are not included (benchmarks/sample_stages.py times all stages with real
folders). Reports compile and the median of --iters timed runs per sampler.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from dollar_jax.diffusion.schedules import FlowSchedule
from dollar_jax.eval.generate import make_generate, student_spec, teacher_spec
from dollar_jax.models import WanDiT, preset
from dollar_jax.models.layers import abstract


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=3, help="latent frames")
    p.add_argument("--height", type=int, default=8, help="latent height")
    p.add_argument("--width", type=int, default=8, help="latent width")
    p.add_argument("--text-len", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--attention", default="xla")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()

    cfg = preset(args.preset, dtype=args.dtype, param_dtype=args.dtype, attention=args.attention)
    graphdef, _ = nnx.split(abstract(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.split(WanDiT(cfg, rngs=nnx.Rngs(0)))[1]))()
    key = jax.random.key(0)
    noise = jax.random.normal(key, (args.batch, args.frames, args.height, args.width, cfg.in_channels))
    text = jax.random.normal(key, (args.batch, args.text_len, cfg.text_dim))
    schedule = FlowSchedule(shift=3.0)
    samplers = {"student_4": student_spec([999.0, 749.0, 499.0, 249.0], 0.5, 10.0),
                f"teacher_{args.teacher_steps}_cfg": teacher_spec(schedule, args.teacher_steps, 5.0, "uncond_anchor")}
    result = {"preset": args.preset, "device": jax.devices()[0].device_kind, "batch": args.batch,
              "latent": [args.frames, args.height, args.width], "text_len": args.text_len, "dtype": args.dtype,
              "attention": args.attention}
    for name, spec in samplers.items():
        generate = make_generate(lambda q: nnx.merge(graphdef, q), schedule, "flow", spec)
        inputs = (params, noise, text, jnp.zeros_like(text), jax.random.key(1))
        t0 = time.perf_counter()
        jax.block_until_ready(generate(*inputs))
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            jax.block_until_ready(generate(*inputs))
            times.append(time.perf_counter() - t0)
        result[name] = {"network_evaluations": spec.network_evaluations, "first_call_s": round(compile_s, 2),
                        "seconds": round(statistics.median(times), 4)}
        print(json.dumps({name: result[name]}), flush=True)
    names = list(samplers)
    result["diffusion_speedup"] = round(result[names[1]]["seconds"] / result[names[0]]["seconds"], 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
