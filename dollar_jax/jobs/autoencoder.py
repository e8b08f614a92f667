"""Train the world's video autoencoder, measure its latent statistics and validation PSNR, export it."""

from __future__ import annotations

import logging

import jax
import numpy as np
from flax import nnx

from dollar_jax import storage
from dollar_jax.checkpoint import model_folder_exists, write_model_folder
from dollar_jax.compile_effort import light_jit
from dollar_jax.config import optimizer as optimizer_config
from dollar_jax.data import arrays_dataset
from dollar_jax.data.pipeline import eval_batches, train_dataset
from dollar_jax.data.world import world_config
from dollar_jax.jobs.world_data import build_videos, video_spec
from dollar_jax.models.layers import abstract
from dollar_jax.models.autoencoder import Autoencoder, AutoencoderConfig, autoencoder_loss, psnr
from dollar_jax.paths import Paths
from dollar_jax.train.loop import Job, scalar_metrics, train
from dollar_jax.train.optim import make_optimizer
from dollar_jax.train.state import TrainState, all_finite, apply_gradients, keep_if_finite, split_model

log = logging.getLogger(__name__)
STATS_CLIPS = 1024


def make_job(config, workdir: str) -> Job:
    paths, wcfg = Paths.of(config, workdir), world_config(config)
    arrays_dataset.check_features(paths.data, config.data.videos, video_spec(wcfg))
    ae_cfg = AutoencoderConfig.from_config(config.autoencoder)
    ae_cfg.latent_shape(wcfg.num_frames, wcfg.height, wcfg.width)  # fail early on indivisible shapes
    steps = config.autoencoder.steps
    a = config.autoencoder
    optimizer, lr = make_optimizer(optimizer_config(learning_rate=a.learning_rate, warmup_steps=a.warmup_steps), steps)
    make = lambda: Autoencoder(ae_cfg, rngs=nnx.Rngs(config.seed))
    # Built concretely (it is small): the role keeps the non-trained latent statistics as real arrays.
    role, _ = split_model("autoencoder", make(), optimizer)
    kl_weight = float(config.autoencoder.kl_weight)

    def train_step(state: TrainState, frozen, batch):
        def loss_fn(p):
            return autoencoder_loss(role.module(p), batch["video"], state.step_key(), kl_weight)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["autoencoder"])
        params, opt, gnorm = apply_gradients(state, role, grads)
        new = state.replace(step=state.step + 1, params={"autoencoder": params}, opt_state={"autoencoder": opt})
        finite = all_finite(loss, grads)
        return keep_if_finite(finite, new, state), scalar_metrics(
            loss=loss, mse=aux["mse"], kl=aux["kl"], psnr=aux["psnr"], grad_norm=gnorm, finite=finite)

    source = arrays_dataset.open_split(paths.data, config.data.videos, "train")
    return Job(
        name="autoencoder", roles={"autoencoder": role},
        abstract_params=lambda: {"autoencoder": split_model("a", abstract(make))[1]},
        initial_params=lambda: {"autoencoder": light_jit(lambda: split_model("a", make())[1])()},
        train_step=train_step,
        dataset=train_dataset(source, config.autoencoder.batch_size, config.data.shuffle_seed,
                              map_fn=lambda ex: {"video": ex["video"]}),
        total_steps=steps, learning_rate=lr,
    )


def run(config, workdir: str) -> str:
    """Build the videos if needed, train (resumable), export <workdir>/autoencoder. Skips if exported."""
    paths = Paths.of(config, workdir)
    if model_folder_exists(paths.autoencoder):
        return paths.autoencoder
    build_videos(config, workdir)
    job = make_job(config, workdir)
    state = train(job, config, paths.run("autoencoder"))
    model = job.roles["autoencoder"].module(jax.device_get(state.params["autoencoder"]))
    ae_cfg = model.config
    # Normalise latents to zero mean / unit variance per channel, measured on training clips.
    source = arrays_dataset.open_split(paths.data, config.data.videos, "train")
    encode = light_jit(lambda m, v: m.posterior(v)[0])
    means = [np.asarray(encode(model, b["video"])) for b in eval_batches(source, 128, STATS_CLIPS)]
    z = np.concatenate(means).reshape(-1, ae_cfg.latent_channels)
    model.set_latent_stats(z.mean(0), z.std(0))
    val_psnr = validation_psnr(model, config, workdir)
    log.info("autoencoder: validation PSNR %.2f dB", val_psnr)
    params = nnx.to_pure_dict(nnx.state(model))
    write_model_folder(paths.autoencoder, {
        "autoencoder": ae_cfg.to_dict(),
        "metrics": {"validation_psnr_db": val_psnr, "steps": job.total_steps},
    }, params)
    return paths.autoencoder


def validation_psnr(model: Autoencoder, config, workdir: str) -> float:
    """Mean PSNR (dB) of encode -> decode over the validation split."""
    paths = Paths.of(config, workdir)
    source = arrays_dataset.open_split(paths.data, config.data.videos, "validation")
    roundtrip = light_jit(lambda m, v: psnr(m.decode(m.encode(v)), v))
    values = [np.asarray(roundtrip(model, b["video"])) for b in eval_batches(source, 128)]
    return float(np.mean(np.concatenate(values)))


def metrics_of(folder: str) -> dict:
    return storage.read_json(storage.join(folder, "config.json")).get("metrics", {})


