"""The generic training loop on a toy regression job: resume, NaN policy, corrupt-checkpoint recovery."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dollar_jax.config import base_config
from dollar_jax.data.pipeline import train_dataset
from dollar_jax.models.layers import Dense
from dollar_jax.train.checkpointing import RunCheckpointer
from dollar_jax.train.loop import Job, NonFiniteError, scalar_metrics, train
from dollar_jax.train.metrics import read_metrics
from dollar_jax.train.optim import make_optimizer
from dollar_jax.train.state import all_finite, apply_gradients, keep_if_finite, split_model, update_ema


class Toy(nnx.Module):
    def __init__(self, rngs):
        self.layer = Dense(4, 1, ("embed", None), rngs=rngs)

    def __call__(self, x):
        return self.layer(x)


SOURCE = [{"x": np.random.default_rng(i).standard_normal(4).astype(np.float32),
           "y": np.asarray([float(i % 7)], np.float32)} for i in range(64)]


def toy_config(total=30, every=10, nan_policy="stop"):
    c = base_config()
    c.teacher.steps, c.log_every_steps, c.nan_policy = total, 1, nan_policy
    c.checkpoint.every_steps = every
    c.teacher.optim.update(dict(decay="constant", warmup_steps=0, learning_rate=1e-2))  # same for any total
    c.mesh.update(dict(data=1, fsdp=1, context=1, tensor=1))
    return c


def toy_job(config, poison_step=-1):
    optimizer, lr = make_optimizer(config.teacher.optim, config.teacher.steps)
    make = lambda: Toy(nnx.Rngs(0))
    role, _ = split_model("toy", make(), optimizer, ema_decay=0.9)

    def step(state, frozen, batch):
        def loss_fn(p):
            pred = role.module(p)(batch["x"])
            bad = jnp.where(state.step == poison_step, jnp.nan, 1.0)
            return jnp.mean(jnp.square(pred - batch["y"])) * bad

        loss, grads = jax.value_and_grad(loss_fn)(state.params["toy"])
        params, opt, gnorm = apply_gradients(state, role, grads)
        new = state.replace(step=state.step + 1, params={"toy": params}, opt_state={"toy": opt},
                            ema={"toy": update_ema(state.ema["toy"], params, 0.9)})
        finite = all_finite(loss, grads)
        return keep_if_finite(finite, new, state), scalar_metrics(loss=loss, grad_norm=gnorm, finite=finite)

    return Job(name="toy", roles={"toy": role}, abstract_params=lambda: {"toy": split_model("t", make())[1]},
               initial_params=lambda: {"toy": split_model("t", make())[1]}, train_step=step,
               dataset=train_dataset(SOURCE, 8, seed=0), total_steps=config.teacher.steps, learning_rate=lr)


def _params(state):
    return np.asarray(jax.device_get(state.params["toy"]["layer"]["kernel"]))


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    config = toy_config()
    reference = train(toy_job(config), config, str(tmp_path / "ref"))
    # Interrupted run: stop after 20 steps (a checkpoint), then carry on to 30 from the same workdir.
    short = toy_config(total=20)
    train(toy_job(short), short, str(tmp_path / "run"))
    resumed = train(toy_job(config), config, str(tmp_path / "run"))
    np.testing.assert_array_equal(_params(resumed), _params(reference))
    ref_rows = [r for r in read_metrics(str(tmp_path / "ref")) if "loss" in r]
    run_rows = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert [r["step"] for r in run_rows] == list(range(1, 31))
    assert [r["loss"] for r in run_rows] == [r["loss"] for r in ref_rows]


def test_nan_stop_reports_the_step_and_keeps_the_last_checkpoint(tmp_path):
    config = toy_config(total=30, every=10)
    with pytest.raises(NonFiniteError, match="step 15"):
        train(toy_job(config, poison_step=14), config, str(tmp_path))  # the 15th step (state.step == 14)
    assert RunCheckpointer(str(tmp_path / "checkpoints")).steps() == [10]


def test_nan_skip_leaves_the_state_untouched_for_that_step(tmp_path):
    config = toy_config(total=16, every=8, nan_policy="skip")
    skipped = train(toy_job(config, poison_step=5), config, str(tmp_path / "skip"))
    rows = {r["step"]: r for r in read_metrics(str(tmp_path / "skip")) if "loss" in r}
    assert rows[6].get("skipped") == 1.0 and "skipped" not in rows[5]
    assert int(skipped.step) == 16
    # The skipped 6th step changed nothing: a run stopped after 5 steps and one stopped after 6 hold the same
    # parameters and EMA.
    c5, c6 = toy_config(total=5, every=5, nan_policy="skip"), toy_config(total=6, every=6, nan_policy="skip")
    s5 = train(toy_job(c5, poison_step=5), c5, str(tmp_path / "five"))
    s6 = train(toy_job(c6, poison_step=5), c6, str(tmp_path / "six"))
    np.testing.assert_array_equal(_params(s5), _params(s6))
    np.testing.assert_array_equal(np.asarray(s5.ema["toy"]["layer"]["kernel"]), np.asarray(s6.ema["toy"]["layer"]["kernel"]))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    config = toy_config(total=20, every=10)
    train(toy_job(config), config, str(tmp_path))
    ckdir = tmp_path / "checkpoints"
    # Truncate every data file of the newest checkpoint's state.
    for root, _, files in os.walk(ckdir / "20" / "state"):
        for f in files:
            if "ocdbt" in root or f.startswith("d") or root.endswith("/d"):
                path = os.path.join(root, f)
                with open(path, "r+b") as fh:
                    fh.truncate(max(0, os.path.getsize(path) // 3))
    longer = toy_config(total=25, every=10)
    reference = train(toy_job(longer), longer, str(tmp_path / "fresh"))
    resumed = train(toy_job(longer), longer, str(tmp_path))
    names = sorted(os.listdir(ckdir))
    assert any(n.startswith("20.corrupt") for n in names), names  # kept aside, not deleted
    np.testing.assert_array_equal(_params(resumed), _params(reference))


def test_unknown_config_key_is_an_error():
    c = base_config()
    with pytest.raises(AttributeError, match="learning_rat"):
        c.teacher.optim.learning_rat = 1.0
    with pytest.raises(TypeError):
        c.distill.steps = "many"


def test_light_step_compile_reaches_the_compiler_and_a_wrong_value_is_named(tmp_path, monkeypatch):
    """config.step_compile="light": the trainer compiles its step at LLVM level 0 on CPU (and trains the same);
    "full" leaves XLA's defaults; any other value is one clear error before anything runs."""
    from dollar_jax import compile_effort
    from dollar_jax.config import validate
    from dollar_jax.train import loop

    assert compile_effort.step_options("light") == {"xla_backend_optimization_level": 0}
    assert compile_effort.step_options("full") is None
    assert compile_effort.step_options("light", platform="tpu") is None  # a TPU plan compiled on a CPU host
    seen = []
    real = loop.jit_train_step
    monkeypatch.setattr(loop, "jit_train_step", lambda *a, **k: seen.append(k.get("compiler_options")) or real(*a, **k))
    runs = {}
    for setting in ("full", "light"):
        config = toy_config(total=4, every=4)
        config.step_compile = setting
        runs[setting] = _params(train(toy_job(config), config, str(tmp_path / setting)))
    assert seen == [None, {"xla_backend_optimization_level": 0}]
    for a, b in zip(runs["light"], runs["full"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    config.step_compile = "fast"
    with pytest.raises(ValueError, match="config.step_compile must be one of .'full', 'light'., got 'fast'"):
        validate(config)
    with pytest.raises(ValueError, match="config.step_compile"):
        compile_effort.step_options("fast")


def test_step_time_data_wait_and_profiler_window(tmp_path):
    config = toy_config(total=6, every=6)
    config.profile.update(dict(start_step=3, num_steps=2))
    train(toy_job(config), config, str(tmp_path / "run"))
    rows = [r for r in read_metrics(str(tmp_path / "run")) if "time_step_s" in r]
    # Every logged step after the first (compilation) has a wall time per step and the host's data wait.
    assert [r["step"] for r in rows] == list(range(2, 7))
    assert all(r["time_step_s"] > 0 and r["time_data_wait_s"] >= 0 for r in rows)
    traces = [f for _, _, files in os.walk(tmp_path / "run" / "profile") for f in files if f.endswith(".xplane.pb")]
    assert traces, "no jax.profiler trace written for steps 3-4"
    bad = toy_config(total=2)
    bad.profile.update(dict(start_step=0, num_steps=1))
    with pytest.raises(ValueError, match="config.profile"):
        train(toy_job(bad), bad, str(tmp_path / "bad"))


def test_sigterm_saves_the_step_in_progress_and_resume_is_exact(tmp_path):
    """In-process: SIGTERM arrives in step 7's host callback -> checkpoint 9, Preempted; the restart equals an unbroken run.

    The job's host state (a per-step NumPy counter, like the reward labeller's window) comes back too."""
    import signal

    import ml_dtypes

    from dollar_jax.train.preemption import Preempted

    config = toy_config(total=12, every=100)
    reference = train(toy_job(config), config, str(tmp_path / "ref"))

    def with_host(job, sigterm_at=None):
        seen = {"steps": np.zeros(12, np.int32), "mark": np.zeros((2, 3), ml_dtypes.bfloat16)}

        def after_step(done, outputs, raw):
            seen["steps"][done - 1] = done
            if done == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)  # handled between steps: step 7 completes and is saved

        def restore(host):
            assert host["mark"].dtype == ml_dtypes.bfloat16
            seen.update(host)

        job.after_step, job.host_state, job.restore_host_state = after_step, lambda: dict(seen), restore
        return job, seen

    previous = signal.getsignal(signal.SIGTERM)
    job, _ = with_host(toy_job(config), sigterm_at=7)
    # after_step(7) runs once step 7 is known finite, i.e. while step 8 drains; the loop checks for the signal
    # after each step, before draining, so the first step that sees it and is saved is 9.
    with pytest.raises(Preempted, match="step 9"):
        train(job, config, str(tmp_path / "run"))
    assert signal.getsignal(signal.SIGTERM) is previous  # handed back after training
    assert RunCheckpointer(str(tmp_path / "run" / "checkpoints")).steps() == [9]
    job, seen = with_host(toy_job(config))
    resumed = train(job, config, str(tmp_path / "run"))
    assert seen["steps"].tolist() == list(range(1, 13))  # 1-9 restored from the checkpoint, 10-12 run again
    np.testing.assert_array_equal(_params(resumed), _params(reference))
    ref_rows = [r["loss"] for r in read_metrics(str(tmp_path / "ref")) if "loss" in r]
    assert [r["loss"] for r in read_metrics(str(tmp_path / "run")) if "loss" in r] == ref_rows


def test_host_state_from_another_number_of_hosts_is_refused_and_kept(tmp_path):
    import orbax.checkpoint as ocp

    from dollar_jax.checkpoint import CheckpointError

    config = toy_config(total=4, every=4)
    job = toy_job(config)
    job.host_state, job.restore_host_state = (lambda: {"x": np.ones(3, np.float32)}), (lambda host: None)
    train(job, config, str(tmp_path))
    host = tmp_path / "checkpoints" / "4" / "host"
    shape = ocp.StandardCheckpointer().metadata(str(host)).item_metadata.tree["x"].shape
    assert shape == (1, 3)  # [process, ...]: each host's row
    # Pretend 3 hosts saved it: a resume on 1 host must stop with the reason, leaving the checkpoint in place.
    shutil.rmtree(host)
    writer = ocp.StandardCheckpointer()
    writer.save(str(host), {"x": np.ones((3, 3), np.float32)})
    writer.wait_until_finished()
    longer = toy_config(total=6, every=6)
    job = toy_job(longer)
    job.host_state, job.restore_host_state = (lambda: {"x": np.ones(3, np.float32)}), (lambda host: None)
    with pytest.raises(CheckpointError, match="host state of 3 processes; this run has 1"):
        train(job, longer, str(tmp_path))
    assert RunCheckpointer(str(tmp_path / "checkpoints")).steps() == [4]
