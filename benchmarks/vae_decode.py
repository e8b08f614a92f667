#!/usr/bin/env python
"""Decode throughput (video frames/s) of the Flax Wan VAE and diffusers' torch AutoencoderKLWan.

    python benchmarks/vae_decode.py --frames 5 --height 480 --width 832
    python benchmarks/vae_decode.py --frames 81 --dtype bfloat16 --backends flax,torch   # on a GPU

Both models have Wan2.1's VAE dimensions (base_dim 96, z_dim 16, dim_mult 1,2,4,4) with random weights, and
decode the same random latents [batch, 1 + (frames - 1) / 4, height / 8, width / 8, 16]. JAX runs on its
default backend (GPU/TPU when present); torch runs on CUDA when available, else CPU. The Flax decode is one
jit (the first latent frame, then `--decode_chunk` latent frames per lax.scan step); its compile time is
reported apart. Torch decodes frame by frame through its feature cache (diffusers' own schedule). Reports the
mean wall time over --iters runs after one warm-up, and frames/s, as one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dollar_jax.models.wan_vae import WanVAE, WanVAEConfig


def bench_flax(args, latents: np.ndarray) -> dict:
    cfg = WanVAEConfig(dtype=args.dtype, param_dtype=args.dtype, decode_chunk=args.decode_chunk)
    # Random weights drawn inside jit, straight onto the device.
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0))))
    params = jax.jit(lambda: nnx.split(WanVAE(cfg, rngs=nnx.Rngs(0)))[1])()
    z = jnp.asarray(latents)
    decode = jax.jit(lambda p, z: nnx.merge(graphdef, p).decode(z))
    t0 = time.perf_counter()
    compiled = decode.lower(params, z).compile()
    compile_s = time.perf_counter() - t0
    compiled(params, z).block_until_ready()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        out = compiled(params, z).block_until_ready()
        times.append(time.perf_counter() - t0)
    return {"device": str(jax.devices()[0].device_kind), "compile_s": round(compile_s, 2),
            "output_shape": list(out.shape), **_rates(times, out.shape[0] * out.shape[1])}


def bench_torch(args, latents: np.ndarray) -> dict:
    import torch
    from diffusers import AutoencoderKLWan

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    vae = AutoencoderKLWan().to(device=device, dtype=dtype).eval()
    z = torch.from_numpy(latents).permute(0, 4, 1, 2, 3).to(device=device, dtype=dtype)

    def run():
        with torch.no_grad():
            out = vae.decode(z).sample
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    run()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"device": name, "output_shape": [out.shape[0], out.shape[2], out.shape[3], out.shape[4], out.shape[1]],
            **_rates(times, out.shape[0] * out.shape[2])}


def _rates(times: list[float], frames: int) -> dict:
    mean = sum(times) / len(times)
    return {"seconds": round(mean, 3), "frames_per_s": round(frames / mean, 3), "runs": len(times)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=5, help="video frames, 1 + 4k")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--decode_chunk", type=int, default=1, help="Flax: latent frames per scanned chunk")
    p.add_argument("--backends", default="flax,torch")
    p.add_argument("--iters", type=int, default=1)
    args = p.parse_args(argv)

    latent_shape = WanVAEConfig().latent_shape(args.frames, args.height, args.width)
    latents = np.random.default_rng(0).normal(size=(args.batch, *latent_shape)).astype(np.float32)
    report = {"benchmark": "vae_decode", "date": datetime.date.today().isoformat(), "host": platform.node(),
              "jax_backend": jax.default_backend(), "frames": args.frames, "height": args.height, "width": args.width,
              "batch": args.batch, "dtype": args.dtype, "latent_shape": [args.batch, *latent_shape]}
    for backend in args.backends.split(","):
        report[backend] = {"flax": bench_flax, "torch": bench_torch}[backend](args, latents)
    if "flax" in report and "torch" in report:
        report["flax_speedup"] = round(report["flax"]["frames_per_s"] / report["torch"]["frames_per_s"], 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
