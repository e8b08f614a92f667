"""Preemption and restarts of dollar_jax.main in subprocesses (the quick world teacher on random latents).

- SIGTERM mid-run: the step in progress is checkpointed, the process exits with PREEMPTED_EXIT_CODE, and the
  restarted run reproduces an uninterrupted one bit for bit, loading the train step from the persistent
  compilation cache instead of compiling it again.
(The two-process version, with jax.distributed and asynchronous checkpoints, is in test_multiprocess.py.)
"""

import os
import signal

import pytest
from processes import (assert_same_run, checkpoint_steps, finish, last_logged_step, run, start, teacher_args,
                       wait_for, write_random_latents)

from dollar_jax.train.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_random_latents(str(tmp_path_factory.mktemp("preempt_data")))


def test_sigterm_saves_the_current_step_and_the_restart_is_exact(data_dir, tmp_path):
    steps, cache = 16, str(tmp_path / "cache")
    args = lambda w: teacher_args(w, data_dir, steps, "--config.checkpoint.every_steps=1000",
                                  f"--config.compilation_cache={cache}")
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    run(args(whole))
    # config.tensorboard=False (teacher_args): metrics.jsonl and no TensorBoard event files.
    run_files = os.listdir(os.path.join(whole, "runs", "teacher"))
    assert "metrics.jsonl" in run_files and not [n for n in run_files if "tfevents" in n], run_files
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
