#!/usr/bin/env python
"""Memory of one reward fine-tuning generator step: through the latent reward model vs through pixels.

    python benchmarks/reward_memory.py                          # XLA:CPU, 8..128 frames at 480x832
    python benchmarks/reward_memory.py --topology v5p:2x2x1     # XLA:TPU, compile only (needs libtpu)
    python benchmarks/reward_memory.py --frames 8 --height 32 --width 32 --tiny --run_max_gib 4

The measurement (the networks, the two generator steps, the table and the plot) is
dollar_jax/eval/reward_memory.py, which `configs/demo.py:paper` also runs for its REPORT.md; this script writes
its rows to benchmarks/results/reward_memory.{json,md,png} unless --out says otherwise. --help lists the options.
"""

import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from dollar_jax.eval.reward_memory import main  # noqa: E402

if __name__ == "__main__":
    main(default_out=os.path.join(ROOT, "benchmarks", "results", "reward_memory"))
