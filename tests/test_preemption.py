"""Preemption and restarts of dollar_jax.main in subprocesses (the quick world teacher on random latents).

- SIGTERM mid-run: the step in progress is checkpointed, the process exits with PREEMPTED_EXIT_CODE, and the
  restarted run reproduces an uninterrupted one bit for bit, loading the train step from the persistent
  compilation cache instead of compiling it again.
- Two jax.distributed processes with asynchronous checkpoints: one SIGTERMed (both save the same step), then
  both SIGKILLed mid-run; the restarts match an uninterrupted two-process run bit for bit.
"""

import glob
import os
import signal

import jax
import numpy as np
import pytest
from processes import finish, metric_rows, run, start, teacher_args, wait_for, write_random_latents

from dollar_jax.train.flops import is_throughput_metric
from dollar_jax.train.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_random_latents(str(tmp_path_factory.mktemp("preempt_data")))


def losses(workdir) -> list[dict]:
    """Every per-step training metric row, without wall-clock ones (they differ between runs)."""
    rows = metric_rows(os.path.join(workdir, "runs", "teacher"))
    return [{k: v for k, v in r.items() if not is_throughput_metric(k)} for r in rows if "loss" in r]


def last_logged_step(workdir) -> int:
    rows = losses(workdir)
    return rows[-1]["step"] if rows else 0


def checkpoint_steps(workdir) -> list[int]:
    d = os.path.join(workdir, "runs", "teacher", "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def teacher_weights(workdir) -> list[np.ndarray]:
    from flax import nnx

    from dollar_jax.checkpoint import load_dit

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(load_dit(os.path.join(workdir, "teacher")), nnx.Param))]


def assert_same_run(a, b):
    assert losses(a) == losses(b)  # exact float equality of every logged metric, every step
    for x, y in zip(teacher_weights(a), teacher_weights(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_sigterm_saves_the_current_step_and_the_restart_is_exact(data_dir, tmp_path):
    steps, cache = 16, str(tmp_path / "cache")
    args = lambda w: teacher_args(w, data_dir, steps, "--config.checkpoint.every_steps=1000",
                                  f"--config.compilation_cache={cache}")
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    run(args(whole))
    compiled = sorted(os.listdir(cache))
    assert any(n.startswith("jit_train_step") for n in compiled), compiled  # the step is in the cache

    procs = start(args(cut), 1, 4)
    wait_for(lambda: last_logged_step(cut) >= 2, procs, what="step 2")
    os.kill(procs[0].pid, signal.SIGTERM)
    (out,) = finish(procs, expect=PREEMPTED_EXIT_CODE)
    saved = checkpoint_steps(cut)
    assert len(saved) == 1 and saved[0] < steps, (saved, out[-2000:])
    assert saved[0] == last_logged_step(cut), out[-2000:]  # the step it was on, not an older one
    assert f"saved the checkpoint of step {saved[0]}" in out

    run(args(cut))
    assert_same_run(whole, cut)
    assert sorted(os.listdir(cache)) == compiled  # nothing was compiled again: every program came from the cache


def test_two_processes_preempted_then_killed_resume_exactly(data_dir, tmp_path):
    """2 jax.distributed processes, asynchronous checkpoints every 2 steps. SIGTERM to ONE host: the JAX
    preemption service tells both, and both save the same step and exit 75. Restarted, then both SIGKILLed
    while saving asynchronously; restarted again to the end: bit-exact with an unbroken two-process run."""
    # No compilation cache here: JAX writes it from process 0 only, and in a restart tried here process 0 loaded
    # the step while process 1 compiled it; on a loaded CPU the first Gloo collective then timed out (30 s).
    steps = 12
    args = lambda w: teacher_args(w, data_dir, steps, "--config.checkpoint.every_steps=2",
                                  "--config.checkpoint.asynchronous=True", "--config.checkpoint.keep=10",
                                  "--config.compilation_cache=")
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    run(args(whole), processes=2, devices_per_process=2)

    procs = start(args(cut), 2, 2)
    wait_for(lambda: last_logged_step(cut) >= 2, procs, what="step 2")
    os.killpg(procs[1].pid, signal.SIGTERM)  # only host 1 is told
    outputs = finish(procs, expect=PREEMPTED_EXIT_CODE)
    saved = checkpoint_steps(cut)[-1]
    assert saved < steps
    for out in outputs:  # both hosts stopped after the same step and saved it together
        assert f"saved the checkpoint of step {saved}" in out, out[-2000:]

    procs = start(args(cut), 2, 2)
    after = saved + 2 - saved % 2  # the next periodic checkpoint
    wait_for(lambda: after in checkpoint_steps(cut) and last_logged_step(cut) > after, procs, what=f"checkpoint {after}")
    os.killpg(procs[1].pid, signal.SIGKILL)  # one host dies, then the other
    os.killpg(procs[0].pid, signal.SIGKILL)
    finish(procs, expect=None)
    resumed_from = checkpoint_steps(cut)[-1]
    assert after <= resumed_from < steps

    outputs = run(args(cut), processes=2, devices_per_process=2)
    assert f"resumed from step {resumed_from}" in outputs[0], outputs[0][-2000:]
    assert_same_run(whole, cut)
    assert checkpoint_steps(cut)[-1] == steps
    # A save cut short leaves a temporary folder at most, never a step folder; the restart cleans it up.
    assert not glob.glob(os.path.join(cut, "runs", "teacher", "checkpoints", "*tmp*"))
