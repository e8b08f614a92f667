"""gs:// workdirs, model folders and datasets, against a local GCS emulator (tests/gcs_emulator.py)."""

import os

import jax
import numpy as np
import pytest
from etils import epath

from dollar_jax import storage
from gcs_emulator import GcsEmulator


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    emulator = GcsEmulator().start()
    old_cache = os.environ.get(storage.CACHE_ENV)
    os.environ[storage.CACHE_ENV] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield emulator.create_bucket("dollar-test")
    finally:
        emulator.stop()
        if old_cache is None:
            os.environ.pop(storage.CACHE_ENV, None)
        else:
            os.environ[storage.CACHE_ENV] = old_cache


def test_storage_helpers_on_the_emulator(bucket, tmp_path):
    root = f"{bucket}/helpers"
    assert storage.resolve(root) == root and storage.join(root, "a", "b.txt") == f"{root}/a/b.txt"
    storage.write_json(f"{root}/src/sub/x.json", {"v": 1})
    storage.write_text(f"{root}/src/marker", "done")
    assert storage.files_under(f"{root}/src") == ["marker", "sub/x.json"]
    storage.move_tree(f"{root}/src", f"{root}/moved")  # no directory rename on the store: copy + delete
    assert not storage.exists(f"{root}/src") and storage.read_json(f"{root}/moved/sub/x.json") == {"v": 1}
    with storage.local_file(f"{root}/up/file.bin") as local:
        assert not storage.is_remote(local)
        with open(local, "wb") as f:
            f.write(b"\x00\x01")
    assert epath.Path(f"{root}/up/file.bin").read_bytes() == b"\x00\x01"
    from dollar_jax.eval import video_io

    video_io.write_gif(f"{root}/clip.gif", np.zeros((2, 4, 4, 3), np.uint8))  # Pillow writes locally, then uploads
    assert epath.Path(f"{root}/clip.gif").read_bytes()[:6] == b"GIF89a"
    staged = storage.stage_local(f"{root}/moved", marker="marker")
    assert open(os.path.join(staged, "sub", "x.json")).read() == '{"v": 1}'
    with pytest.raises(FileNotFoundError, match="no missing_marker"):
        storage.stage_local(f"{root}/moved", marker="missing_marker")


def test_model_folder_round_trip_and_partial_export(bucket):
    from dollar_jax.checkpoint import (CheckpointError, model_folder_exists, read_model_folder_config,
                                       restore_pytree, stored_shapes, write_model_folder)

    folder = f"{bucket}/models/m"
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": {"c": np.ones(4, np.float32)}}
    assert write_model_folder(folder, {"dit": {"x": 1}}, params) == folder
    assert model_folder_exists(folder) and read_model_folder_config(folder, "dit")[0] == {"x": 1}
    assert stored_shapes(f"{folder}/params") == {"b/c": ((4,), np.dtype("float32")), "w": ((2, 3), np.dtype("float32"))}
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    np.testing.assert_array_equal(restore_pytree(f"{folder}/params", target)["w"], params["w"])
    # Re-export over it (no rename on the store): the new weights replace the old ones.
    write_model_folder(folder, {"dit": {"x": 2}}, jax.tree.map(lambda a: a + 1, params))
    np.testing.assert_array_equal(restore_pytree(f"{folder}/params", target)["w"], params["w"] + 1)
    # A folder whose export died before config.json (the marker, written last) does not count.
    epath.Path(f"{folder}/config.json").unlink()
    assert not model_folder_exists(folder)
    with pytest.raises(CheckpointError, match="has no config.json"):
        read_model_folder_config(folder, "dit")
    with pytest.raises(CheckpointError, match="No checkpoint at gs://"):
        stored_shapes(f"{bucket}/models/absent/params")


def test_dataset_written_to_and_read_from_the_store(bucket):
    from dollar_jax.data import arrays_dataset

    data_dir = f"{bucket}/datasets"
    spec = {"x": ("tensor", (2, 3), "float32"), "caption": ("text",)}
    examples = lambda: ({"x": np.full((2, 3), i, np.float32), "caption": f"c{i}"} for i in range(5))
    arrays_dataset.write(data_dir, "toy", spec, {"train": examples})
    assert arrays_dataset.exists(data_dir, "toy")
    names = storage.files_under(arrays_dataset.dataset_path(data_dir, "toy"))
    assert "dataset_info.json" in names and any(".array_record" in n for n in names)
    assert not any("incomplete" in n for n in names)
    assert arrays_dataset.feature_shapes(data_dir, "toy")["x"] == ("tensor", (2, 3), "float32")
    source = arrays_dataset.open_split(data_dir, "toy", "train")
    assert len(source) == 5 and sorted(float(source[i]["x"][0, 0]) for i in range(5)) == [0, 1, 2, 3, 4]
    staged = os.path.join(os.environ[storage.CACHE_ENV], "gs", "dollar-test", "datasets", "toy", "1.0.0")
    assert os.path.exists(os.path.join(staged, "dataset_info.json"))
    with pytest.raises(arrays_dataset.DatasetError, match="field 'x'"):
        arrays_dataset.check_features(data_dir, "toy", {"x": ("tensor", (3, 3), "float32")})


@pytest.mark.slow  # two toy trainings, each compiled: 85 s at load 37 on 2 cores
def test_training_resumes_on_the_store_and_sets_a_corrupt_checkpoint_aside(bucket, caplog):
    from test_train_loop import toy_config, toy_job

    from dollar_jax.train.loop import train
    from dollar_jax.train.metrics import read_metrics

    def config_of(total):
        c = toy_config(total=total, every=2)
        c.log_every_steps = 2
        return c

    run = f"{bucket}/toy_run"
    train(toy_job(config_of(4)), config_of(4), run)
    ckdir = epath.Path(f"{run}/checkpoints")
    assert sorted(p.name for p in ckdir.iterdir()) == ["2", "4"]
    assert (ckdir / "4" / "commit_success.txt").exists()  # Orbax's object-store commit: a marker, no rename
    # Corrupt the newest checkpoint: drop its array data (what a half-written upload would leave).
    for rel in storage.files_under(ckdir / "4" / "state"):
        if "ocdbt" in rel or rel.startswith("d/"):
            (ckdir / "4" / "state" / rel).unlink()
    with caplog.at_level("INFO", logger="dollar_jax"):
        train(toy_job(config_of(6)), config_of(6), run)
    assert "resumed from step 2" in caplog.text
    names = sorted(p.name for p in ckdir.iterdir())
    assert any(n.startswith("4.corrupt-") for n in names) and "6" in names, names  # set aside, not deleted
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [2, 4, 6]
    assert any(p.name.startswith("events.out.tfevents") for p in epath.Path(run).iterdir())


@pytest.mark.slow  # three programs compiled (autoencoder, teacher, distillation); 152 s in the 2026-11-23 suite
def test_world_pipeline_teacher_and_distillation_on_the_store(bucket, caplog):
    """Workdir, datasets, teacher folder and student on gs://: run, rerun (every stage reused), resume."""
    from dollar_jax.checkpoint import load_dit, read_model_folder_config
    from dollar_jax.config import base_config, embedded_world
    from dollar_jax.main import run_job
    from dollar_jax.train.metrics import read_metrics

    workdir = f"{bucket}/world"
    c = embedded_world(base_config(), quick=True)
    c.world.update(dict(num_train=32, num_val=8))
    c.autoencoder.update(dict(steps=2, batch_size=8))
    c.teacher.update(dict(steps=2, batch_size=4))
    c.model.num_layers = 1
    # The smallest distillation graph (compilation dominates here): a 1-step student, one CD teacher step.
    c.distill.update(dict(steps=4, batch_size=2, fake_updates=1, student_timesteps=(999.0,), eval_steps=(1,),
                          cd_steps=1))
    c.mesh.update(dict(data=1, fsdp=1, context=1, tensor=1))
    c.checkpoint.every_steps, c.log_every_steps = 2, 1
    c.step_compile = "light"
    c.job = "teacher"
    run_job(c, workdir)
    teacher = f"{workdir}/teacher"
    assert read_model_folder_config(teacher, "source")[0]["steps"] == 2
    assert [r["step"] for r in read_metrics(f"{workdir}/runs/teacher") if "loss" in r] == [1, 2]
    assert any(p.name.startswith("events.out.tfevents") for p in epath.Path(f"{workdir}/runs/teacher").iterdir())
    assert storage.exists(f"{workdir}/data/{c.data.latents}/null_text.npy")
    # Distillation from the teacher folder on the store; then, as if it had died after the step-2 checkpoint
    # (step 4's checkpoint and the export lost), again: it must resume, not restart (one program, compiled once).
    c.job, c.distill.teacher = "distill", teacher
    run_job(c, workdir)
    student = f"{workdir}/{c.distill.name}"
    storage.rmtree(student)
    storage.rmtree(f"{workdir}/runs/{c.distill.name}/checkpoints/4")
    with caplog.at_level("INFO", logger="dollar_jax"):
        run_job(c, workdir)
    assert "resumed from step 2" in caplog.text
    assert read_model_folder_config(student, "source")[0]["steps"] == 4
    assert [r["step"] for r in read_metrics(f"{workdir}/runs/{c.distill.name}") if "loss_vsd" in r] == [1, 2, 3, 4]
    assert load_dit(student).config == load_dit(teacher).config
