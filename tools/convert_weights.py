#!/usr/bin/env python
"""Convert a Wan2.1 checkpoint (safetensors) to a dollar-jax model folder: the transformer (diffusers or
original layout, --kind=dit, the default) or the VAE (diffusers AutoencoderKLWan folder, --kind=vae).

    python tools/convert_weights.py --src /weights/Wan2.1-T2V-1.3B-Diffusers/transformer \
        --dst /ckpt/wan2.1-1.3b --dtype bfloat16
    python tools/convert_weights.py --kind=vae --src /weights/Wan2.1-T2V-1.3B-Diffusers/vae \
        --dst /ckpt/wan2.1-vae

Load the results with `dollar_jax.checkpoint.load_dit(dst)` / `load_wan_vae(dst)`. Nothing is written if any
key is missing, unexpected or mis-shaped; the error lists them all.
"""

from __future__ import annotations

import os

# Conversion is host work. On a TPU VM worker, JAX would otherwise take the TPU (and fail if training holds
# it): use the CPU unless the user chose a platform. Must run before anything imports JAX.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

from dollar_jax.cli_errors import run_reporting  # noqa: E402
from dollar_jax.convert import wan_vae  # noqa: E402
from dollar_jax.convert.wan import LAYOUTS, ConversionError, convert  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="dit", choices=("dit", "vae"), help="transformer or VAE")
    parser.add_argument("--src", required=True, help="folder with config.json and *.safetensors (+ index)")
    parser.add_argument("--dst", required=True, help="output model folder (must not exist unless --overwrite)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="stored dtype")
    parser.add_argument("--layout", default="auto", choices=LAYOUTS, help="source key layout (--kind=dit)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of an error")
    args = parser.parse_args(argv)

    def run():
        if args.kind == "vae":
            if args.layout not in ("auto", "diffusers"):
                raise ConversionError("--kind=vae reads diffusers' AutoencoderKLWan layout only")
            report = wan_vae.convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
        else:
            report = convert(args.src, args.dst, dtype=args.dtype, layout=args.layout, overwrite=args.overwrite)
            report.pop("config")
        print(json.dumps(report))

    return run_reporting(run, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
