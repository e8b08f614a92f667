"""Plan a run before renting the slice: compile the whole distillation step ahead of time for any model and mesh.

Nothing is allocated: parameters, optimiser states, the frozen teacher and the batch are ShapeDtypeStructs
with the shardings the trainer would give them. Two compilers can plan:

- XLA:TPU, ahead of time for a TPU topology (`topology="v5p:2x2x2"`; needs libtpu, the `tpu-plan` extra):
  the real compiler of the real chip, with the real splash kernel. Its memory analysis is what the chip
  will allocate, and its cost model estimates the step time.
- XLA:CPU on virtual CPU devices (no topology): works anywhere, but the CPU compiler keeps float32 copies of
  bfloat16 tensors and schedules differently, so its temporaries overstate accelerator memory (1.5-3x
  measured against XLA:TPU, BENCHMARKS.md). An upper bound, labelled as such.

FLOPs come from the analytic count (train/flops.py): model FLOPs (what MFU counts) and hardware FLOPs
(plus rematerialised recompute, what HFU counts). XLA's cost analysis counts a loop body once whatever its
trip count, so the step's own cost analysis is useless for a scanned model; the step-time estimate is built
instead from XLA:TPU's cost model of one DiT forward and one training pass, each measured as the difference
of a 2-layer and a 1-layer compile (the per-layer cost) times the layer count plus the rest, weighted by the
number of such passes the step makes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dollar_jax.compile_effort import step_options
from dollar_jax.config import dit_config, schedule_of
from dollar_jax.data.pipeline import batch_sharding, with_global_batch
from dollar_jax.parallel.mesh import make_mesh
from dollar_jax.parallel.rules import axis_rules
from dollar_jax.parallel.sharding import replicated, tree_shardings
from dollar_jax.train.flops import chip_spec, distill_step_passes, recompute_flops, token_count
from dollar_jax.train.loop import jit_train_step
from dollar_jax.train.state import TrainState, init_state, state_shardings

# On the CPU compiler, kernels that only run on accelerators are planned with their interpreted twin (same
# blockwise memory); on a TPU topology the real splash kernel is compiled, and cuDNN (GPU) becomes splash.
CPU_PLANNING_KERNEL = {"splash": "splash_interpret", "cudnn": "splash_interpret", "auto": "splash_interpret"}
TPU_PLANNING_KERNEL = {"cudnn": "splash", "splash_interpret": "splash", "auto": "splash"}
GIB = 2.0 ** 30


def _bytes(tree) -> int:
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def memory_summary(memory) -> dict:
    """A compiled executable's memory_analysis() in bytes, with the live peak: arguments + temporaries + the
    outputs not aliased to (donated) arguments."""
    fields = {"argument_bytes": memory.argument_size_in_bytes, "output_bytes": memory.output_size_in_bytes,
              "alias_bytes": memory.alias_size_in_bytes, "temp_bytes": memory.temp_size_in_bytes}
    fields = {k: int(v) for k, v in fields.items()}
    # Arguments placed in host memory (config.distill.ema_memory="host"): outside the device's peak.
    fields["host_argument_bytes"] = int(getattr(memory, "host_argument_size_in_bytes", 0) or 0)
    fields["peak_bytes"] = (fields["argument_bytes"] + fields["temp_bytes"] + fields["output_bytes"]
                            - fields["alias_bytes"])
    return fields


def topology_devices(topology: str) -> list:
    """The devices of a TPU topology ("v5p:2x2x2", "v6e:4x4", ...) for ahead-of-time compilation on any host."""
    # libtpu otherwise looks for a TPU VM's metadata server and refuses to share the process.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise RuntimeError("Planning for a TPU topology needs libtpu: pip install -e '.[tpu-plan]' "
                           "(or plan without --topology on the CPU compiler, an upper bound)") from e
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # libtpu's own message names the problem (bad name, bad shape)
        raise ValueError(f"TPU topology {topology!r} (e.g. v5p:2x2x2, v6e:4x4, v5e:2x2, v4:2x2x1): "
                         f"{str(e).splitlines()[0]}") from None


@dataclasses.dataclass
class AbstractStep:
    """The distillation step jitted as the trainer jits it, with its arguments as sharded ShapeDtypeStructs."""
    step: object  # train.dollar_step.DistillStep
    jitted: Callable
    state: TrainState
    frozen: dict
    batch: dict

    def compile(self):
        return self.jitted.lower(self.state, self.frozen, self.batch).compile()


def _placed(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def abstract_distill_step(config, dit, mesh) -> AbstractStep:
    """Build config's distillation step for `dit` on `mesh` (call inside `jax.set_mesh(mesh)`); nothing allocated.

    distill.batch_size is resolved for `mesh` as the trainer resolves it (-1: batch_per_shard per batch shard).
    """
    from dollar_jax.train.dollar_step import build_step  # the trainer's own step, not a copy

    config = with_global_batch(config, "distill", dict(zip(mesh.axis_names, mesh.devices.shape)))
    if not config.data.latent_shape or not config.data.text_shape:
        raise ValueError("Planning needs config.data.latent_shape and config.data.text_shape")
    latent_shape, text_shape = tuple(config.data.latent_shape), tuple(config.data.text_shape)
    step = build_step(config, dit, schedule_of(config), config.diffusion.prediction_type, latent_shape, text_shape)
    abstract = jax.eval_shape(lambda p: init_state(step.roles, p, 0), step.abstract_params)
    batch_size = int(config.distill.batch_size)
    batch = {"latents": jax.ShapeDtypeStruct((batch_size, *latent_shape), jnp.float32),
             "text": jax.ShapeDtypeStruct((batch_size, *text_shape), jnp.float32)}
    if step.reward is not None:
        batch.update(step.reward.abstract_inputs())
    frozen = {"teacher": step.teacher_abstract, "null_text": jax.ShapeDtypeStruct(text_shape, jnp.float32)}
    shardings = state_shardings(step.roles, abstract, mesh)
    frozen_shardings = {"teacher": tree_shardings(mesh, step.teacher_abstract, step.teacher_role.axes),
                        "null_text": replicated(mesh)}
    batch_shardings = {k: batch_sharding(mesh, v.ndim) for k, v in batch.items()}
    jitted = jit_train_step(step.train_step, shardings, frozen_shardings, batch_shardings,
                            compiler_options=step_options(config.step_compile, mesh.devices.flat[0].platform))
    return AbstractStep(step, jitted, _placed(abstract, shardings), _placed(frozen, frozen_shardings),
                        _placed(batch, batch_shardings))


def _pass_seconds(config, dit, mesh) -> dict[str, float]:
    """XLA:TPU's cost-model seconds of one DiT forward and one training pass (forward + backward w.r.t. the
    parameters, remat included) on the global batch, built per layer (see the module docstring)."""
    from flax import nnx

    from dollar_jax.models.dit import WanDiT
    from dollar_jax.models.layers import abstract

    latent_shape, text_shape = tuple(config.data.latent_shape), tuple(config.data.text_shape)
    batch = int(config.distill.batch_size)
    x = jax.ShapeDtypeStruct((batch, *latent_shape), jnp.float32, sharding=batch_sharding(mesh, 5))
    t = jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=batch_sharding(mesh, 1))
    c = jax.ShapeDtypeStruct((batch, *text_shape), jnp.float32, sharding=batch_sharding(mesh, 3))

    def seconds(layers: int) -> tuple[float, float]:
        cfg = dit.replace(num_layers=layers)
        graphdef, params = nnx.split(abstract(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))
        from dollar_jax.models.layers import logical_axes

        axes = logical_axes(params)
        params = nnx.to_pure_dict(params)
        placed = _placed(params, tree_shardings(mesh, params, axes))

        def forward(p, x, t, c):
            return nnx.merge(graphdef, p)(x, t, c)

        def train(p, x, t, c):
            return jax.grad(lambda q: jnp.mean(forward(q, x, t, c).astype(jnp.float32) ** 2))(p)

        out = []
        for fn in (forward, train):
            cost = jax.jit(fn).lower(placed, x, t, c).compile().cost_analysis()
            out.append(float(cost.get("optimal_seconds", float("nan"))))
        return out[0], out[1]

    one, two = seconds(1), seconds(2)
    layers = dit.num_layers
    return {"forward": one[0] + (layers - 1) * (two[0] - one[0]), "train": one[1] + (layers - 1) * (two[1] - one[1])}


def judge_step_estimate(seconds: float, model_flops: float, hardware_flops: float, peak_flops: float) -> dict:
    """The cost model's step time per device with the MFU/HFU it implies, or why it is rejected (FLOPs per
    device and the chip's peak FLOP/s, in any one unit).

    XLA:TPU's cost model gives a Pallas kernel (splash attention) no cost, and at Wan's 32,760 tokens attention
    is most of the FLOPs: it said 3 s for the 1.3B step on one v5p chip, which would be 10x the chip's peak.
    An estimate faster than the model FLOPs at peak is therefore reported as rejected, never as a time."""
    floor = model_flops / peak_flops
    if not seconds > 0 or seconds < floor:
        return {"step_estimate_rejected": (
            f"XLA:TPU's cost model says {seconds:.2f} s, less than the {floor:.1f} s the model FLOPs take at the "
            f"chip's peak (its cost model does not count Pallas kernels such as splash attention)")}
    return {"estimated_step_seconds": seconds, "estimated_mfu": model_flops / seconds / peak_flops,
            "estimated_hfu": hardware_flops / seconds / peak_flops}


def plan_distill_step(config, mesh_shape: dict, topology: str | None = None, estimate_time: bool = True) -> dict:
    """Compile config's distillation step on `mesh_shape` and measure it.

    Without `topology` the mesh is made of this host's (virtual CPU) devices; with it, of the first devices of
    that TPU topology (so "v5p:2x2x1" with mesh fsdp=1 plans one chip).
    """
    from dollar_jax.train.dollar_step import step_flops

    dit = dit_config(config)
    devices = None
    if topology:
        devices = topology_devices(topology)
        dit = dit.replace(attention=TPU_PLANNING_KERNEL.get(dit.attention, dit.attention))
    else:
        dit = dit.replace(attention=CPU_PLANNING_KERNEL.get(dit.attention, dit.attention))
    latent_shape, text_shape = tuple(config.data.latent_shape), tuple(config.data.text_shape)
    mesh = make_mesh(mesh_shape, devices=devices)
    config = with_global_batch(config, "distill", dict(zip(mesh.axis_names, mesh.devices.shape)))
    rules = list(config.sharding_rules) if config.sharding_rules else None
    with jax.set_mesh(mesh), axis_rules(rules):
        planned = abstract_distill_step(config, dit, mesh)
        memory = planned.compile().memory_analysis()
        flops = step_flops(config, dit, latent_shape, text_shape, planned.step.reward)
        passes = {k: sum(p[k] for p in distill_step_passes(config).values()) for k in ("forward", "train")}
        recompute = recompute_flops(config, dit, latent_shape, text_shape[0])
        pass_seconds = _pass_seconds(config, dit, mesh) if topology and estimate_time else None
    abstract, step, batch = planned.state, planned.step, int(config.distill.batch_size)
    n = mesh.devices.size
    device = mesh.devices.flat[0]
    chip = chip_spec(device)
    model_flops = sum(flops.values())
    hardware_flops = model_flops + recompute
    memory = memory_summary(memory)
    peak_bytes = memory["peak_bytes"]
    hbm = chip.hbm_gib_per_device(device) if chip else None
    plan = {
        "compiler": f"XLA:TPU ({topology})" if topology else "XLA:CPU (upper bound)",
        "device_kind": device.device_kind,
        "devices": n,
        "mesh": {k: v for k, v in zip(mesh.axis_names, mesh.devices.shape)},
        "batch": batch,
        "tokens_per_clip": token_count(dit, latent_shape),
        "parameters": {role: sum(math.prod(a.shape) for a in jax.tree.leaves(abstract.params[role]))
                       for role in abstract.params},
        "state_gib_total": (_bytes(abstract) + _bytes(step.teacher_abstract)) / GIB,
        "params_gib": {role: _bytes(abstract.params[role]) / GIB for role in abstract.params},
        "opt_state_gib": {role: _bytes(abstract.opt_state[role]) / GIB for role in abstract.opt_state},
        "ema_gib": {role: _bytes(abstract.ema[role]) / GIB for role in abstract.ema},
        "per_device_gib": {
            "arguments": memory["argument_bytes"] / GIB,
            "outputs": memory["output_bytes"] / GIB,
            "aliased": memory["alias_bytes"] / GIB,
            "temporaries": memory["temp_bytes"] / GIB,
            # Donated state is reused for the outputs, so the live peak is arguments + temporaries
            # + whatever outputs are not aliased to arguments.
            "peak": peak_bytes / GIB,
            "host_arguments": memory["host_argument_bytes"] / GIB,  # pinned host memory, not HBM
        },
        "hbm_gib_per_device": hbm,
        # Only XLA:TPU's figure decides a fit; the CPU compiler's is an upper bound.
        "fits": (peak_bytes / GIB <= hbm) if (hbm and topology) else None,
        "tflops_per_step": {role: f / 1e12 for role, f in flops.items()},
        "model_tflops_per_device_step": model_flops / n / 1e12,
        "hardware_tflops_per_device_step": hardware_flops / n / 1e12,
        "passes": passes,
    }
    if pass_seconds is not None:
        # Each device runs its share of every pass: the per-pass seconds are already per device.
        seconds = passes["forward"] * pass_seconds["forward"] + passes["train"] * pass_seconds["train"]
        plan["pass_seconds"] = pass_seconds
        if chip:
            plan.update(judge_step_estimate(seconds, model_flops / n, hardware_flops / n, chip.peak_bf16))
    return plan


def format_plan(plan: dict) -> str:
    mem = plan["per_device_gib"]
    mesh = ",".join(f"{k}={v}" for k, v in plan["mesh"].items() if v > 1) or "1 device"
    flops = ", ".join(f"{r} {v:.1f}" for r, v in plan["tflops_per_step"].items())
    hbm = plan["hbm_gib_per_device"]
    if plan["fits"] is None:
        verdict = (f"compiler upper bound; {hbm:.0f} GiB HBM per device" if hbm else "HBM unknown") + \
                  " (plan with --topology for a fit verdict)"
    else:
        verdict = f"{'FITS' if plan['fits'] else 'DOES NOT FIT'} in {hbm:.0f} GiB HBM per device"
    lines = [f"{plan['compiler']}, {plan['device_kind']}: mesh {mesh} ({plan['devices']} devices), "
             f"global batch {plan['batch']}, {plan['tokens_per_clip']} tokens/clip",
             f"  state (all roles + frozen teacher): {plan['state_gib_total']:.1f} GiB in total "
             f"(optimiser moments {sum(plan['opt_state_gib'].values()):.1f}, EMA {sum(plan['ema_gib'].values()):.1f})",
             f"  per device: arguments {mem['arguments']:.2f} GiB, temporaries {mem['temporaries']:.2f} GiB, "
             f"peak {mem['peak']:.2f} GiB: {verdict}"
             + (f"; {mem['host_arguments']:.2f} GiB in host memory" if mem.get("host_arguments") else ""),
             f"  TFLOPs per step: {flops}; per device: model {plan['model_tflops_per_device_step']:.1f}, "
             f"hardware (with remat) {plan['hardware_tflops_per_device_step']:.1f}"]
    if "estimated_step_seconds" in plan:
        mfu = f", implied MFU {plan['estimated_mfu']:.1%} (HFU {plan['estimated_hfu']:.1%})" \
            if "estimated_mfu" in plan else ""
        lines.append(f"  step time, XLA:TPU cost-model ESTIMATE: {plan['estimated_step_seconds']:.1f} s{mfu}")
    if "step_estimate_rejected" in plan:
        lines.append(f"  step time: no estimate ({plan['step_estimate_rejected']})")
    return "\n".join(lines)
