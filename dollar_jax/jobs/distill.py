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
from dollar_jax.compile_effort import light_jit, normal
from dollar_jax.config import dit_config
from dollar_jax.data import arrays_dataset
from dollar_jax.data.latents import check_dataset_fits, load_null_text
from dollar_jax.data.pipeline import train_dataset, with_global_batch
from dollar_jax.data.text import text_encoder
from dollar_jax.data.world import world_config
from dollar_jax.diffusion.student import student_grids as warped_student_grids
from dollar_jax.eval import video_io, world_eval
from dollar_jax.eval.generate import make_generate, student_grid, student_sampler
from dollar_jax.train.statistics import pixel_saturation
from dollar_jax.jobs.common import conditioning_sections
from dollar_jax.parallel.mesh import mesh_devices
from dollar_jax.parallel.sharding import on_device, replicated
from dollar_jax.paths import Paths
from dollar_jax.train.dollar_step import build_step, step_flops
from dollar_jax.train.health import warn_on_alarms
from dollar_jax.train.flops import recompute_flops
from dollar_jax.train.loop import Job, train
from dollar_jax.train.state import TrainState

log = logging.getLogger(__name__)
NUMERICS = ("dtype", "param_dtype", "remat_policy", "attention", "splash_block_sizes")


def teacher_folder(config, workdir: str) -> str:
    return storage.resolve(config.distill.teacher) if config.distill.teacher else Paths.of(config, workdir).teacher


def student_dit(config, folder: str):
    """The teacher's architecture with this run's numerics (dtype, remat, attention kernel)."""
    arch, _ = read_model_config(folder)
    numerics = {k: getattr(dit_config(config), k) for k in NUMERICS}
    return arch.replace(**numerics)


def for_this_mesh(config):
    """config with distill.batch_size resolved for the mesh config.mesh makes on this machine's devices."""
    return with_global_batch(config, "distill", mesh_devices(dict(config.mesh), jax.device_count())[0])


def make_job(config, workdir: str) -> Job:
    config = for_this_mesh(config)
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
        out = {"student": params, "fake": step.fake_init(params)}
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
        dataset=train_dataset(source, dc.batch_size, config.data.shuffle_seed, map_fn=latents_and_caption,
                              repeat_rows=dc.repeat_captions),
        # No single learning rate: the step logs the one each optimiser used (lr_student, lr_fake, lr_ft, ...).
        total_steps=dc.steps, learning_rate=None, frozen=frozen,
        flops_per_step=step_flops(config, dit, latent_shape, text_shape, reward),
        on_metrics=lambda step, means: warn_on_alarms(step, means, config.health),
        recompute_flops_per_step=recompute_flops(config, dit, latent_shape, text_shape[0]),
    )
    if reward is not None:
        reward.start_labeller(config, paths.autoencoder)
        job.extra_inputs, job.after_step = reward.extra_inputs, reward.after_step
        job.host_state, job.restore_host_state = reward.host_state, reward.restore_host_state
        job.close = reward.labeller.close
    if reward is not None and reward.weight and reward.gated and not (config.sampling.every_steps and
                                                                      config.embedded_world):
        raise ValueError("reward.ft_min_correlation gates L_FT on the evaluator's LRM correlation, which runs only "
                         "with sampling.every_steps > 0 in the embedded world; set reward.ft_min_correlation=-1")
    if config.sampling.every_steps and config.embedded_world:
        evaluate = make_world_evaluator(config, workdir, step.roles["student"], schedule, prediction_type,
                                        latent_shape, reward)

        def on_sample(state, done):
            out = evaluate(state, done)
            if reward is not None:
                reward.observe(out)  # the L_FT gate reads the LRM's held-out correlation
                out["ft_gate_open"] = float(reward.gate_open or not reward.gated)
            return out

        job.on_sample, job.sample_every = on_sample, config.sampling.every_steps
    return job


def latents_and_caption(example) -> dict:
    return {"latents": example["latents"], "text": example["text"], "caption": example["caption"]}


def exported_params(state: TrainState, dc) -> dict:
    """The student weights that are sampled and exported (config.distill.export): the raw student or its EMA,
    on the device even when the EMA waits in host memory."""
    return state.params["student"] if dc.export == "raw" else on_device(state.ema["student"])


def make_world_evaluator(config, workdir, role, schedule, prediction_type, latent_shape, reward=None):
    """Periodic: the student at each of config.distill.eval_steps -> GIF grid + caption adherence; with a
    reward, also the true pixel reward of its samples and the LRM's correlation with the true reward on
    held-out latents (validation clips + the student's samples)."""
    paths, wcfg, dc = Paths.of(config, workdir), world_config(config), config.distill
    ae = load_autoencoder(paths.autoencoder)
    encoder = text_encoder(config)
    factors, captions, text = world_eval.prompt_batch(wcfg, encoder, config.sampling.num_videos)
    null = np.broadcast_to(encoder.null(), text.shape)
    noise = normal(jax.random.key(7), (len(text), *latent_shape))
    generators = student_generators(dc, role, schedule, prediction_type)

    def on_sample(state: TrainState, step: int) -> dict:
        params = exported_params(state, dc)
        out = {}
        for n, generate in generators.items():
            latents = np.asarray(generate(params, noise, jnp.asarray(text), jnp.asarray(null), jax.random.key(0)))
            videos = world_eval.decode(ae, latents)
            if jax.process_index() == 0:
                video_io.write_gif(os.path.join(paths.run(dc.name), "samples", f"step_{step:06d}_{n}step.gif"),
                                   video_io.grid(videos, upscale=2), fps=config.sampling.fps)
            out.update({f"{k}_{n}step": v for k, v in world_eval.score(videos, factors, wcfg).items()})
            out[f"pixel_saturation_{n}step"] = float(pixel_saturation(videos))  # share of pixels at 0 or 255
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
        predict = light_jit(lambda p, z, t: reward.role.module(p)(z, t))

        def lrm_agreement(lrm_params, samples) -> dict:
            z, t, c = samples
            true = np.concatenate([val_scores, reward_fn(world_eval.decode(ae, z), c)])
            pred = np.concatenate([np.asarray(predict(lrm_params, val["latents"], val["text"])),
                                   np.asarray(predict(lrm_params, jnp.asarray(z), jnp.asarray(t)))])
            return {"lrm_true_correlation": float(pearson(jnp.asarray(pred), jnp.asarray(true))),
                    "lrm_heldout_mse": float(np.mean((pred - true) ** 2))}

    return on_sample


def trained_grids(dc, schedule=None) -> tuple[tuple[float, ...], ...]:
    """The grids the student trains on (distill.student_grids, else distill.student_timesteps), longest first,
    in model timesteps: through the schedule's warp (the flow shift) when `schedule` is given, as training does."""
    nominal = tuple(dc.student_grids) or (tuple(dc.student_timesteps),)
    if schedule is not None:
        grids = warped_student_grids(nominal, schedule).grids
    else:
        grids = tuple(tuple(float(t) for t in g) for g in nominal)
    return tuple(sorted(grids, key=len, reverse=True))


def student_section(dc, schedule=None) -> dict:
    """The student folder's "student" section: what samplers read to sample it as it was trained."""
    grids = [list(g) for g in trained_grids(dc, schedule)]
    return {"timesteps": grids[0], "grids": grids, "sigma_data": float(dc.sigma_data),
            "timestep_scale": float(dc.timestep_scale), "eval_steps": [int(n) for n in dc.eval_steps]}


def student_generators(dc, role, schedule, prediction_type) -> dict:
    """{steps: jitted generate} for config.distill.eval_steps, built from the same section the exported folder
    carries, so the in-training samples are those `dollar_jax.sample` draws from the export."""
    section = student_section(dc, schedule)
    return {n: make_generate(role.module, schedule, prediction_type, student_sampler(section, n))
            for n in student_grids(dc, schedule)}


def student_grids(dc, schedule=None) -> dict[int, tuple[float, ...]]:
    """Timesteps for each evaluated step count. Trained on several grids (distill.student_grids): exactly
    those, and a step count without a trained grid is an error. Trained on one grid: evenly thinned from it
    (4 -> 2 -> 1 steps gives {999, 749, 499, 249} -> {999, 499} -> {999}, the paper's grids)."""
    grids = trained_grids(dc, schedule)
    if len(grids) > 1:
        missing = [n for n in dc.eval_steps if n not in {len(g) for g in grids}]
        if missing:
            raise ValueError(f"distill.eval_steps: {missing} steps were not trained (distill.student_grids "
                             f"has {sorted(len(g) for g in grids)} steps)")
    out = {}
    for n in dc.eval_steps:
        try:
            out[n] = student_grid(grids, n)
        except ValueError as e:
            raise ValueError(f"distill.eval_steps: {n} steps cannot be taken from the trained grid: {e}") from None
    return out


def run(config, workdir: str) -> str:
    """Distil (resumable) and export <workdir>/<distill.name>. Skips if exported."""
    paths, dc = Paths.of(config, workdir), config.distill
    out = os.path.join(paths.workdir, dc.name)
    if model_folder_exists(out):
        return out
    folder = teacher_folder(config, workdir)
    config = for_this_mesh(config)  # before anything loads: a batch the mesh cannot split stops here
    job = make_job(config, workdir)
    state = train(job, config, paths.run(dc.name))
    _, _, diffusion = teacher_parameterisation(folder)
    params = exported_params(state, dc)
    schedule, _, _ = teacher_parameterisation(folder)
    write_model_folder(out, {
        "dit": student_dit(config, folder).to_dict(),
        "diffusion": diffusion,
        "student": student_section(dc, schedule),
        "source": {"format": "dollar-jax-student", "teacher": folder, "steps": int(state.step), "weights": dc.export,
                   "vsd_weight": dc.vsd_weight, "cd_weight": dc.cd_weight},
        **conditioning_sections(config, workdir, *check_dataset_fits(config, paths.data, student_dit(config, folder))),
    }, params)
    return out
