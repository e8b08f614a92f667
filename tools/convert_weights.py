#!/usr/bin/env python
"""Convert a Wan2.1 transformer checkpoint (diffusers or original layout, safetensors) to a dollar-jax model.

    python tools/convert_weights.py --src /weights/Wan2.1-T2V-1.3B-Diffusers/transformer \
        --dst /ckpt/wan2.1-1.3b --dtype bfloat16

Load the result with `dollar_jax.checkpoint.load_dit(dst)`. Nothing is written if any key is missing,
unexpected or mis-shaped; the error lists them all.
"""

from __future__ import annotations

import argparse
import json
import sys

from dollar_jax.cli_errors import run_reporting
from dollar_jax.convert.wan import LAYOUTS, convert


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="folder with config.json and *.safetensors (+ index)")
    parser.add_argument("--dst", required=True, help="output model folder (must not exist unless --overwrite)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="stored dtype")
    parser.add_argument("--layout", default="auto", choices=LAYOUTS, help="source key layout")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of an error")
    args = parser.parse_args(argv)

    def run():
        report = convert(args.src, args.dst, dtype=args.dtype, layout=args.layout, overwrite=args.overwrite)
        report.pop("config")
        print(json.dumps(report))

    return run_reporting(run, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
