"""The distillation job: wires a teacher folder, the latents dataset and the DOLLAR step
(dollar_jax/train/dollar_step.py) into the training loop, evaluates the student in the embedded world, and
exports the student as a model folder."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dollar_jax import storage
from dollar_jax.checkpoint import (load_autoencoder, load_dit, model_folder_exists, read_model_config,
                                   teacher_parameterisation, write_model_folder)
from dollar_jax.config import dit_config
from dollar_jax.data import arrays_dataset
from dollar_jax.data.latents import check_dataset_fits, load_null_text
from dollar_jax.data.pipeline import train_dataset
from dollar_jax.data.text import text_encoder
from dollar_jax.data.world import world_config
from dollar_jax.eval import video_io, world_eval
from dollar_jax.eval.generate import make_generate, student_spec
from dollar_jax.jobs.common import conditioning_sections
from dollar_jax.parallel.sharding import replicated
from dollar_jax.paths import Paths
from dollar_jax.train.dollar_step import build_step, step_flops
from dollar_jax.train.loop import Job, train
from dollar_jax.train.state import TrainState

log = logging.getLogger(__name__)
NUMERICS = ("dtype", "param_dtype", "remat_policy", "attention")


def teacher_folder(config, workdir: str) -> str:
    return storage.resolve(config.distill.teacher) if config.distill.teacher else Paths.of(config, workdir).teacher


def student_dit(config, folder: str):
    """The teacher's architecture with this run's numerics (dtype, remat, attention kernel)."""
    arch, _ = read_model_config(folder)
    numerics = {k: getattr(dit_config(config), k) for k in NUMERICS}
    return arch.replace(**numerics)


def make_job(config, workdir: str) -> Job:
    paths, dc = Paths.of(config, workdir), config.distill
    folder = teacher_folder(config, workdir)
    dit = student_dit(config, folder)
    latent_shape, text_shape = check_dataset_fits(config, paths.data, dit)
    schedule, prediction_type, _ = teacher_parameterisation(folder)
    null_text = load_null_text(paths.data, config.data.latents)
    step = build_step(config, dit, schedule, prediction_type, latent_shape, text_shape)
    reward = step.reward

    def initial_params():
        teacher = load_dit(folder, **{k: getattr(dit, k) for k in NUMERICS})
        params = nnx.to_pure_dict(nnx.state(teacher, nnx.Param))
        out = {"student": params, "fake": jax.tree.map(jnp.copy, params)}
        if reward is not None:
            out["lrm"] = reward.make_params()
        return out

    def frozen(mesh):
        numerics = {k: getattr(dit, k) for k in NUMERICS} | {"param_dtype": dc.teacher_dtype}
        teacher = load_dit(folder, mesh, **numerics)
        return {"teacher": nnx.to_pure_dict(nnx.state(teacher, nnx.Param)),
                "null_text": jax.device_put(null_text, replicated(mesh))}

    source = arrays_dataset.open_split(paths.data, config.data.latents, "train")
    job = Job(
        name=dc.name, roles=step.roles, abstract_params=lambda: step.abstract_params,
        initial_params=initial_params, train_step=step.train_step,
        dataset=train_dataset(source, dc.batch_size, config.data.shuffle_seed, map_fn=latents_and_caption),
        total_steps=dc.steps, learning_rate=step.learning_rate, frozen=frozen,
        flops_per_step=step_flops(config, dit, latent_shape, text_shape, reward),
    )
    if reward is not None:
        reward.start_labeller(config, paths.autoencoder)
        job.extra_inputs, job.after_step = reward.extra_inputs, reward.after_step
        job.host_state, job.restore_host_state = reward.labeller.state, reward.labeller.restore
        job.close = reward.labeller.close
    if config.sampling.every_steps and config.embedded_world:
        job.on_sample = make_world_evaluator(config, workdir, step.roles["student"], schedule, prediction_type, latent_shape,
                                             reward)
        job.sample_every = config.sampling.every_steps
    return job


def latents_and_caption(example) -> dict:
    return {"latents": example["latents"], "text": example["text"], "caption": example["caption"]}


def make_world_evaluator(config, workdir, role, schedule, prediction_type, latent_shape, reward=None):
    """Periodic: the student at each of config.distill.eval_steps -> GIF grid + caption adherence; with a
    reward, also the true pixel reward of its samples and the LRM's correlation with the true reward on
    held-out latents (validation clips + the student's samples)."""
    paths, wcfg, dc = Paths.of(config, workdir), world_config(config), config.distill
    ae = load_autoencoder(paths.autoencoder)
    encoder = text_encoder(config)
    factors, captions, text = world_eval.prompt_batch(wcfg, encoder, config.sampling.num_videos)
    null = np.broadcast_to(encoder.null(), text.shape)
    noise = jax.random.normal(jax.random.key(7), (len(text), *latent_shape))
    generators = {n: make_generate(role.module, schedule, prediction_type, student_spec(grid))
                  for n, grid in student_grids(dc).items()}

    def on_sample(state: TrainState, step: int) -> dict:
        params = state.params["student"] if dc.export == "raw" else state.ema["student"]
        out = {}
        for n, generate in generators.items():
            latents = np.asarray(generate(params, noise, jnp.asarray(text), jnp.asarray(null), jax.random.key(0)))
            videos = world_eval.decode(ae, latents)
            if jax.process_index() == 0:
                video_io.write_gif(os.path.join(paths.run(dc.name), "samples", f"step_{step:06d}_{n}step.gif"),
                                   video_io.grid(videos, upscale=2), fps=config.sampling.fps)
            out.update({f"{k}_{n}step": v for k, v in world_eval.score(videos, factors, wcfg).items()})
            if reward is not None:
                out[f"true_reward_{n}step"] = float(np.mean(reward_fn(videos, captions)))
                held_out = (latents, text, captions)
        if reward is not None:
            out.update(lrm_agreement(state.params["lrm"], held_out))
        return out

    if reward is not None:
        from dollar_jax.data.pipeline import eval_batches
        from dollar_jax.rewards import reward_from_config
        from dollar_jax.losses.reward import pearson

        reward_fn = reward_from_config(config)
        source = arrays_dataset.open_split(paths.data, config.data.latents, "validation")
        val = next(iter(eval_batches(source, config.reward.eval_examples, config.reward.eval_examples)))
        val_captions = [c.decode() for c in val["caption"]]
        val_scores = reward_fn(world_eval.decode(ae, val["latents"]), val_captions)
        predict = jax.jit(lambda p, z, t: reward.role.module(p)(z, t))

        def lrm_agreement(lrm_params, samples) -> dict:
            z, t, c = samples
            true = np.concatenate([val_scores, reward_fn(world_eval.decode(ae, z), c)])
            pred = np.concatenate([np.asarray(predict(lrm_params, val["latents"], val["text"])),
                                   np.asarray(predict(lrm_params, jnp.asarray(z), jnp.asarray(t)))])
            return {"lrm_true_correlation": float(pearson(jnp.asarray(pred), jnp.asarray(true))),
                    "lrm_heldout_mse": float(np.mean((pred - true) ** 2))}

    return on_sample


def student_grids(dc) -> dict[int, tuple[float, ...]]:
    """Timesteps for each evaluated step count: evenly thinned from the trained grid (4 -> 2 -> 1 steps
    gives {999, 749, 499, 249} -> {999, 499} -> {999}, the paper's grids)."""
    trained = tuple(float(t) for t in dc.student_timesteps)
    grids = {}
    for n in dc.eval_steps:
        if n > len(trained) or len(trained) % n:
            raise ValueError(f"distill.eval_steps: {n} steps cannot be taken from the trained grid {trained}")
        grids[n] = trained[:: len(trained) // n]
    return grids


def run(config, workdir: str) -> str:
    """Distil (resumable) and export <workdir>/<distill.name>. Skips if exported."""
    paths, dc = Paths.of(config, workdir), config.distill
    out = os.path.join(paths.workdir, dc.name)
    if model_folder_exists(out):
        return out
    folder = teacher_folder(config, workdir)
    job = make_job(config, workdir)
    state = train(job, config, paths.run(dc.name))
    _, _, diffusion = teacher_parameterisation(folder)
    params = state.params["student"] if dc.export == "raw" else state.ema["student"]
    write_model_folder(out, {
        "dit": student_dit(config, folder).to_dict(),
        "diffusion": diffusion,
        "student": {"timesteps": list(dc.student_timesteps), "sigma_data": dc.sigma_data,
                    "timestep_scale": dc.timestep_scale, "eval_steps": list(dc.eval_steps)},
        "source": {"format": "dollar-jax-student", "teacher": folder, "steps": int(state.step), "weights": dc.export,
                   "vsd_weight": dc.vsd_weight, "cd_weight": dc.cd_weight},
        **conditioning_sections(config, workdir, check_dataset_fits(config, paths.data, student_dit(config, folder))[0]),
    }, params)
    return out
