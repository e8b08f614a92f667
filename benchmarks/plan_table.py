#!/usr/bin/env python
"""The planner's table for Wan2.1-1.3B and 14B at 81 frames 480p on TPU slices, from XLA:TPU (BENCHMARKS.md).

    pip install -e '.[tpu-plan]'
    python benchmarks/plan_table.py [--rows 1.3b-v5p-1,14b-v5p-8-lean] [--out /tmp/plans] [--no_time]
    python benchmarks/plan_table.py --list

Runs tools/plan_memory.py once per row (a process each: a 1.3B step compile takes minutes of CPU and GiBs of
host memory) and prints a Markdown table: per-device arguments, temporaries and peak against the chip's HBM,
model TFLOPs per device-step, and XLA:TPU's cost-model step time with the MFU it implies (an estimate).
A row that fails to compile is printed as such, with the first line of its error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# The smallest topology with at least n chips; a mesh smaller than the topology plans its first devices.
TOPOLOGY = {
    "v5p": {1: "v5p:2x2x1", 8: "v5p:2x2x2", 16: "v5p:2x2x4", 32: "v5p:2x4x4", 64: "v5p:4x4x4",
            128: "v5p:4x4x8", 256: "v5p:4x8x8"},
    "v6e": {1: "v6e:2x2", 8: "v6e:2x4", 16: "v6e:4x4", 32: "v6e:4x8", 64: "v6e:8x8", 128: "v6e:8x16",
            256: "v6e:16x16"},
}
# Every lean switch (config.distill / config.*.optim; BENCHMARKS.md says what each saves).
LEAN = ("--config.distill.nan_guard=update", "--config.distill.fake_dtype=bfloat16",
        "--config.distill.ema_dtype=bfloat16", "--config.distill.optim.moment_dtype=bfloat16",
        "--config.distill.fake_optim.moment_dtype=bfloat16")


def _rows():
    """name -> (variant, chip, chips, mesh, global batch, lean). One 81-frame clip per data-parallel shard, and
    context parallelism (4-way) from 32 chips on, so that the global batch stays a few dozen clips."""
    rows = {}
    for chip in ("v5p", "v6e"):
        for chips in (1, 8, 16, 32, 64, 128, 256):
            for variant in ("1.3b", "14b"):
                context = 4 if chips >= 32 else 1
                mesh = f"fsdp={chips // context}" + (f",context={context}" if context > 1 else "")
                batch = max(1, chips // context)
                for lean in (False, True):
                    name = f"{variant}-{chip}-{chips}" + ("-lean" if lean else "")
                    rows[name] = (variant, chip, chips, mesh, batch, lean)
    return rows


DEFAULT_ROWS = ("1.3b-v5p-1", "1.3b-v5p-1-lean", "14b-v5p-8", "14b-v5p-8-lean")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/dollar_plans")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated row names (--list)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--no_time", action="store_true", help="skip the cost-model step-time estimate")
    args = parser.parse_args()
    rows = _rows()
    if args.list:
        print("\n".join(rows))
        return
    unknown = [r for r in args.rows.split(",") if r not in rows]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; see --list")
    os.makedirs(args.out, exist_ok=True)
    lines = ["| model | chips | topology | mesh | global batch | switches | per device: arguments | temporaries | "
             "peak (GiB) | HBM (GiB) | fits | model TFLOPs / device / step | est. step (s) | est. MFU | "
             "compile (s) |", "|" + "---|" * 15]
    for name in args.rows.split(","):
        variant, chip, chips, mesh, batch, lean = rows[name]
        topology = TOPOLOGY[chip][chips]
        out = os.path.join(args.out, f"{name}.json")
        cmd = [sys.executable, os.path.join(ROOT, "tools", "plan_memory.py"),
               f"--config={os.path.join(ROOT, 'configs', 'wan21_distill.py')}:{variant}", f"--topology={topology}",
               f"--mesh={mesh}", f"--config.distill.batch_size={batch}", f"--json={out}",
               *(LEAN if lean else ()), *(["--no_time"] if args.no_time else [])]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        head = f"| Wan2.1-{variant.upper()} | {chips} | {topology} | {mesh} | {batch} | {'lean' if lean else 'default'} |"
        if done.returncode:
            error = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["?"]
            lines.append(head + f" did not compile: {error[0][:120]} |" + " |" * 8 + f" {seconds:.0f} |")
        else:
            p = json.load(open(out))
            m = p["per_device_gib"]
            if "step_estimate_rejected" in p:
                estimate = "rejected: below the FLOP floor | n/a"  # the JSON says why
            elif "estimated_mfu" in p:
                estimate = f"{p['estimated_step_seconds']:.0f} | {p['estimated_mfu']:.0%}"
            else:
                estimate = "n/a | n/a"
            lines.append(head + f" {m['arguments']:.1f} | {m['temporaries']:.1f} | {m['peak']:.1f} | "
                         f"{p['hbm_gib_per_device']:.0f} | {'yes' if p['fits'] else 'NO'} | "
                         f"{p['model_tflops_per_device_step']:.0f} | {estimate} | {seconds:.0f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
