#!/usr/bin/env python
"""Converter wall time and peak RSS on a synthetic Wan checkpoint of at least 1 GB.

    python benchmarks/converter_memory.py --workdir /tmp/convbench [--layers 12] [--dtype bfloat16]

Writes a diffusers-layout checkpoint with Wan2.1-1.3B widths (random bf16 values, 3 shards + index),
converts it in a fresh subprocess, and reports that subprocess's wall time and peak resident memory
against the checkpoint size. Target: peak RSS < 1.5x the checkpoint size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def write_source(folder: str, layers: int) -> int:
    from dollar_jax.checkpoint import abstract_dit
    from dollar_jax.convert import safetensors_io as st
    from dollar_jax.convert.wan import WAN_TABLE
    from dollar_jax.models import preset

    cfg = preset("wan2.1-1.3b", num_layers=layers)
    _, abstract, _ = abstract_dit(cfg)
    rng = np.random.default_rng(0)
    tensors = {}
    for row in WAN_TABLE:
        node = abstract
        for part in row.target.split("/"):
            node = node[part]
        shape = tuple(node.shape)
        for i in (range(layers) if row.per_layer else [None]):
            s = shape[1:] if i is not None else shape
            if row.transform.name == "linear":
                s = s[::-1]
            elif row.transform.name == "squeeze_leading":
                s = (1, *s)
            elif row.transform.name == "conv3d_to_patch":
                s = (s[1], cfg.in_channels, *cfg.patch_size)
            key = row.diffusers.format(i=i) if i is not None else row.diffusers
            tensors[key] = (rng.standard_normal(s, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    os.makedirs(folder, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for s in range(3):
        fname = f"diffusion_pytorch_model-{s + 1:05d}-of-00003.safetensors"
        part = {n: tensors[n] for n in names[s::3]}
        st.write_file(os.path.join(folder, fname), part)
        weight_map.update({n: fname for n in part})
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    config = {"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 12,
              "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
              "ffn_dim": 8960, "num_layers": layers, "cross_attn_norm": True, "eps": 1e-6, "rope_max_seq_len": 1024}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/dollar_convbench")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = p.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    src, dst = os.path.join(args.workdir, "src"), os.path.join(args.workdir, "dst")
    size = write_source(src, args.layers)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "..", "tools", "convert_weights.py"),
                    "--src", src, "--dst", dst, "--dtype", args.dtype], check=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"checkpoint_gb": size / 1e9, "dtype": args.dtype, "wall_s": round(wall, 1),
                      "peak_rss_gb": round(peak / 1e9, 3), "peak_over_size": round(peak / size, 3)}))
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
