"""Test set-up: 8 virtual CPU devices (for sharding tests) and tiny reference models built on the fly."""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def world_run(tmp_path_factory):
    """(config, workdir) of an embedded world trained through the teacher, built once per session."""
    from world_fixture import world_test_config

    from dollar_jax.main import run_job

    workdir = str(tmp_path_factory.mktemp("world"))
    config = world_test_config(workdir)
    run_job(config, workdir)
    return config, workdir
