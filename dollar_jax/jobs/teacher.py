"""Teacher pre-training: the tiny DiT learns the world's latents with the paper's VP conjugate-velocity
objective and text dropout (so classifier-free guidance works). Exports <workdir>/teacher from the EMA."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dollar_jax.checkpoint import load_autoencoder, model_folder_exists, write_model_folder
from dollar_jax.compile_effort import light_jit, normal
from dollar_jax.config import dit_config, schedule_of
from dollar_jax.data import arrays_dataset
from dollar_jax.data.latents import check_dataset_fits, load_null_text
from dollar_jax.data.pipeline import eval_batches, train_dataset
from dollar_jax.data.text import text_encoder
from dollar_jax.data.world import world_config
from dollar_jax.eval import video_io, world_eval
from dollar_jax.eval.generate import make_generate, teacher_spec
from dollar_jax.jobs.common import conditioning_sections
from dollar_jax.losses.denoising import denoising_loss, drop_text
from dollar_jax.models.dit import WanDiT
from dollar_jax.models.layers import abstract
from dollar_jax.parallel.sharding import replicated
from dollar_jax.paths import Paths
from dollar_jax.train.loop import Job, scalar_metrics, train
from dollar_jax.train.optim import make_optimizer
from dollar_jax.train.state import (TrainState, all_finite, apply_gradients, keep_if_finite, split_model,
                                    update_ema)

log = logging.getLogger(__name__)
VAL_EXAMPLES = 256


def latents_batch(example) -> dict:
    return {"latents": example["latents"], "text": example["text"]}


def training_timestep_density(tc) -> tuple[float, float] | None:
    """config.teacher.timesteps (checked by config.validate): "uniform" -> None, "logit_normal" -> (mean, std)."""
    return (float(tc.logit_mean), float(tc.logit_std)) if tc.timesteps == "logit_normal" else None


def make_job(config, workdir: str) -> Job:
    paths = Paths.of(config, workdir)
    dit = dit_config(config)
    latent_shape, _ = check_dataset_fits(config, paths.data, dit)
    schedule, prediction_type = schedule_of(config), config.diffusion.prediction_type
    null_text = load_null_text(paths.data, config.data.latents)
    tc = config.teacher
    optimizer, lr = make_optimizer(tc.optim, tc.steps)
    make = lambda: WanDiT(dit, rngs=nnx.Rngs(config.seed))
    role, _ = split_model("teacher", abstract(make), optimizer, tc.ema_decay)
    p_drop = float(config.teacher.text_dropout)
    density = training_timestep_density(tc)

    def train_step(state: TrainState, frozen, batch):
        k_drop, k_loss = jax.random.split(state.step_key())
        text = drop_text(k_drop, batch["text"], frozen["null_text"], p_drop)

        def loss_fn(p):
            loss, _ = denoising_loss(role.module(p), batch["latents"], text, k_loss, schedule, prediction_type,
                                     logit_normal=density)
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(state.params["teacher"])
        params, opt, gnorm = apply_gradients(state, role, grads)
        ema = update_ema(state.ema["teacher"], params, role.ema_decay)
        new = state.replace(step=state.step + 1, params={"teacher": params}, opt_state={"teacher": opt},
                            ema={"teacher": ema})
        finite = all_finite(loss, grads)
        return keep_if_finite(finite, new, state), scalar_metrics(loss=loss, grad_norm=gnorm, finite=finite)

    source = arrays_dataset.open_split(paths.data, config.data.latents, "train")
    job = Job(
        name="teacher", roles={"teacher": role},
        abstract_params=lambda: {"teacher": split_model("t", abstract(make))[1]},
        initial_params=lambda: {"teacher": light_jit(lambda: split_model("t", make())[1])()},
        train_step=train_step,
        dataset=train_dataset(source, tc.batch_size, config.data.shuffle_seed, map_fn=latents_batch),
        total_steps=tc.steps, learning_rate=lr,
        frozen=lambda mesh: {"null_text": jax.device_put(null_text, replicated(mesh))},
    )
    if config.sampling.every_steps:
        job.on_sample = make_evaluator(config, workdir, role, latent_shape)
        job.sample_every = config.sampling.every_steps
    return job


def validation_loss_fn(config, workdir: str, role):
    """Denoising loss on the first validation examples with fixed noise and timesteps (comparable across runs)."""
    paths = Paths.of(config, workdir)
    source = arrays_dataset.open_split(paths.data, config.data.latents, "validation")
    batches = [latents_batch(b) for b in eval_batches(source, 64, VAL_EXAMPLES)]
    schedule, prediction_type = schedule_of(config), config.diffusion.prediction_type
    loss = light_jit(lambda p, x0, text, key: denoising_loss(role.module(p), x0, text, key, schedule,
                                                             prediction_type)[0])

    def evaluate(params) -> float:
        keys = jax.random.split(jax.random.key(1234), len(batches))
        return float(np.mean([loss(params, b["latents"], b["text"], k) for b, k in zip(batches, keys)]))

    return evaluate


def make_evaluator(config, workdir: str, role, latent_shape):
    """Periodic evaluation: validation loss, and (in the world) guided samples -> GIF + caption adherence."""
    paths, wcfg = Paths.of(config, workdir), world_config(config)
    val_loss = validation_loss_fn(config, workdir, role)
    ae = load_autoencoder(paths.autoencoder)
    encoder = text_encoder(config)
    factors, _, text = world_eval.prompt_batch(wcfg, encoder, config.sampling.num_videos)
    null = np.broadcast_to(encoder.null(), text.shape)
    spec = teacher_spec(schedule_of(config), config.sampling.steps, config.sampling.guidance_scale,
                        config.sampling.convention)
    generate = make_generate(role.module, schedule_of(config), config.diffusion.prediction_type, spec)
    noise = normal(jax.random.key(7), (len(text), *latent_shape))

    def on_sample(state: TrainState, step: int) -> dict:
        params = state.ema["teacher"]
        latents = np.asarray(generate(params, noise, jnp.asarray(text), jnp.asarray(null), jax.random.key(0)))
        videos = world_eval.decode(ae, latents)
        if jax.process_index() == 0:
            video_io.write_gif(os.path.join(paths.run("teacher"), "samples", f"step_{step:06d}.gif"),
                               video_io.grid(videos, upscale=2), fps=config.sampling.fps)
        return {"val_loss": val_loss(params), **world_eval.score(videos, factors, wcfg)}

    return on_sample


def run(config, workdir: str) -> str:
    """Train (resumable) and export <workdir>/teacher from the EMA parameters. Skips if exported."""
    paths = Paths.of(config, workdir)
    if model_folder_exists(paths.teacher):
        return paths.teacher
    job = make_job(config, workdir)
    state = train(job, config, paths.run("teacher"))
    d = config.diffusion
    write_model_folder(paths.teacher, {
        "dit": dit_config(config).to_dict(),
        "diffusion": {"schedule": d.schedule, "prediction_type": d.prediction_type, "beta_schedule": d.beta_schedule,
                      "beta_start": d.beta_start, "beta_end": d.beta_end, "flow_shift": d.flow_shift},
        "source": {"format": "dollar-jax-teacher", "steps": int(state.step), "weights": "ema"},
        **conditioning_sections(config, workdir, *check_dataset_fits(config, paths.data, dit_config(config))),
    }, state.ema["teacher"])
    return paths.teacher
