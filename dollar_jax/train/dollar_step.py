"""The DOLLAR step: one jitted iteration of VSD + consistency distillation (+ latent reward fine-tuning).

`build_step` turns a config and a student architecture into a pure `train_step(state, frozen, batch)`:
a generator update on beta_VSD L_VSD + beta_CD L_CD (the student's own few-step samples for VSD,
forward-diffused real latents for CD), then `fake_updates` updates of the fake-score model on the student's
samples (a scan), then, with a reward, the LRM regression and the L_FT generator update. The teacher is a
frozen input; the student, its EMA target, the fake score and the optimiser states are the state. Nothing
here touches files or the mesh: the distillation job wires data and weights, the memory planner and the
benchmarks compile the same step abstractly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dollar_jax.diffusion.consistency import consistency_denoiser
from dollar_jax.diffusion.samplers import make_denoiser
from dollar_jax.diffusion.student import training_sample
from dollar_jax.eval.statistics import sample_statistics
from dollar_jax.losses.consistency import consistency_loss, ddim_teacher_solve
from dollar_jax.losses.denoising import denoising_loss
from dollar_jax.losses.vsd import vsd_loss
from dollar_jax.models.dit import WanDiT
from dollar_jax.models.dit_config import DiTConfig
from dollar_jax.models.layers import abstract
from dollar_jax.train.flops import distill_step_flops
from dollar_jax.train.loop import scalar_metrics
from dollar_jax.train.optim import make_optimizer
from dollar_jax.train.reward_step import make_reward_part
from dollar_jax.train.state import (Role, TrainState, all_finite, guard_state, optimizer_step, split_model,
                                    update_ema)


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
    # Memory switches (config.distill; BENCHMARKS.md measures each): per-update NaN guards, the fake score
    # stored in bf16, the EMA target in bf16 or not kept at all when nothing reads it (no CD, raw export).
    if dc.nan_guard not in ("state", "update"):
        raise ValueError(f"config.distill.nan_guard must be 'state' or 'update', got {dc.nan_guard!r}")
    guard = dc.nan_guard == "update"
    keep_ema = bool(dc.cd_weight) or dc.export == "ema"
    student_role, abstract_params = split_model("student", model, student_opt,
                                                dc.student_ema_decay if keep_ema else None,
                                                ema_dtype=dc.ema_dtype or None, guard_updates=guard)
    fake_role, _ = split_model("fake", model, fake_opt, param_dtype=dc.fake_dtype or None, guard_updates=guard)
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
        ema = state.ema.get("student")
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

        emas = {} if ema is None else {"student": update_ema(ema, params["student"], student_role.ema_decay)}
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_states, ema=emas)
        return guard_state(roles, finite, new, state), scalar_metrics(finite=finite, **metrics)

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
