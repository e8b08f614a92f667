"""The shipped Wan2.1 configs on any slice size: batch resolved from the mesh, fewer clips than devices through
the context axis, tokens padded for the context axis (no replication), and replication never silent.

16-device checks run in one subprocess (conftest fixes this process at 8 virtual devices); see slice_checks.py.
Every check that compiles the whole distillation step is marked slow (each compile is tens of seconds on CPU).
"""

import json
import logging
import os
import subprocess
import sys

import jax
import pytest

from dollar_jax.config import validate
from dollar_jax.data.pipeline import resolve_global_batch, with_global_batch
from dollar_jax.parallel import make_mesh
from dollar_jax.parallel import sharding
from dollar_jax.parallel.sharding import fitted_spec
from cpu_flags import cpu_test_env
from slice_checks import ROOT, distill_step, wan_config

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")


def mesh(**sizes):
    return {"data": 1, "fsdp": 1, "context": 1, "tensor": 1, **sizes}


def test_global_batch_follows_the_mesh():
    assert resolve_global_batch(-1, 1, mesh(fsdp=8)) == 8
    assert resolve_global_batch(-1, 2, mesh(data=2, fsdp=16)) == 64
    assert resolve_global_batch(-1, 1, mesh(fsdp=2, context=4)) == 2  # context and tensor never split the batch
    assert resolve_global_batch(2, 1, mesh(fsdp=2, context=4)) == 2  # fewer clips than devices
    with pytest.raises(ValueError) as err:
        resolve_global_batch(2, 1, mesh(fsdp=8))
    message = str(err.value)
    assert "batch_size=2" in message and "multiple of 8" in message and "batch_size=-1" in message
    assert "--config.mesh.fsdp=2 --config.mesh.context=4" in message  # the mesh that runs batch 2 on 8 devices
    with pytest.raises(ValueError, match="batch_per_shard"):
        resolve_global_batch(-1, 0, mesh(fsdp=8))
    with pytest.raises(ValueError, match="positive or -1"):
        resolve_global_batch(-3, 1, mesh(fsdp=8))


def test_shipped_config_validates_and_resolves_per_mesh():
    config = wan_config("1.3b")
    assert config.distill.batch_size == -1 and config.model.attention == "auto"
    validate(config)
    assert with_global_batch(config, "distill", mesh(fsdp=16)).distill.batch_size == 16
    assert config.distill.batch_size == -1  # the caller's config is left as it was
    config.distill.update(dict(batch_size=-1, batch_per_shard=0))
    with pytest.raises(ValueError, match="distill.batch_size"):
        validate(config)
    config = wan_config("1.3b")
    config.distill.ema_memory = "hbm"
    with pytest.raises(ValueError, match=r"distill.ema_memory must be one of \('device', 'host'\), got 'hbm'"):
        validate(config)
    config = wan_config("1.3b")
    config.distill.update(dict(optim_memory="host", nan_guard="state"))
    with pytest.raises(ValueError, match="optim_memory='host' needs config.distill.nan_guard='update'"):
        validate(config)


@needs_8
def test_replication_is_logged_once_with_its_cost(caplog):
    m = make_mesh({"fsdp": 2, "context": 4})
    sharding._warned.clear()  # warnings are once per process: forget earlier tests' ones
    with caplog.at_level(logging.WARNING, logger="dollar_jax.parallel.sharding"):
        spec = fitted_spec((3, 30, 8), ("act_batch", "act_length", "act_embed"), m)
        fitted_spec((3, 30, 8), ("act_batch", "act_length", "act_embed"), m)
        assert tuple(spec) == (None, None, None)
        assert tuple(fitted_spec((4, 32, 8), ("act_batch", "act_length", "act_embed"), m)) == ("fsdp", "context", None)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # once per logical name, size and mesh
    assert any("act_length 30 not divisible by context=4: replicated 4x" in m for m in messages), messages
    assert any("act_batch 3 not divisible by fsdp=2: replicated 2x" in m for m in messages), messages


@pytest.mark.slow
@needs_8
def test_local_config_one_step_on_8_devices():
    # configs/wan21_distill.py:local as shipped (batch -1, fsdp=-1, attention auto): one real step, compiled
    # through XLA's partitioner (fewer clips than devices, through the context axis, is lowered on 16 below).
    out = distill_step("local", run=True)
    assert out["mesh"]["fsdp"] == 8 and out["batch"] == 8
    assert out["step"] == 1 and out["metrics"]["finite"] == 1.0, out
    assert not out["replicated"], out["replicated"]


@needs_8
def test_shipped_configs_resolve_on_one_and_eight_devices():
    """The shipped steps lowered (shardings fixed, nothing compiled): `local` on one device takes batch 1 and
    everything whole; 1.3B on 8 devices is split, not replicated. The step that runs is compiled above."""
    one = distill_step("local", run=False, compile=False, devices=jax.devices()[:1])
    assert one["mesh"]["fsdp"] == 1 and one["batch"] == 1 and not one["replicated"], one
    assert one["argument_bytes"] >= one["state_bytes"]  # one device holds all of it (and the batch)
    big = distill_step("1.3b", run=False, compile=False)
    assert big["mesh"]["fsdp"] == 8 and big["batch"] == 8 and not big["replicated"], big
    assert big["argument_bytes"] < big["state_bytes"] / 4


@pytest.mark.slow
def test_sixteen_devices():
    """Every 16-device check in one subprocess (JAX starts once; conftest fixes this process at 8 devices).
    The distillation steps are lowered, not compiled: their shardings are what is checked here, and the same
    step is compiled on 8 devices above."""
    checks = ("padded_context_16", "local_sharding", "local_fewer_clips", "1.3b_sharding")
    env = dict(os.environ, **cpu_test_env(16))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "slice_checks.py"), *checks], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=1800, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    out = {x["check"]: x for x in map(json.loads, (line for line in r.stdout.splitlines() if line.startswith("{")))}
    assert list(out) == list(checks) and all(x["devices"] == 16 for x in out.values())

    pad = out["padded_context_16"]
    # 18 tokens on context=16: padded to 32 (2 per device) instead of replicated 16x, same loss and gradients.
    assert (pad["tokens"], pad["padded_tokens"]) == (18, 32)
    assert pad["loss"] == pytest.approx(pad["ref_loss"], rel=1e-5)
    assert pad["grad_rel_err"] < 1e-3, pad
    assert not pad["replicated"], pad["replicated"]

    local = out["local_sharding"]  # wan21_distill.py:local as shipped: fsdp=16, batch resolved to 16
    assert local["mesh"]["fsdp"] == 16 and local["batch"] == 16 and not local["replicated"]
    assert local["argument_bytes"] < local["state_bytes"] / 4  # the state is split, not replicated

    fewer = out["local_fewer_clips"]  # batch 2 on 16 devices: fsdp=2 x context=8
    assert fewer["batch"] == 2 and fewer["mesh"]["context"] == 8 and not fewer["replicated"]
    assert fewer["argument_bytes"] < local["state_bytes"] / 4  # parameters split over (fsdp, context) too

    big = out["1.3b_sharding"]  # wan21_distill.py:1.3b as shipped: fsdp=16, batch 16, 81 frames 480p
    assert big["mesh"]["fsdp"] == 16 and big["batch"] == 16 and not big["replicated"], big
    assert big["argument_bytes"] < big["state_bytes"] / 8
