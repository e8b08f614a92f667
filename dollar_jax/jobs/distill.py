"""DOLLAR distillation: VSD + consistency distillation of a guided teacher into a few-step student.

One jitted step runs the paper's iteration: a generator update on beta_VSD L_VSD + beta_CD L_CD (the
student's own few-step samples for VSD, forward-diffused real latents for CD), then `fake_updates`
updates of the fake-score model on the student's samples (a scan). The teacher is a frozen input; the
student, its EMA target, the fake score and both optimiser states are the checkpointed state.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dollar_jax.checkpoint import load_dit, read_model_config, read_model_folder_config, write_model_folder
from dollar_jax.config import dit_config
from dollar_jax.models.dit_config import DiTConfig
from dollar_jax.data import arrays_dataset
from dollar_jax.data.pipeline import train_dataset
from dollar_jax.diffusion.consistency import consistency_denoiser
from dollar_jax.diffusion.samplers import make_denoiser
from dollar_jax.diffusion.schedules import make_schedule
from dollar_jax.diffusion.student import training_sample
from dollar_jax.eval import video_io, world_eval
from dollar_jax.eval.generate import make_generate, student_spec
from dollar_jax.eval.statistics import sample_statistics
from dollar_jax.jobs import autoencoder as autoencoder_job
from dollar_jax.jobs.common import Paths, conditioning_sections, world_config
from dollar_jax.jobs.precompute import load_null_text, text_encoder
from dollar_jax.jobs.reward_finetune import make_reward_part
from dollar_jax.jobs.teacher import check_dataset_fits
from dollar_jax.losses.consistency import consistency_loss, ddim_teacher_solve
from dollar_jax.losses.denoising import denoising_loss
from dollar_jax.losses.vsd import vsd_loss
from dollar_jax.models.dit import WanDiT
from dollar_jax.models.layers import abstract
from dollar_jax.parallel.sharding import replicated
from dollar_jax.train.flops import distill_step_flops
from dollar_jax.train.loop import Job, scalar_metrics, train
from dollar_jax.train.optim import make_optimizer
from dollar_jax.train.state import (Role, TrainState, all_finite, keep_if_finite, optimizer_step, split_model,
                                    update_ema)

log = logging.getLogger(__name__)
NUMERICS = ("dtype", "param_dtype", "remat_policy", "attention")


def teacher_folder(config, workdir: str) -> str:
    return os.path.abspath(config.distill.teacher) if config.distill.teacher else Paths.of(config, workdir).teacher


def teacher_parameterisation(folder: str):
    """(schedule, prediction_type, diffusion section) the teacher was trained with, from its folder."""
    d, _ = read_model_folder_config(folder, "diffusion")
    if d["schedule"] == "vp":
        schedule = make_schedule("vp", beta_schedule=d["beta_schedule"], beta_start=d["beta_start"],
                                 beta_end=d["beta_end"])
    else:
        schedule = make_schedule("flow", shift=d["flow_shift"])
    return schedule, d["prediction_type"], d


def student_dit(config, folder: str):
    """The teacher's architecture with this run's numerics (dtype, remat, attention kernel)."""
    arch, _ = read_model_config(folder)
    numerics = {k: getattr(dit_config(config), k) for k in NUMERICS}
    return arch.replace(**numerics)


@dataclasses.dataclass
class DistillStep:
    """The pure distillation step and what it needs to be jitted: roles, abstract params, the frozen teacher."""
    train_step: Callable
    roles: dict
    abstract_params: dict
    teacher_role: Role
    teacher_abstract: dict  # shapes/dtypes of the frozen teacher's parameters
    reward: object | None
    learning_rate: Callable


def build_step(config, dit: DiTConfig, schedule, prediction_type: str, latent_shape, text_shape) -> DistillStep:
    """The jittable step for a student/fake of architecture `dit` (no data or weights needed: tools use it
    to compile the step abstractly)."""
    dc = config.distill
    student_opt, lr = make_optimizer(dc.optim, dc.steps)
    fake_opt, _ = make_optimizer(dc.fake_optim, dc.steps * dc.fake_updates)
    model = abstract(lambda: WanDiT(dit, rngs=nnx.Rngs(0)))
    teacher_role, teacher_abstract = split_model("teacher", abstract(lambda: WanDiT(dit.replace(param_dtype=dc.teacher_dtype),
                                                                      rngs=nnx.Rngs(0))))
    student_role, abstract_params = split_model("student", model, student_opt, dc.student_ema_decay)
    fake_role, _ = split_model("fake", model, fake_opt)
    reward = make_reward_part(config, latent_shape, text_shape) if config.reward.enabled else None

    timesteps = np.asarray(dc.student_timesteps, np.float32)
    cd_grid = schedule.sampling_timesteps(dc.cd_grid)
    t_min, t_max = dc.vsd_t_min * schedule.t_max, dc.vsd_t_max * schedule.t_max

    def consistency_fn(params, text, role=student_role):
        denoise = make_denoiser(role.module(params), schedule, prediction_type, text)
        return consistency_denoiser(denoise, schedule, dc.sigma_data, dc.timestep_scale)

    def train_step(state: TrainState, frozen, batch):
        k_noise, k_sample, k_vsd, k_cd, k_fake = jax.random.split(state.step_key(), 5)
        text, data, null = batch["text"], batch["latents"], frozen["null_text"]
        teacher = teacher_role.module(frozen["teacher"])
        real = make_denoiser(teacher, schedule, prediction_type, text, null, dc.real_guidance, dc.real_convention)
        fake_params = jax.lax.stop_gradient(state.params["fake"])
        fake = make_denoiser(fake_role.module(fake_params), schedule, prediction_type, text)
        ema = state.ema["student"]
        noise = jax.random.normal(k_noise, data.shape, jnp.float32)

        def generator_loss(params):
            student = consistency_fn(params, text)
            frozen_student = consistency_fn(jax.lax.stop_gradient(params), text)
            x, _ = training_sample(student, frozen_student, noise, timesteps, schedule, k_sample, dc.sample_mode,
                                   data)
            terms, aux = {}, {"x": jax.lax.stop_gradient(x)}
            if dc.vsd_weight:
                terms["loss_vsd"], vsd_aux = vsd_loss(x, real, fake, k_vsd, schedule, t_min, t_max)
                aux["vsd_grad_abs"] = vsd_aux["vsd_grad_abs"]
            if dc.cd_weight:
                cd_teacher = make_denoiser(teacher, schedule, prediction_type, text, null, dc.cd_guidance,
                                           dc.cd_convention)
                terms["loss_cd"], _ = consistency_loss(
                    lambda x_t, t: student(x_t, t)[0], lambda x_t, t: consistency_fn(ema, text)(x_t, t)[0],
                    ddim_teacher_solve(cd_teacher, schedule), data, k_cd, schedule, cd_grid, dc.cd_steps,
                    dc.cd_distance, dc.huber_c)
            total = dc.vsd_weight * terms.get("loss_vsd", 0.0) + dc.cd_weight * terms.get("loss_cd", 0.0)
            return total, (terms, aux)

        (gen_loss, (terms, aux)), grads = jax.value_and_grad(generator_loss, has_aux=True)(state.params["student"])
        student, student_opt_state, g_student = optimizer_step(student_role, state.params["student"],
                                                               state.opt_state["student"], grads)

        # The fake score learns the student's current distribution with the teacher's own objective.
        samples = aux["x"]

        def fake_update(carry, key):
            params, opt_state = carry

            def loss_fn(p):
                return denoising_loss(fake_role.module(p), samples, text, key, schedule, prediction_type)[0]

            loss, g = jax.value_and_grad(loss_fn)(params)
            params, opt_state, gnorm = optimizer_step(fake_role, params, opt_state, g)
            return (params, opt_state), (loss, gnorm, all_finite(loss, g))

        (fake_new, fake_opt_state), (fake_losses, fake_norms, fake_finite) = jax.lax.scan(
            fake_update, (state.params["fake"], state.opt_state["fake"]), jax.random.split(k_fake, dc.fake_updates))

        params = {"student": student, "fake": fake_new}
        opt_states = {"student": student_opt_state, "fake": fake_opt_state}
        finite = all_finite(gen_loss, grads) & jnp.all(fake_finite)
        metrics = dict(loss_generator=gen_loss, loss_fake=jnp.mean(fake_losses), grad_norm_student=g_student,
                       grad_norm_fake=jnp.mean(fake_norms), **terms,
                       **{k: v for k, v in aux.items() if k != "x"},
                       **sample_statistics(samples, "sample"), **sample_statistics(data, "data"))

        if reward is not None:  # the LRM learns the labelled rewards; then the student climbs the LRM
            params["lrm"], opt_states["lrm"], lrm_metrics, lrm_finite = reward.lrm_update(
                state.params["lrm"], state.opt_state["lrm"], batch)
            metrics.update(lrm_metrics)
            finite &= lrm_finite
            if reward.weight:
                def sample_fn(p, t, d, key):
                    k_n, k_s = jax.random.split(key)
                    eps = jax.random.normal(k_n, d.shape, jnp.float32)
                    return training_sample(consistency_fn(p, t), consistency_fn(jax.lax.stop_gradient(p), t), eps,
                                           timesteps, schedule, k_s, dc.sample_mode, d)[0]

                ft_grads, metrics["loss_ft"] = reward.finetune_grads(
                    params["student"], params["lrm"], sample_fn, text, data,
                    jax.random.fold_in(state.step_key(), 1000))  # its own stream: the others stay as without it
                params["student"], opt_states["student"], metrics["grad_norm_ft"] = optimizer_step(
                    student_role, params["student"], opt_states["student"], ft_grads)
                finite &= all_finite(ft_grads)
            metrics["_outputs"] = {"student_x0": samples}

        ema = update_ema(ema, params["student"], student_role.ema_decay)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_states, ema={"student": ema})
        return keep_if_finite(finite, new, state), scalar_metrics(finite=finite, **metrics)

    roles = {"student": student_role, "fake": fake_role}
    shapes = {"student": abstract_params, "fake": abstract_params}
    if reward is not None:
        roles["lrm"], shapes["lrm"] = reward.role, reward.abstract_params
    return DistillStep(train_step, roles, shapes, teacher_role, teacher_abstract, reward, lr)


def step_flops(config, dit: DiTConfig, latent_shape, text_shape, reward) -> dict:
    """Analytic FLOPs per role of one step (train/flops.py); the small LRM is measured by XLA."""
    lrm = 0.0
    if reward is not None:
        module = reward.role.module(reward.abstract_params)
        x = jax.ShapeDtypeStruct((1, *latent_shape), jnp.float32)
        t = jax.ShapeDtypeStruct((1, *text_shape), jnp.float32)
        lrm = float(jax.jit(lambda a, b: module(a, b)).lower(x, t).cost_analysis().get("flops", 0.0))
    return distill_step_flops(config, dit, latent_shape, text_shape[0], lrm)


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
        reward.start_labeller(config, workdir)
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
    ae = autoencoder_job.load(paths.autoencoder)
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
        from dollar_jax.jobs.reward_finetune import make_reward_fn
        from dollar_jax.losses.reward import pearson

        reward_fn = make_reward_fn(config)
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
    if os.path.exists(os.path.join(out, "config.json")):
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
