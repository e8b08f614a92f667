"""The command line: config files, overrides, and errors before anything compiles."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(__file__))


def _main(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "dollar_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _one_error_line(stderr: str) -> str:
    """Errors end in one `error:` line and no traceback (that is behind --verbose)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_mistyped_override_fails_before_any_work(tmp_path):
    out = _main("--config=configs/world_teacher.py:quick", f"--workdir={tmp_path}", "--config.teacher.optim.learnig_rate=1")
    assert out.returncode != 0
    line = _one_error_line(out.stderr)
    assert "--config.teacher.optim.learnig_rate" in line and 'Did you mean "learning_rate"' in line
    assert not (tmp_path / "data").exists()


def test_wrongly_typed_override_fails(tmp_path):
    out = _main("--config=configs/world_teacher.py:quick", f"--workdir={tmp_path}", "--config.teacher.steps=lots")
    assert out.returncode != 0 and "steps" in out.stderr


def test_unknown_config_variant_fails(tmp_path):
    out = _main("--config=configs/world_teacher.py:huge", f"--workdir={tmp_path}")
    assert out.returncode != 0 and "Unknown variant 'huge'" in _one_error_line(out.stderr)


def test_invalid_value_is_named(tmp_path):
    out = _main("--config=configs/world_teacher.py:quick", f"--workdir={tmp_path}", "--config.nan_policy=ignore")
    assert out.returncode != 0 and "nan_policy" in _one_error_line(out.stderr)


def test_missing_teacher_folder_is_one_line(tmp_path):
    out = _main("--config=configs/wan21_distill.py:local", f"--workdir={tmp_path}",
                f"--config.distill.teacher={tmp_path}/no_such_teacher", f"--config.data.dir={tmp_path}/data")
    assert out.returncode == 1
    line = _one_error_line(out.stderr)
    assert "no_such_teacher" in line and "does not exist" in line


def test_verbose_adds_the_traceback_and_listed_problems_stay_readable():
    import io

    from dollar_jax.cli_errors import MAX_DETAIL_LINES, report

    try:
        raise ValueError("Checkpoint /x does not fit the model:\n" + "\n".join(f"  missing: k{i}" for i in range(30)))
    except ValueError as e:
        quiet, loud = io.StringIO(), io.StringIO()
        assert report(e, False, quiet) == 1 and report(e, True, loud) == 1
    lines = quiet.getvalue().splitlines()
    assert lines[0] == "error: Checkpoint /x does not fit the model:" and lines[1] == "  missing: k0"
    assert len(lines) == 2 + MAX_DETAIL_LINES and lines[-1] == "  ... and 10 more"
    assert "Traceback" not in quiet.getvalue() and "Traceback" in loud.getvalue()
    try:
        raise TypeError("a bug")
    except TypeError as e:
        quiet = io.StringIO()
        report(e, False, quiet)
    assert quiet.getvalue() == "error: TypeError: a bug\n"  # not a user error: its type is named


def test_missing_dataset_and_misspelled_data_dir_are_loud(tmp_path, capsys):
    from dollar_jax.cli_errors import error_lines
    from dollar_jax.config import base_config, embedded_world
    from dollar_jax.data import arrays_dataset
    from dollar_jax.data.latents import check_dataset_fits
    from dollar_jax.jobs import world_data
    from dollar_jax.models import preset

    c = embedded_world(base_config(), quick=True)
    c.data.dir = str(tmp_path / "dta")
    with pytest.raises(arrays_dataset.DatasetError) as err:
        check_dataset_fits(c, c.data.dir, preset("tiny"))
    (line,) = error_lines(err.value)
    assert line.startswith("error: No dataset 'world_latents'") and "config.data.dir" in line
    c.world.update(dict(num_train=2, num_val=1))
    world_data.build_videos(c, str(tmp_path))
    warning = capsys.readouterr().err
    assert "WARNING: config.data.dir=" in warning and "building a new one there" in warning
    world_data.build_videos(c, str(tmp_path))  # now it exists: quiet
    assert "WARNING" not in capsys.readouterr().err


def test_object_store_workdir_is_never_a_local_folder(tmp_path):
    # gs:// workdirs are opened through epath (tests/test_gcs.py runs them against an emulator); here: a bad
    # override still fails first, and nothing named "gs:" appears in the working directory.
    out = subprocess.run([sys.executable, "-m", "dollar_jax.main", f"--config={ROOT}/configs/world_teacher.py:quick",
                          "--workdir=gs://bucket/run", "--config.nan_policy=ignore"], cwd=tmp_path,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "nan_policy" in out.stderr
    assert not (tmp_path / "gs:").exists()


def test_half_configured_cluster_names_the_missing_setting(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOLLAR_")}
    out = subprocess.run([sys.executable, "-m", "dollar_jax.main", "--config=configs/world_teacher.py:quick",
                          f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(env, JAX_PLATFORMS="cpu", DOLLAR_COORDINATOR="10.0.0.2:1234"))
    assert out.returncode != 0
    assert "DOLLAR_NUM_PROCESSES, DOLLAR_PROCESS_ID missing" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "data").exists()


def test_without_tensorboard_the_training_path_never_imports_tensorflow(tmp_path):
    # clu's writers import TensorFlow (7 s of start-up on 2 cores); config.tensorboard=False must not pay it.
    probe = ("import sys, dollar_jax.main, dollar_jax.jobs.teacher, dollar_jax.jobs.distill, dollar_jax.train.loop\n"
             "from dollar_jax.train.metrics import make_writer\n"
             f"w = make_writer({str(tmp_path)!r}, tensorboard=False)\n"
             "w.write_scalars(1, {'loss': 1.0}); w.flush(); w.close()\n"
             "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
