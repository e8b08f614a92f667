"""Test set-up: 8 virtual CPU devices (for sharding tests) and tiny reference models built on the fly."""

import os

from cpu_flags import COMMON, cpu_test_env, requested_devices

# 8 virtual devices unless the caller chose a count; the caller's other flags, ours, and the pool size always.
_flags = os.environ.get("XLA_FLAGS", "")
_env = cpu_test_env(requested_devices(_flags, 8), f"{_flags} {COMMON}")
os.environ.setdefault("JAX_PLATFORMS", _env.pop("JAX_PLATFORMS"))  # the GPU machine runs its kernel tests on cuda
os.environ.update(_env)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Huge pages for XLA:CPU's step buffers in the xdist workers and every subprocess (dollar_jax/host_allocator.py);
# glibc reads it at process start, so this process itself (the xdist controller) runs without it.
from dollar_jax.host_allocator import with_huge_pages  # noqa: E402

os.environ.update(with_huge_pages(os.environ))

import shutil  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config):
    """One persistent XLA compilation cache for the whole run, shared by the xdist workers (in-process only:
    subprocess tests choose their own). Tests that train twice on one config (every resume test, the demo's
    rerun) and modules that build the same step load the compiled program instead of compiling it again;
    compiling is most of the suite's time on 2 cores. The controller makes the folder (workers inherit its
    environment) and removes it when the run ends."""
    import tempfile

    from dollar_jax import compilation_cache

    if "DOLLAR_TEST_XLA_CACHE" not in os.environ:
        os.environ["DOLLAR_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="dollar-jax-test-xla-cache-")
        config._dollar_owns_xla_cache = True
    compilation_cache.enable(os.environ["DOLLAR_TEST_XLA_CACHE"], workdir="")  # the trainer's own settings


def pytest_unconfigure(config):
    if getattr(config, "_dollar_owns_xla_cache", False):
        shutil.rmtree(os.environ.pop("DOLLAR_TEST_XLA_CACHE"), ignore_errors=True)


def _build_world(workdir: str):
    from world_fixture import world_test_config

    from dollar_jax.main import run_job

    config = world_test_config(workdir)
    run_job(config, workdir)
    return config


def _built_once(tmp_path_factory, worker_id, name: str, build) -> str:
    """A folder that `build(path)` makes once per test run, and this worker's own copy of it. Under pytest-xdist
    the first worker that needs it builds it (the others wait on a file lock) and every worker then works on its
    own copy, so tests that write into it never race each other."""
    if worker_id == "master":  # no xdist
        path = str(tmp_path_factory.mktemp(name))
        build(path)
        return path
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # one folder per test run, shared by its workers
    built = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (shared / f"{name}.built").exists():
            build(str(built))
            (shared / f"{name}.built").write_text("")
    path = str(tmp_path_factory.mktemp(name))
    shutil.copytree(built, path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.lock"))
    return path


@pytest.fixture(scope="session")
def world_run(tmp_path_factory, worker_id):
    """(config, workdir) of an embedded world trained through the teacher, built once per test run."""
    from world_fixture import world_test_config

    workdir = _built_once(tmp_path_factory, worker_id, "world", _build_world)
    return world_test_config(workdir), workdir


@pytest.fixture(scope="session")
def distill_run(world_run, tmp_path_factory, worker_id):
    """(config, workdir, run) of test_distill.py's 6-step distillation on the session's world (distill_config),
    trained once per test run: the 8-device comparison, the exact resume, the health metrics and the zero-weight
    reward test read it instead of each training it again. `run` is this worker's copy, shared by its tests: a
    test that writes into a run copies it first."""
    from test_distill import distill_config

    from dollar_jax.jobs import distill as distill_job
    from dollar_jax.train.loop import train

    config, workdir = world_run
    c = distill_config(config)
    run = _built_once(tmp_path_factory, worker_id, "distill_run",
                      lambda path: train(distill_job.make_job(c, workdir), c, path))
    return c, workdir, run


def pytest_collection_modifyitems(config, items):
    """Tests that need the trained world run first (stable order otherwise). With `-n 2 --dist worksteal` one
    worker starts on them, building the world, while the other runs the rest from the far end; whoever
    finishes first steals from the other's queue."""
    items.sort(key=lambda item: "world_run" not in getattr(item, "fixturenames", ()))
