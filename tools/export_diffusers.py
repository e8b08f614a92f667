#!/usr/bin/env python
"""Export a dollar-jax model folder (a distilled student, a trained or converted teacher) to diffusers.

    python tools/export_diffusers.py --model=/runs/dollar/student --dst=/export/wan-dollar-4step [--dtype=bfloat16]

Writes DST/transformer (WanTransformer3DModel: config.json + safetensors shards + index), DST/scheduler
(the scheduler that reproduces the folder's sampler) and DST/dollar_sampler.json (its exact grid); the
README's "Export to diffusers" section has the sampling recipe. Tensors are mapped by the converter's table
read backwards (dollar_jax/convert/wan.py). Nothing is written unless every tensor exports.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="dollar-jax model folder (config.json + params/)")
    parser.add_argument("--dst", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--dtype", default="keep", choices=("keep", "float32", "bfloat16"),
                        help="stored dtype of the exported tensors (keep: as stored in the model folder)")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard, e.g. 5GB, 200MB")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of an error")
    args = parser.parse_args(argv)

    from dollar_jax.cli_errors import run_reporting

    def run():
        from dollar_jax.convert.wan_export import export

        report = export(args.model, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                        overwrite=args.overwrite)
        if "warning" in report:
            print(f"warning: {report['warning']}", file=sys.stderr)
        print(json.dumps(report))

    return run_reporting(run, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
