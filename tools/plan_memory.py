"""Per-device memory and FLOPs of the distillation step for any model size and mesh, on virtual CPU devices.

    python tools/plan_memory.py --config=configs/wan21_distill.py:1.3b --mesh=fsdp=8
    python tools/plan_memory.py --config=configs/wan21_distill.py:14b --mesh=fsdp=64,context=4 \\
        --config.distill.batch_size=64 --config.model.remat_policy=full [--json out.json]

The mesh's product is the number of virtual devices (set before JAX starts); config overrides work as in
dollar_jax.main. Accelerator-only attention kernels are planned with their interpreted blockwise twin.
"""

from __future__ import annotations

import json
import math
import os
import sys


def _mesh_arg(argv) -> dict:
    values = [a.split("=", 1)[1] for a in argv if a.startswith("--mesh=")]
    if not values:
        raise SystemExit("--mesh=axis=size[,axis=size...] is required, e.g. --mesh=fsdp=8,context=2")
    shape = {}
    for part in values[-1].split(","):
        axis, _, size = part.partition("=")
        if not size.isdigit() or int(size) < 1:
            raise SystemExit(f"--mesh: {part!r} is not axis=positive_size")
        shape[axis.strip()] = int(size)
    return shape


def main(argv) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py[:arg]).",
                                                  lock_config=True)
    flags.DEFINE_string("mesh", None, "Mesh, e.g. fsdp=8,context=2 (sizes multiply to the device count).")
    json_flag = flags.DEFINE_string("json", None, "Also write the plan as JSON to this file.")
    flags.mark_flags_as_required(["config", "mesh"])

    def run(_):
        from dollar_jax.train.planner import format_plan, plan_distill_step

        config = config_flag.value
        shape = _mesh_arg(sys.argv)
        result = plan_distill_step(config, shape)
        print(format_plan(result))
        if json_flag.value:
            with open(json_flag.value, "w") as f:
                json.dump(result, f, indent=2)

    app.run(run, argv)


if __name__ == "__main__":
    devices = math.prod(_mesh_arg(sys.argv).values())
    # Virtual devices must be requested before JAX initialises its backend.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={devices}").strip()
    main(sys.argv)
