"""Restarts of dollar_jax.main in subprocesses (the quick world teacher on random latents, one process).

One run is cut twice and must end bit for bit where an uninterrupted run ends:
- SIGTERM: the step in progress is checkpointed and the process exits with PREEMPTED_EXIT_CODE;
- after a restart, SIGKILL between two periodic checkpoints (nothing saved on the way out, an asynchronous save
  possibly cut short): the last restart resumes from the last complete checkpoint.
Both restarts load the train step from the persistent compilation cache instead of compiling it again.
(The two-process version, with jax.distributed and asynchronous checkpoints, is in test_multiprocess.py.)
"""

import glob
import os
import signal

import pytest
from processes import (assert_same_run, checkpoint_steps, finish, last_logged_step, run, start, teacher_args,
                       wait_for, write_random_latents)

from dollar_jax.train.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow
STEPS, EVERY = 40, 10


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_random_latents(str(tmp_path_factory.mktemp("preempt_data")))


def test_sigterm_then_sigkill_between_checkpoints_and_the_restarts_are_exact(data_dir, tmp_path):
    cache = str(tmp_path / "cache")

    def args(workdir):
        return teacher_args(workdir, data_dir, STEPS, f"--config.checkpoint.every_steps={EVERY}",
                            f"--config.compilation_cache={cache}")

    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    run(args(whole))
    # config.tensorboard=False (teacher_args): metrics.jsonl and no TensorBoard event files.
    run_files = os.listdir(os.path.join(whole, "runs", "teacher"))
    assert "metrics.jsonl" in run_files and not [n for n in run_files if "tfevents" in n], run_files
    compiled = sorted(os.listdir(cache))
    assert any(n.startswith("jit_train_step") for n in compiled), compiled  # the step is in the cache

    # 1. SIGTERM: the step it was on is saved, not an older one.
    procs = start(args(cut), 1, 4)
    wait_for(lambda: last_logged_step(cut) >= 2, procs, what="step 2")
    os.kill(procs[0].pid, signal.SIGTERM)
    (out,) = finish(procs, expect=PREEMPTED_EXIT_CODE)
    saved = checkpoint_steps(cut)[-1]
    assert saved < STEPS and saved == last_logged_step(cut), (checkpoint_steps(cut), out[-2000:])
    assert f"saved the checkpoint of step {saved}" in out

    # 2. SIGKILL past the next periodic checkpoint, before the one after it.
    after = saved + EVERY - saved % EVERY
    procs = start(args(cut), 1, 4)
    wait_for(lambda: after in checkpoint_steps(cut) and last_logged_step(cut) > after + 1, procs,
             what=f"checkpoint {after}")
    os.kill(procs[0].pid, signal.SIGKILL)
    (out,) = finish(procs, expect=None)
    assert f"resumed from step {saved}" in out, out[-2000:]
    killed_at, resume_from = last_logged_step(cut), checkpoint_steps(cut)[-1]
    assert after <= resume_from <= killed_at < STEPS, (checkpoint_steps(cut), killed_at)

    # 3. To the end: the same metrics, every step, and the same weights as the unbroken run.
    (out,) = run(args(cut))
    assert f"resumed from step {resume_from}" in out, out[-2000:]
    assert_same_run(whole, cut)
    assert checkpoint_steps(cut)[-1] == STEPS
    assert not glob.glob(os.path.join(cut, "runs", "teacher", "checkpoints", "*tmp*"))  # a cut save is cleaned up
    # The train step was not compiled again: its entry is the one the unbroken run wrote. (Small jits are not
    # compared: JAX caches a program only if it compiled for over MIN_COMPILE_SECONDS, so a helper near that line
    # is cached by one process and not by another when the machine is busy.)
    now = sorted(os.listdir(cache))
    assert set(compiled) <= set(now), (compiled, now)
    assert steps_in(now) == steps_in(compiled), (compiled, now)


def steps_in(entries):
    return [n for n in entries if n.startswith("jit_train_step")]
