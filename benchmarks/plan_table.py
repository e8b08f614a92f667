#!/usr/bin/env python
"""The memory planner's table for Wan2.1-1.3B and 14B over meshes of 8 to 256 devices (BENCHMARKS.md).

    python benchmarks/plan_table.py [--out /tmp/plans]

Runs tools/plan_memory.py once per row (each needs its own number of virtual devices, hence a process
each) and prints a Markdown table: per-device arguments, temporaries and peak, and TFLOPs per device-step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# (variant, mesh, global batch): one 81-frame 480p clip per data-parallel shard, as in the paper.
ROWS = (
    ("1.3b", "fsdp=8", 8),
    ("1.3b", "fsdp=8,context=4", 8),
    ("1.3b", "fsdp=64", 64),
    ("14b", "fsdp=8", 8),
    ("14b", "fsdp=32,context=4", 32),
    ("14b", "fsdp=64,context=4", 64),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/dollar_plans")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    lines = ["| model | mesh | devices | global batch | state, all roles (GiB) | per device: arguments | "
             "temporaries | peak (GiB) | TFLOPs / device / step | compile (s) |", "|" + "---|" * 10]
    for variant, mesh, batch in ROWS:
        out = os.path.join(args.out, f"{variant}_{mesh.replace(',', '_').replace('=', '')}.json")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plan_memory.py"),
                        f"--config={os.path.join(ROOT, 'configs', 'wan21_distill.py')}:{variant}", f"--mesh={mesh}",
                        f"--config.distill.batch_size={batch}", f"--json={out}"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        p = json.load(open(out))
        m = p["per_device_gib"]
        lines.append(f"| Wan2.1-{variant.upper()} | {mesh} | {p['devices']} | {batch} | {p['state_gib_total']:.0f} | "
                     f"{m['arguments']:.1f} | {m['temporaries']:.1f} | {m['peak']:.1f} | "
                     f"{p['tflops_per_device_step']:.0f} | {seconds:.0f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
