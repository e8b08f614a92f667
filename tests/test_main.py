"""The command line: config files, overrides, and errors before anything compiles."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(__file__))


def _main(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "dollar_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_mistyped_override_fails_before_any_work(tmp_path):
    out = _main("--config=configs/world_teacher.py:quick", f"--workdir={tmp_path}", "--config.teacher.optim.learnig_rate=1")
    assert out.returncode != 0
    assert "learnig_rate" in out.stderr
    assert not (tmp_path / "data").exists()


def test_wrongly_typed_override_fails(tmp_path):
    out = _main("--config=configs/world_teacher.py:quick", f"--workdir={tmp_path}", "--config.teacher.steps=lots")
    assert out.returncode != 0 and "steps" in out.stderr


def test_unknown_config_variant_fails(tmp_path):
    out = _main("--config=configs/world_teacher.py:huge", f"--workdir={tmp_path}")
    assert out.returncode != 0 and "Unknown variant 'huge'" in out.stderr


def test_invalid_value_is_named(tmp_path):
    out = _main("--config=configs/world_teacher.py:quick", f"--workdir={tmp_path}", "--config.nan_policy=ignore")
    assert out.returncode != 0 and "nan_policy" in out.stderr


def test_object_store_workdir_is_never_a_local_folder(tmp_path):
    # gs:// workdirs are opened through epath (tests/test_gcs.py runs them against an emulator); here: a bad
    # override still fails first, and nothing named "gs:" appears in the working directory.
    out = subprocess.run([sys.executable, "-m", "dollar_jax.main", f"--config={ROOT}/configs/world_teacher.py:quick",
                          "--workdir=gs://bucket/run", "--config.nan_policy=ignore"], cwd=tmp_path,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "nan_policy" in out.stderr
    assert not (tmp_path / "gs:").exists()
