"""Distillation on the session's trained world: sharding, exact resume, and what the student learns."""

import os
import shutil

import jax
import numpy as np
import pytest

from dollar_jax.jobs import distill as distill_job
from dollar_jax.train.flops import is_throughput_metric
from dollar_jax.train.loop import train
from dollar_jax.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def distill_config(config, **distill):
    """The tests' distillation run. One program for every test that keeps these settings (the reward tests'
    plain run, the health test): the suite's shared compilation cache then compiles it once, not once per test.
    Captions come in groups of 4 so that the within-prompt health metrics are logged too, and the EMA and the
    student's optimiser states wait in host memory between steps (config.distill.ema_memory, optim_memory; the
    latter with per-update NaN guards): 8 devices = 1, the exact resume and the reward tests' bit-exact
    comparisons then hold for that placement (the demo test trains with everything on the device)."""
    c = config.copy_and_resolve_references()
    c.job = "distill"
    c.distill.update(dict(steps=6, batch_size=8, fake_updates=2, repeat_captions=4, ema_memory="host",
                          optim_memory="host", nan_guard="update"))
    c.distill.update(distill)
    c.log_every_steps, c.checkpoint.every_steps, c.sampling.every_steps = 1, 2, 0
    c.step_compile = "light"  # 6 steps: compiling dominates (dollar_jax/compile_effort.py)
    return c


def _rows(run_dir):
    # Wall-clock throughput (TFLOP/s, MFU) differs between runs; everything else must not.
    return [{k: v for k, v in r.items() if not is_throughput_metric(k)} for r in read_metrics(run_dir)
            if "loss_generator" in r]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
def test_distill_step_on_8_devices_equals_one_device(distill_run, tmp_path):
    base, workdir, one_run = distill_run  # the shared run, on one device
    assert base.mesh.to_dict() == dict(data=1, fsdp=1, context=1, tensor=1)
    c = base.copy_and_resolve_references()
    c.mesh.update(dict(data=2, fsdp=2, context=1, tensor=2))
    train(distill_job.make_job(c, workdir), c, str(tmp_path / "eight"))
    eight, one = _rows(str(tmp_path / "eight")), _rows(one_run)
    assert len(eight) == len(one) == c.distill.steps
    for key in ("loss_generator", "loss_vsd", "loss_cd", "loss_fake", "grad_norm_student"):
        np.testing.assert_allclose([r[key] for r in eight], [r[key] for r in one], rtol=1e-4, err_msg=key)


def test_resume_mid_distillation_is_exact(distill_run, tmp_path):
    c, workdir, shared = distill_run
    run = str(tmp_path / "run")
    shutil.copytree(shared, run)  # the uninterrupted run, trained once for the session
    uninterrupted = _rows(run)
    assert [r["step"] for r in uninterrupted] == [1, 2, 3, 4, 5, 6]
    # Lose everything after the step-2 checkpoint, as a crash there would, and run again.
    for step in ("4", "6"):
        shutil.rmtree(os.path.join(run, "checkpoints", step))
    resumed_state = train(distill_job.make_job(c, workdir), c, run)
    assert _rows(run) == uninterrupted
    assert int(resumed_state.step) == 6


def test_student_grids_thin_the_trained_grid(world_run):
    config, _ = world_run
    grids = distill_job.student_grids(config.distill)
    assert grids == {1: (999.0,), 2: (999.0, 499.0), 4: (999.0, 749.0, 499.0, 249.0)}
    c = config.copy_and_resolve_references()
    c.distill.eval_steps = (3,)
    with pytest.raises(ValueError, match="3 steps"):
        distill_job.student_grids(c.distill)
