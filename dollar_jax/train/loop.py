"""The one training loop every job runs: resume, step, log, checkpoint, sample, guard against NaNs.

A job supplies its roles, its initial parameters, a pure train step and an input dataset; the loop owns
everything else. Data flows one way: config -> mesh -> state -> jitted step(state, batch) -> metrics /
checkpoints / samples. The step never touches files; the loop never looks inside the state.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dollar_jax import storage
from dollar_jax.compile_effort import step_options
from dollar_jax.data.pipeline import batch_sharding, numeric, to_global
from dollar_jax.parallel.mesh import make_mesh
from dollar_jax.parallel.rules import axis_rules
from dollar_jax.train.checkpointing import RunCheckpointer
from dollar_jax.train.flops import peak_flops, utilisation
from dollar_jax.train.preemption import Preempted, PreemptionWatch
from dollar_jax.train.state import Role, TrainState, init_state, state_shardings

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss or gradient and config.nan_policy is 'stop'."""


@dataclasses.dataclass
class Job:
    name: str
    roles: Mapping[str, Role]
    abstract_params: Callable[[], dict]  # cheap: shapes/dtypes only (jax.eval_shape of the initialiser)
    initial_params: Callable[[], dict]  # called only when there is no checkpoint to resume
    # Pure: (state, frozen, batch) -> (state, metrics); metrics must include "finite".
    train_step: Callable[[TrainState, dict, dict], tuple[TrainState, dict]]
    dataset: Any  # grain IterDataset of host-local NumPy batches
    total_steps: int
    prepare_batch: Callable[[dict], dict] = numeric  # host-side: NumPy batch -> the arrays the step reads
    on_sample: Callable[[TrainState, int], dict] | None = None  # writes samples, returns metrics to log
    sample_every: int = 0
    learning_rate: Callable[[int], float] | None = None
    # Inputs the step reads but never changes (the frozen teacher, the null text): placed on the mesh once,
    # passed to every step, neither donated nor checkpointed (they are inputs of the run, not its state).
    frozen: Callable[[Any], dict] | None = None  # mesh -> pytree of placed arrays
    # Host-side companions of the step (the reward labeller): extra NumPy inputs for step `done`, a callback
    # with the step's "_outputs" and its host batch (called once the step's metrics are fetched; outputs None
    # for a non-finite step), and host state saved/restored with the checkpoints.
    extra_inputs: Callable[[int], dict] | None = None
    after_step: Callable[[int, dict, dict], None] | None = None
    host_state: Callable[[], dict] | None = None
    restore_host_state: Callable[[dict], None] | None = None
    close: Callable[[], None] | None = None
    # Analytic FLOPs of one step per role (train/flops.py): logged as TFLOP/s per device and MFU per role.
    flops_per_step: Mapping[str, float] | None = None
    # Called with (step, the window's mean metrics) each time the loop logs them (e.g. health warnings).
    on_metrics: Callable[[int, dict], Any] | None = None
    # FLOPs the hardware spends on rematerialised recompute per step (train/flops.py): logged as HFU beside MFU.
    recompute_flops_per_step: float = 0.0


def jit_train_step(train_step: Callable, state_shardings, frozen_shardings, batch_shardings,
                   compiler_options: dict | None = None):
    """The one way a step is jitted (trainer, memory planner, benchmarks): the state keeps its shardings and is
    donated (updated in place); frozen inputs and the batch are read only. `compiler_options`: see
    compile_effort.step_options (config.step_compile)."""
    return jax.jit(train_step, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=(0,), compiler_options=compiler_options)


class Profiler:
    """A jax.profiler trace of steps [start, start + num) (1-based: step s is the s-th step run) into `folder`."""

    def __init__(self, folder: str, start: int, num: int):
        if num < 0 or (num and start < 1):
            raise ValueError(f"config.profile: start_step must be >= 1 and num_steps >= 0, got {start}, {num}")
        self.folder, self.start, self.stop, self.active = folder, start, start + num - 1, False

    def before(self, step: int) -> None:
        if self.stop >= self.start and step == self.start and not self.active:
            storage.makedirs(self.folder)
            jax.profiler.start_trace(self.folder)
            self.active = True

    def after(self, step: int, state) -> None:
        if self.active and step >= self.stop:
            jax.block_until_ready(state)  # the trace must hold the device work of its last step
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile of steps %d-%d written to %s", self.start, self.stop, self.folder)


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def train(job: Job, config, workdir: str) -> TrainState:
    """Run `job` to `job.total_steps`, resuming from <workdir>/checkpoints. Returns the final state."""
    storage.makedirs(workdir)
    mesh = make_mesh(dict(config.mesh))
    rules = list(config.sharding_rules) if config.sharding_rules else None
    with jax.set_mesh(mesh), axis_rules(rules):
        return _train(job, config, workdir, mesh)


def _train(job: Job, config, workdir: str, mesh) -> TrainState:
    from dollar_jax.train.metrics import make_writer, truncate_metrics

    abstract = jax.eval_shape(lambda p: init_state(job.roles, p, config.seed), job.abstract_params())
    shardings = state_shardings(job.roles, abstract, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    ckpt = RunCheckpointer(storage.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                           asynchronous=config.checkpoint.asynchronous)
    data_iter = iter(job.dataset)
    restored = ckpt.restore_latest(target, with_host=job.host_state is not None)
    if restored is not None:
        state, data_state, host, start = restored
        data_iter.set_state(data_state)
        if job.restore_host_state is not None:
            job.restore_host_state(host)
        truncate_metrics(workdir, start)
        log.info("[%s] resumed from step %d", job.name, start)
    else:
        state = jax.jit(lambda p: init_state(job.roles, p, config.seed), out_shardings=shardings)(job.initial_params())
        start = 0
        truncate_metrics(workdir, 0)
    if start >= job.total_steps:
        ckpt.close()
        if job.close:
            job.close()
        return state

    writer = make_writer(workdir, config.tensorboard)
    if config.tensorboard:  # clu imports TensorFlow: only when TensorBoard is written
        from clu import periodic_actions

        report = periodic_actions.ReportProgress(num_train_steps=job.total_steps, writer=writer,
                                                 every_steps=config.log_every_steps)
    else:
        def report(step):
            pass
    config_json = config.to_json_best_effort() if hasattr(config, "to_json_best_effort") else "{}"

    data_wait = 0.0  # host seconds spent waiting for input since the last logged window

    def host_batch(done: int):
        nonlocal data_wait
        t0 = time.perf_counter()
        raw = next(data_iter)
        batch = job.prepare_batch(raw)
        if job.extra_inputs is not None:
            batch.update(job.extra_inputs(done))
        data_wait += time.perf_counter() - t0
        return raw, batch

    raw, first = host_batch(start + 1)
    batch_shardings = {k: batch_sharding(mesh, v.ndim) for k, v in first.items()}
    frozen = job.frozen(mesh) if job.frozen else {}
    frozen_shardings = jax.tree.map(lambda a: a.sharding, frozen)
    step_fn = jit_train_step(job.train_step, shardings, frozen_shardings, batch_shardings,
                             compiler_options=step_options(config.step_compile))

    every_ckpt = config.checkpoint.every_steps
    # (step, device metrics, device outputs, host batch) not yet fetched: one step of lag.
    pending: list[tuple[int, dict, Any, dict]] = []
    window: list[dict] = []
    t_start, last_line = time.perf_counter(), 0.0
    mark: tuple[int, float] | None = None  # (step, time) of the last throughput window's end (after compilation)
    peak = peak_flops()
    batch = first

    def drain(upto_all: bool):
        """Fetch metrics of finished steps; enforce the NaN policy; write averages every log interval."""
        nonlocal window, mark, data_wait
        keep = 0 if upto_all else 1
        while len(pending) > keep:
            s, m, outputs, raw_s = pending.pop(0)
            m = jax.device_get(m)
            finite = bool(m.pop("finite"))
            if job.after_step is not None:  # only now is the step known finite: never hand on a bad step's outputs
                job.after_step(s, outputs if finite else None, raw_s)
            if not finite:
                msg = f"[{job.name}] non-finite loss or gradient at step {s}"
                if config.nan_policy == "stop":
                    raise NonFiniteError(msg + "; stopping (the last checkpoint is kept). "
                                         "Set config.nan_policy='skip' to skip such steps instead.")
                log.warning("%s; the update was skipped", msg)
                m["skipped"] = 1.0
            window.append({k: float(np.asarray(v)) for k, v in m.items()})
            if s % config.log_every_steps == 0 or s == job.total_steps:
                keys = sorted({k for w in window for k in w})
                means = {k: float(np.mean([w[k] for w in window if k in w])) for k in keys}
                if job.learning_rate is not None:
                    means["learning_rate"] = float(job.learning_rate(s))
                now = time.perf_counter()
                if mark is not None and s > mark[0]:
                    # Wall time per step over the window (compilation excluded) and the part of it the host
                    # spent waiting for data (reading, decoding, host-side inputs): if close, the input is the
                    # bottleneck. Metrics are fetched one step late, so the window is approximate by a step.
                    s0, t0 = mark
                    means["time_step_s"] = (now - t0) / (s - s0)
                    means["time_data_wait_s"] = data_wait / (s - s0)
                    if job.flops_per_step:
                        means.update(utilisation(job.flops_per_step, s - s0, now - t0, mesh.devices.size, peak,
                                                 job.recompute_flops_per_step))
                if mark is not None:
                    mark, data_wait = (s, now), 0.0
                writer.write_scalars(s, means)
                if job.on_metrics is not None:
                    job.on_metrics(s, means)
                window = []

    profile = Profiler(storage.join(workdir, "profile"), config.profile.start_step, config.profile.num_steps)
    watch = PreemptionWatch()  # from here on SIGTERM means "save this step and stop"
    try:
        for step in range(start, job.total_steps):
            profile.before(step + 1)
            with jax.profiler.StepTraceAnnotation(job.name, step_num=step + 1):
                state, metrics = step_fn(state, frozen, to_global(batch, mesh))
            profile.after(step + 1, state)
            done = step + 1
            outputs = metrics.pop("_outputs", None)
            pending.append((done, metrics, outputs, raw))
            report(done)
            preempted = watch.reached(done)  # every host asks at every step: they agree on the step
            save_now = done == job.total_steps or (every_ckpt and done % every_ckpt == 0) or preempted
            drain(upto_all=save_now)
            # Evaluate before saving: host state the evaluation changes (the L_FT gate) belongs to this checkpoint.
            if job.on_sample and job.sample_every and done % job.sample_every == 0 and done < job.total_steps:
                writer.write_scalars(done, job.on_sample(state, done))
            if save_now:
                host = job.host_state() if job.host_state is not None else None
                ckpt.save(done, state, data_iter.get_state(), {"config": config_json}, host)
            if preempted and done < job.total_steps:
                ckpt.wait()
                log.warning("[%s] preempted: saved step %d of %d", job.name, done, job.total_steps)
                raise Preempted(done)
            now = time.perf_counter()
            if done == start + 1:
                jax.block_until_ready(state)
                t_start = last_line = time.perf_counter()  # rates and ETA exclude compilation
                mark, data_wait = (done, t_start), 0.0
            elif jax.process_index() == 0 and (now - last_line > 10 or done == job.total_steps):
                rate = (done - start - 1) / (now - t_start)
                print(f"[{job.name}] step {done}/{job.total_steps}  {rate:.2f} steps/s  "
                      f"ETA {_fmt_eta((job.total_steps - done) / max(rate, 1e-9))}", flush=True)
                last_line = now
            if done < job.total_steps:
                raw, batch = host_batch(done + 1)
        drain(upto_all=True)
        if job.on_sample:
            writer.write_scalars(job.total_steps, job.on_sample(state, job.total_steps))
    finally:
        profile.close()
        watch.close()
        ckpt.close()
        writer.flush()
        if job.close:
            job.close()
    return state


def scalar_metrics(**values) -> dict[str, jax.Array]:
    """Cast metric values to float32 scalars (keeps the jitted step's output uniform). "finite" stays a bool and
    "_outputs" (arrays for the job's host side, see Job.after_step) passes through."""
    return {k: v if k in ("finite", "_outputs") else jnp.asarray(v, jnp.float32) for k, v in values.items()}
