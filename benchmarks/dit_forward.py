#!/usr/bin/env python
"""Forward throughput of the video DiT (tokens/s) for a preset and a latent shape.

    python benchmarks/dit_forward.py --preset tiny --frames 4 --height 16 --width 16 --batch 8
    python benchmarks/dit_forward.py --preset wan2.1-1.3b --frames 1 --height 60 --width 104 --batch 1

Weights are random (drawn inside jit, so the host never holds a second copy). Reports the compile time,
the mean wall time of a jitted forward over --iters runs after one warm-up, tokens/s, and achieved TFLOP/s
from the analytic FLOP count (matmuls + attention).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
from flax import nnx

from dollar_jax.models import WanDiT, preset
from dollar_jax.models.layers import abstract
from dollar_jax.train.flops import dit_forward_flops


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=4, help="latent frames")
    p.add_argument("--height", type=int, default=16, help="latent height")
    p.add_argument("--width", type=int, default=16, help="latent width")
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--param-dtype", default=None, choices=("float32", "bfloat16"))
    p.add_argument("--attention", default="xla")
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()

    cfg = preset(args.preset, dtype=args.dtype, param_dtype=args.param_dtype or args.dtype, attention=args.attention)
    graphdef, _ = nnx.split(abstract(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.split(WanDiT(cfg, rngs=nnx.Rngs(0)))[1]))()
    key = jax.random.key(0)
    x = jax.random.normal(key, (args.batch, args.frames, args.height, args.width, cfg.in_channels), jnp.dtype(args.dtype))
    t = jnp.full((args.batch,), 500.0)
    text = jax.random.normal(key, (args.batch, args.text_len, cfg.text_dim), jnp.dtype(args.dtype))
    fwd = jax.jit(lambda params, x, t, text: nnx.merge(graphdef, params)(x, t, text))

    t0 = time.perf_counter()
    compiled = fwd.lower(params, x, t, text).compile()
    compile_s = time.perf_counter() - t0
    compiled(params, x, t, text).block_until_ready()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        compiled(params, x, t, text).block_until_ready()
        times.append(time.perf_counter() - t0)
    step = sum(times) / len(times)
    pt, ph, pw = cfg.patch_size
    tokens = (args.frames // pt) * (args.height // ph) * (args.width // pw)
    flops = dit_forward_flops(cfg, (args.frames, args.height, args.width), args.text_len, args.batch)
    print(json.dumps({
        "preset": args.preset, "device": jax.devices()[0].device_kind, "host": platform.processor() or platform.machine(),
        "batch": args.batch, "latent": [args.frames, args.height, args.width], "tokens_per_sample": tokens,
        "dtype": args.dtype, "compile_s": round(compile_s, 2), "forward_s": round(step, 4),
        "tokens_per_s": round(args.batch * tokens / step, 1), "tflops_per_s": round(flops / step / 1e12, 3),
    }))


if __name__ == "__main__":
    main()
