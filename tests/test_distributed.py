"""Multi-host start: which environment starts jax.distributed, with what, and the errors for half-set ones.

Every case goes through maybe_initialize, the function main.py calls, with jax.distributed.initialize
replaced by a recorder; the environment and the TPU probes (libtpu installed, /dev/accel*) are injected.
"""

import jax
import pytest

from dollar_jax.parallel.distributed import DistributedConfigError, maybe_initialize


@pytest.fixture
def calls(monkeypatch):
    recorded = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    return recorded


def start(env, mode="auto", libtpu=False, accel=()):
    return maybe_initialize(mode, env=env, has_libtpu=lambda: libtpu, tpu_devices=lambda: list(accel))


def test_cloud_tpu_vm_is_detected_from_libtpu_and_its_devices(calls):
    assert start({}, libtpu=True, accel=["/dev/accel0"])  # v4/v5p
    assert start({}, libtpu=True, accel=["/dev/vfio/0"])  # v5e/v6e
    assert calls == [{}, {}]  # initialize() finds the workers through the metadata server


def test_no_tpu_without_both_libtpu_and_chips(calls):
    assert not start({}, libtpu=True, accel=[])  # libtpu pip-installed on a CPU box
    assert not start({}, libtpu=False, accel=["/dev/accel0"])
    assert not start({"JAX_PLATFORMS": "cpu"}, libtpu=True, accel=["/dev/accel0"])  # tools on a TPU worker
    assert calls == []


def test_gke_tpu_pod(calls):
    assert start({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"})
    assert not start({"TPU_WORKER_HOSTNAMES": "w0"})  # a single host
    assert calls == [{}]


def test_slurm_with_several_tasks(calls):
    assert start({"SLURM_JOB_ID": "42", "SLURM_NTASKS": "16"})
    assert not start({"SLURM_JOB_ID": "42", "SLURM_NTASKS": "1"})
    assert calls == [{}]


def test_explicit_coordinator(calls):
    env = {"DOLLAR_COORDINATOR": "10.0.0.2:1234", "DOLLAR_NUM_PROCESSES": "2", "DOLLAR_PROCESS_ID": "1"}
    assert start(env, libtpu=True, accel=["/dev/accel0"])  # the explicit triple wins over any detection
    assert calls == [dict(coordinator_address="10.0.0.2:1234", num_processes=2, process_id=1)]


@pytest.mark.parametrize("env, message", [
    ({"DOLLAR_COORDINATOR": "h:1"}, "DOLLAR_NUM_PROCESSES, DOLLAR_PROCESS_ID missing"),
    ({"DOLLAR_COORDINATOR": "h:1", "DOLLAR_NUM_PROCESSES": "2"}, "DOLLAR_PROCESS_ID missing"),
    ({"DOLLAR_PROCESS_ID": "0"}, "DOLLAR_COORDINATOR, DOLLAR_NUM_PROCESSES missing"),
    ({"DOLLAR_COORDINATOR": "h", "DOLLAR_NUM_PROCESSES": "2", "DOLLAR_PROCESS_ID": "0"}, "expected host:port"),
    ({"DOLLAR_COORDINATOR": "h:1", "DOLLAR_NUM_PROCESSES": "two", "DOLLAR_PROCESS_ID": "0"}, "not an integer"),
    ({"DOLLAR_COORDINATOR": "h:1", "DOLLAR_NUM_PROCESSES": "2", "DOLLAR_PROCESS_ID": "2"}, "must be < "),
    ({"DOLLAR_DISTRIBUTED": "maybe"}, "must be one of"),
])
def test_half_configured_clusters_name_what_is_missing(calls, env, message):
    with pytest.raises(DistributedConfigError, match=message):
        start(env)
    assert calls == []


def test_switch_forces_or_skips(calls):
    tpu = dict(libtpu=True, accel=["/dev/accel0"])
    assert not start({}, mode="off", **tpu)
    assert not start({"DOLLAR_DISTRIBUTED": "off"}, mode="on", **tpu)  # the environment overrides the config
    assert not start({})
    assert start({}, mode="on")  # nothing detected, forced: JAX's own cluster detection
    assert start({"DOLLAR_DISTRIBUTED": "on"})
    assert calls == [{}, {}]


def test_initialize_failure_names_the_environment_and_the_way_out(monkeypatch):
    def refuse(**kw):
        raise RuntimeError("metadata server unreachable")

    monkeypatch.setattr(jax.distributed, "initialize", refuse)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="cloud_tpu cluster .*metadata server unreachable.*DOLLAR_DISTRIBUTED=off"):
        start({}, libtpu=True, accel=["/dev/accel0"])



def test_default_probes_read_the_filesystem_and_installed_packages(calls, monkeypatch):
    import glob
    import importlib.util

    installed = {"libtpu"}
    devices = {"/dev/vfio/[0-9]*": ["/dev/vfio/0"]}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in installed else None)
    monkeypatch.setattr(glob, "glob", lambda pattern: devices.get(pattern, []))
    assert maybe_initialize("auto", env={})  # the probes main.py uses, on a (mocked) v6e worker
    installed.clear()
    assert not maybe_initialize("auto", env={})
    assert calls == [{}]
