"""Two processes with jax.distributed on CPU run the real train loop together: they match one process, and
they survive a preemption and a crash exactly.

One test, so that its runs are shared (the first two-process start compiles the step in each process; every later
start loads it from the one compilation cache the runs share):
1. The quick world teacher on a small random latents dataset, FSDP over 4 devices, asynchronous checkpoints
   every 2 steps: once as one process with 4 virtual devices, once as 2 processes x 2 devices that find each
   other through DOLLAR_COORDINATOR. Every host reads only its rows of each global batch, host 0 alone writes
   metrics, both write their checkpoint shards; the losses of every step and the exported weights agree.
2. The same two-process run again: SIGTERM to ONE host (the JAX preemption service tells both; both save the
   same step and exit 75), a restart, then both SIGKILLed while saving asynchronously, and a last restart to
   the end: bit-exact with the unbroken two-process run of part 1.
"""

import glob
import os
import signal

import numpy as np
import pytest
from processes import (assert_same_run, checkpoint_steps, finish, last_logged_step, losses, run, start, teacher_args,
                       teacher_weights, train_step_entries, wait_for, write_random_latents)

from dollar_jax.train.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow
STEPS = 12


def _args(workdir, data_dir, cache):
    # One compilation cache for every start: each process writes its own entries (dollar_jax/compilation_cache.py),
    # so every two-process start after the first loads its step in both processes instead of compiling it.
    return teacher_args(workdir, data_dir, STEPS, "--config.checkpoint.every_steps=2",
                        "--config.checkpoint.asynchronous=True", "--config.checkpoint.keep=10",
                        f"--config.compilation_cache={cache}")


def test_two_processes_match_one_and_resume_exactly_after_preemption_and_kill(tmp_path):
    data_dir = write_random_latents(str(tmp_path / "data"))
    single, whole, cut = str(tmp_path / "single"), str(tmp_path / "whole"), str(tmp_path / "cut")
    cache = str(tmp_path / "compilation_cache")

    # 1. Two processes = one process.
    run(_args(single, data_dir, cache), processes=1, devices_per_process=4)
    one_process = train_step_entries(cache)
    outputs = run(_args(whole, data_dir, cache), processes=2, devices_per_process=2)
    # Each of the two processes wrote its own entry for the 2-process step (XLA:CPU keys it per process).
    entries = train_step_entries(cache)
    assert len(one_process) == 1 and len(entries) == 3, entries
    for pid, out in enumerate(outputs):  # they really formed one 4-device runtime
        assert f"process {pid} of 2: 2 local / 4 global devices" in out, out[-2000:]
    want, got = losses(single), losses(whole)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=2e-4)
    for workdir in (single, whole):  # both saved the final step and exported the model folder
        assert checkpoint_steps(workdir)[-1] == STEPS
        assert os.path.exists(os.path.join(workdir, "teacher", "config.json"))
    # The exported teachers (every host wrote its shards, host 0 the folder) hold the same weights.
    for x, y in zip(teacher_weights(single), teacher_weights(whole), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)

    # 2. Preempted on one host, then both killed: the restarts end bit-exact with the unbroken run.
    procs = start(_args(cut, data_dir, cache), 2, 2)
    wait_for(lambda: last_logged_step(cut) >= 2, procs, what="step 2")
    os.killpg(procs[1].pid, signal.SIGTERM)  # only host 1 is told
    outputs = finish(procs, expect=PREEMPTED_EXIT_CODE)
    saved = checkpoint_steps(cut)[-1]
    assert saved < STEPS
    for out in outputs:  # both hosts stopped after the same step and saved it together
        assert f"saved the checkpoint of step {saved}" in out, out[-2000:]

    procs = start(_args(cut, data_dir, cache), 2, 2)
    after = saved + 2 - saved % 2  # the next periodic checkpoint
    wait_for(lambda: after in checkpoint_steps(cut) and last_logged_step(cut) > after, procs, what=f"checkpoint {after}")
    os.killpg(procs[1].pid, signal.SIGKILL)  # one host dies, then the other
    os.killpg(procs[0].pid, signal.SIGKILL)
    finish(procs, expect=None)
    resumed_from = checkpoint_steps(cut)[-1]
    assert after <= resumed_from < STEPS

    outputs = run(_args(cut, data_dir, cache), processes=2, devices_per_process=2)
    assert f"resumed from step {resumed_from}" in outputs[0], outputs[0][-2000:]
    assert train_step_entries(cache) == entries  # the three restarts loaded their step, in both processes
    assert_same_run(whole, cut)
    assert checkpoint_steps(cut)[-1] == STEPS
    # A save cut short leaves a temporary folder at most, never a step folder; the restart cleans it up.
    assert not glob.glob(os.path.join(cut, "runs", "teacher", "checkpoints", "*tmp*"))
