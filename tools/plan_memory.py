"""Per-device memory, FLOPs and (on a TPU topology) the compiler's step-time estimate of the distillation step.

    # XLA:TPU, ahead of time from any host (pip install -e '.[tpu-plan]'): the real chip's compiler
    python tools/plan_memory.py --config=configs/wan21_distill.py:1.3b --topology=v5p:2x2x1 --mesh=fsdp=1
    python tools/plan_memory.py --config=configs/wan21_distill.py:14b --topology=v5p:2x2x2,v6e:2x4 \\
        --mesh=fsdp=-1 --config.distill.batch_size=8 [--json out.json] [--no_time]
    # XLA:CPU on virtual devices (no libtpu): an UPPER BOUND, the CPU compiler keeps fp32 copies of bf16 tensors
    python tools/plan_memory.py --config=configs/wan21_distill.py:1.3b --mesh=fsdp=8

--topology: any v4/v5e/v5p/v6e topology string; several (comma-separated) give one plan each. --mesh may use
-1 for "all the topology's devices"; a mesh smaller than the topology plans its first devices (one chip of
v5p:2x2x1 with fsdp=1). Config overrides work as in dollar_jax.main. Accelerator-only kernels are planned with
their interpreted twin on the CPU compiler; on a topology the real splash kernel is compiled.
"""

from __future__ import annotations

import json
import math
import os
import sys


def _flag(argv, name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    return values[-1] if values else None


def _mesh_arg(argv) -> dict:
    value = _flag(argv, "mesh")
    if value is None:
        raise SystemExit("--mesh=axis=size[,axis=size...] is required, e.g. --mesh=fsdp=8,context=2 (-1: the rest)")
    shape = {}
    for part in value.split(","):
        axis, _, size = part.partition("=")
        if not (size.isdigit() and int(size) >= 1) and size != "-1":
            raise SystemExit(f"--mesh: {part!r} is not axis=positive_size (or axis=-1)")
        shape[axis.strip()] = int(size)
    return shape


def main(argv) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py[:arg]).",
                                                  lock_config=True)
    flags.DEFINE_string("mesh", None, "Mesh, e.g. fsdp=8,context=2 (sizes multiply to the device count).")
    flags.DEFINE_string("topology", None, "TPU topologies to compile for with XLA:TPU, e.g. v5p:2x2x2,v6e:4x4.")
    json_flag = flags.DEFINE_string("json", None, "Also write the plan(s) as JSON to this file.")
    no_time = flags.DEFINE_bool("no_time", False, "Skip the step-time estimate (4 small extra compiles).")
    flags.mark_flags_as_required(["config", "mesh"])

    def run(_):
        from dollar_jax.train.planner import format_plan, plan_distill_step

        config = config_flag.value
        shape = _mesh_arg(sys.argv)
        topologies = [t for t in (flags.FLAGS.topology or "").split(",") if t] or [None]
        results = []
        for topology in topologies:
            try:
                result = plan_distill_step(config, shape, topology, estimate_time=not no_time.value)
            except (ValueError, RuntimeError) as e:
                raise SystemExit(f"plan_memory: {e}") from None
            print(format_plan(result), flush=True)
            results.append(result)
        if json_flag.value:
            with open(json_flag.value, "w") as f:
                json.dump(results if len(results) > 1 else results[0], f, indent=2)

    app.run(run, argv)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    if _flag(sys.argv, "topology") is None:
        shape = _mesh_arg(sys.argv)
        if -1 in shape.values():
            raise SystemExit("--mesh: -1 needs --topology (on the CPU compiler the mesh's product is the device count)")
        # Virtual devices must be requested before JAX initialises its backend.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={math.prod(shape.values())}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"  # a topology is compiled for from the CPU host; libtpu is loaded for it
    main(sys.argv)
