"""The embedded world end to end: dataset, autoencoder, latents, teacher (shared session fixture)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cpu_flags import cpu_test_env

from dollar_jax.data import arrays_dataset, world
from dollar_jax.data.pipeline import eval_batches
from dollar_jax.checkpoint import load_autoencoder
from dollar_jax.jobs import autoencoder as autoencoder_job
from dollar_jax.data.world import world_config
from dollar_jax.paths import Paths

pytestmark = pytest.mark.slow


def test_dataset_reloads_and_labels_match_the_pixels(world_run):
    config, workdir = world_run
    paths, wcfg = Paths.of(config, workdir), world_config(config)
    source = arrays_dataset.open_split(paths.data, config.data.videos, "validation")
    assert len(source) == config.world.num_val
    batch = next(iter(eval_batches(source, 64)))
    assert batch["video"].shape == (64, wcfg.num_frames, wcfg.height, wcfg.width, 3)
    read = world.read_factors_batch(batch["video"], wcfg)
    for factor in ("colour", "direction"):  # read back from pixels, compared with the stored labels
        np.testing.assert_array_equal(read[factor], batch[factor])
    captions = [c.decode() for c in batch["caption"]]
    parsed = [world.parse_caption(c, wcfg) for c in captions]
    assert [p["colour"] for p in parsed] == list(batch["colour"])
    # Rebuilding is skipped (the folder is reused), and a wrong-shape expectation is named.
    with pytest.raises(arrays_dataset.DatasetError, match="field 'video'"):
        arrays_dataset.check_features(paths.data, config.data.videos,
                                      {"video": ("tensor", (16, 32, 32, 3), "uint8")})


def test_autoencoder_reconstructs_validation_clips(world_run):
    config, workdir = world_run
    paths = Paths.of(config, workdir)
    assert autoencoder_job.metrics_of(paths.autoencoder)["validation_psnr_db"] >= 25.0
    ae = load_autoencoder(paths.autoencoder)
    assert autoencoder_job.validation_psnr(ae, config, workdir) >= 25.0
    # Latents handed to diffusion are normalised: mean ~0, std ~1 per channel.
    latents = arrays_dataset.open_split(paths.data, config.data.latents, "train")
    z = np.stack([latents[i]["latents"] for i in range(256)]).reshape(-1, ae.config.latent_channels)
    assert np.all(np.abs(z.mean(0)) < 0.2) and np.all(np.abs(z.std(0) - 1) < 0.2)


def test_teacher_lowers_validation_loss_and_follows_colour(world_run):
    from flax import nnx

    from dollar_jax.checkpoint import load_dit
    from dollar_jax.config import dit_config, schedule_of
    from dollar_jax.eval import world_eval
    from dollar_jax.eval.generate import make_generate, teacher_spec
    from dollar_jax.jobs import teacher as teacher_job
    from dollar_jax.data.text import text_encoder
    from dollar_jax.models.dit import WanDiT
    from dollar_jax.train.state import split_model

    config, workdir = world_run
    paths, wcfg = Paths.of(config, workdir), world_config(config)
    role, init_params = split_model("teacher", WanDiT(dit_config(config), rngs=nnx.Rngs(config.seed)))
    val_loss = teacher_job.validation_loss_fn(config, workdir, role)
    trained = load_dit(paths.teacher)
    trained_params = nnx.to_pure_dict(nnx.state(trained, nnx.Param))
    before, after = val_loss(init_params), val_loss(trained_params)
    assert after < 0.8 * before, (before, after)

    encoder = text_encoder(config)
    factors, _, text = world_eval.prompt_batch(wcfg, encoder, 24, seed=3)
    null = np.broadcast_to(encoder.null(), text.shape)
    spec = teacher_spec(schedule_of(config), 50, 4.5, "uncond_anchor")
    generate = make_generate(role.module, schedule_of(config), config.diffusion.prediction_type, spec)
    shape = arrays_dataset.feature_shapes(paths.data, config.data.latents)["latents"][1]
    noise = jax.random.normal(jax.random.key(0), (24, *shape))
    latents = np.asarray(generate(trained_params, noise, jnp.asarray(text), jnp.asarray(null), jax.random.key(1)))
    videos = world_eval.decode(load_autoencoder(paths.autoencoder), latents)
    scores = world_eval.score(videos, factors, wcfg)
    assert scores["adherence_colour"] >= 0.5, scores  # chance is 1/6


def _run_main(workdir, config_overrides, log):
    cmd = [sys.executable, "-m", "dollar_jax.main", "--config=configs/world_teacher.py:quick", f"--workdir={workdir}"]
    cmd += [f"--config.{k}={v}" for k, v in config_overrides.items()]
    env = dict(os.environ, **cpu_test_env(1))
    return subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(__file__)), env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _losses(workdir):
    with open(os.path.join(workdir, "runs", "teacher", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if "loss" in r}


def test_sigkill_mid_interval_then_resume_is_bit_exact(world_run, tmp_path):
    config, workdir = world_run
    paths = Paths.of(config, workdir)
    shared = {"data.dir": paths.data, "autoencoder.dir": paths.autoencoder, "teacher.steps": 120,
              "checkpoint.every_steps": 40, "log_every_steps": 1, "sampling.every_steps": 0,
              "world.num_train": config.world.num_train, "world.num_val": config.world.num_val,
              "world.held_out_combinations": config.world.held_out_combinations, "mesh.fsdp": 1, "tensorboard": False,
              "compilation_cache": str(tmp_path / "cache")}  # one cache: only the reference run compiles
    with open(tmp_path / "ref.log", "w") as log:
        assert _run_main(tmp_path / "ref", shared, log).wait(timeout=600) == 0
    with open(tmp_path / "run.log", "w") as log:
        proc = _run_main(tmp_path / "run", shared, log)
        metrics = tmp_path / "run" / "runs" / "teacher" / "metrics.jsonl"
        deadline = time.time() + 600
        while time.time() < deadline:  # wait until the run is past the step-80 checkpoint, then kill it hard
            if metrics.exists() and any(json.loads(x).get("step", 0) >= 90 for x in metrics.read_text().splitlines()):
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = max(_losses(tmp_path / "run"))
        assert 80 < killed_at < 120
        assert _run_main(tmp_path / "run", shared, log).wait(timeout=600) == 0
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")
    ref = tmp_path / "ref" / "teacher" / "config.json"
    assert json.loads(ref.read_text())["source"]["steps"] == 120


def _teacher_losses(config, workdir, run_dir, mesh):
    from dollar_jax.jobs import teacher as teacher_job
    from dollar_jax.train.loop import train
    from dollar_jax.train.metrics import read_metrics

    c = config.copy_and_resolve_references()
    c.mesh.update(mesh)
    c.teacher.steps, c.log_every_steps, c.checkpoint.every_steps = 3, 1, 3
    job = teacher_job.make_job(c, workdir)
    train(job, c, run_dir)
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
def test_teacher_step_on_8_devices_equals_one_device(world_run, tmp_path):
    config, workdir = world_run
    one = _teacher_losses(config, workdir, str(tmp_path / "one"), dict(data=1, fsdp=1, context=1, tensor=1))
    eight = _teacher_losses(config, workdir, str(tmp_path / "eight"), dict(data=2, fsdp=2, context=1, tensor=2))
    assert len(one) == 3
    np.testing.assert_allclose(eight, one, rtol=2e-5)


def test_dataset_that_does_not_fit_the_model_is_named(world_run):
    from dollar_jax.jobs import teacher as teacher_job

    config, workdir = world_run
    c = config.copy_and_resolve_references()
    c.model.in_channels = c.model.out_channels = 8
    with pytest.raises(arrays_dataset.DatasetError, match=r"latents are \(4, 8, 8, 16\).*in_channels"):
        teacher_job.make_job(c, workdir)
    c = config.copy_and_resolve_references()
    c.data.latents = "no_such_dataset"
    with pytest.raises(arrays_dataset.DatasetError, match="No dataset 'no_such_dataset'"):
        teacher_job.make_job(c, workdir)
