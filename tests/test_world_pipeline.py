"""The embedded world end to end: dataset, autoencoder, latents, teacher (shared session fixture)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def _teacher_losses(config, workdir, run_dir, mesh):
    from dollar_jax.jobs import teacher as teacher_job
    from dollar_jax.train.loop import train
    from dollar_jax.train.metrics import read_metrics

    c = config.copy_and_resolve_references()
    c.mesh.update(mesh)
    c.teacher.steps, c.log_every_steps, c.checkpoint.every_steps = 3, 1, 3
    c.step_compile = "light"
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
