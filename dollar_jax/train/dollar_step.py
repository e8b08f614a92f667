"""The DOLLAR step: one jitted iteration of VSD + consistency distillation (+ latent reward fine-tuning).

`build_step` turns a config and a student architecture into a pure `train_step(state, frozen, batch)`:
a generator update on beta_VSD L_VSD + beta_CD L_CD (the student's own few-step samples for VSD,
forward-diffused real latents for CD), then `fake_updates` updates of the fake-score model (a scan; with
distill.fake_samples="fresh" each on a new no-gradient sample of the updated student, as DMD2 does), then,
with a reward, the LRM regression and the L_FT generator update (its own optimiser state). With
beta_VSD = 0 neither the VSD sample nor the fake score is computed. Every timestep the step draws goes
through the schedule's warp (the flow shift of a Wan teacher). The teacher is a
frozen input; the student, its EMA target, the fake score and the optimiser states are the state. Nothing
here touches files or the mesh: the distillation job wires data and weights, the memory planner and the
benchmarks compile the same step abstractly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dollar_jax.diffusion.consistency import consistency_denoiser
from dollar_jax.diffusion.samplers import make_denoiser
from dollar_jax.diffusion.student import GRID_SAMPLING, StudentGrids, student_grids, training_sample
from dollar_jax.losses.consistency import consistency_loss, ddim_teacher_solve
from dollar_jax.losses.denoising import denoising_loss
from dollar_jax.losses.vsd import vsd_loss
from dollar_jax.models.dit import WanDiT
from dollar_jax.models.dit_config import DiTConfig
from dollar_jax.models.layers import abstract
from dollar_jax.models.lora import lora_axes, lora_init, lora_scale
from dollar_jax.train.flops import distill_step_flops
from dollar_jax.train.health import health_metrics
from dollar_jax.train.loop import scalar_metrics
from dollar_jax.train.optim import make_optimizer
from dollar_jax.train.reward_step import make_reward_part
from dollar_jax.train.state import (Role, TrainState, accumulated_value_and_grad, all_finite, ema_on_device,
                                    guard_state, next_ema, optimizer_step, split_model)


FAKE_SAMPLES = ("fresh", "reuse")


@dataclasses.dataclass
class DistillStep:
    """The pure distillation step and what it needs to be jitted: roles, abstract params, the frozen teacher."""
    train_step: Callable
    roles: dict
    abstract_params: dict
    teacher_role: Role
    teacher_abstract: dict  # shapes/dtypes of the frozen teacher's parameters
    reward: object | None
    learning_rate: Callable  # the student's VSD + CD schedule (each role logs the rate it used as lr_<role>)
    grids: StudentGrids  # the student's training grids, warped by the schedule
    fake_init: Callable  # teacher params (pure dict) -> the fake score's initial params: a copy, or LoRA adapters


def optimizer_count(opt_state) -> jax.Array:
    """How many updates an optax state has applied (its schedule's step)."""
    counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    if not counts:
        raise ValueError("this optimiser keeps no step count")
    return counts[0][1]


def build_step(config, dit: DiTConfig, schedule, prediction_type: str, latent_shape, text_shape,
               expose_fake_samples: bool = False) -> DistillStep:
    """The jittable step for a student/fake of architecture `dit` (no data or weights needed: tools use it
    to compile the step abstractly). `expose_fake_samples` (tests) returns the fake score's training samples
    [fake_updates, B, ...] in the step's "_outputs"."""
    dc = config.distill
    if dc.fake_samples not in FAKE_SAMPLES:
        raise ValueError(f"distill.fake_samples must be one of {FAKE_SAMPLES}, got {dc.fake_samples!r}")
    if dc.grid_sampling not in GRID_SAMPLING:
        raise ValueError(f"distill.grid_sampling must be one of {GRID_SAMPLING}, got {dc.grid_sampling!r}")
    student_opt, lr = make_optimizer(dc.optim, dc.steps)
    fake_opt, fake_lr = make_optimizer(dc.fake_optim, dc.steps * dc.fake_updates)
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
                                                ema_dtype=dc.ema_dtype or None, ema_memory=dc.ema_memory,
                                                opt_memory=dc.optim_memory, guard_updates=guard)
    # The fake score's optimiser state stays on the device whatever optim_memory says: its updates run in the
    # fake-updates loop, whose carried state XLA keeps in one memory.
    fake_role, _ = split_model("fake", model, fake_opt, param_dtype=dc.fake_dtype or None, guard_updates=guard)
    fake_abstract = abstract_params
    if dc.fake_lora_rank:
        # The fake score as the frozen teacher plus trained low-rank adapters (models/lora.py): its state is the
        # adapters and their optimiser state instead of a whole DiT's.
        fake_abstract = jax.eval_shape(lambda p: lora_init(p, dc.fake_lora_rank, jax.random.key(0)), abstract_params)
        fake_role = dataclasses.replace(fake_role, axes=lora_axes(fake_role.axes),
                                        lora_scale=lora_scale(dc.fake_lora_rank, dc.fake_lora_alpha))

    def fake_init(teacher_params):
        """The fake score starts as the teacher: a copy, or adapters that add nothing yet."""
        if dc.fake_lora_rank:
            return lora_init(teacher_params, dc.fake_lora_rank, jax.random.key(config.seed + 2))
        return jax.tree.map(jnp.copy, teacher_params)
    reward = make_reward_part(config, latent_shape, text_shape) if config.reward.enabled else None
    ft_role = ft_lr = None
    if reward is not None and reward.weight:
        # L_FT is its own generator step, so it gets its own optimiser state: sharing the VSD + CD state would
        # advance the schedule and Adam's bias correction twice per iteration and mix two gradients' moments.
        ft_opt, ft_lr = make_optimizer(config.reward.ft_optim, max(1, dc.steps - config.reward.ft_start_step))
        ft_role = dataclasses.replace(student_role, name="student_ft", optimizer=ft_opt, ema_decay=None,
                                      params_of="student")

    grids = student_grids(tuple(dc.student_grids) or tuple(dc.student_timesteps), schedule)
    per_example = dc.grid_sampling == "per_example"
    cd_grid = schedule.sampling_timesteps(dc.cd_grid)
    t_min, t_max = dc.vsd_t_min * schedule.t_max, dc.vsd_t_max * schedule.t_max
    use_vsd, fresh = bool(dc.vsd_weight), dc.fake_samples == "fresh"

    def consistency_fn(params, text, role=student_role):
        denoise = make_denoiser(role.module(params), schedule, prediction_type, text)
        return consistency_denoiser(denoise, schedule, dc.sigma_data, dc.timestep_scale)

    def student_sample(params, text, data, key, noise=None):
        """The student's training sample x = G(eps) (gradient w.r.t. `params` through the last step only)."""
        k_n, k_s = jax.random.split(key)
        eps = jax.random.normal(k_n, data.shape, jnp.float32) if noise is None else noise
        return training_sample(consistency_fn(params, text), consistency_fn(jax.lax.stop_gradient(params), text),
                               eps, grids, schedule, k_s, dc.sample_mode, data, per_example)[0]

    def train_step(state: TrainState, frozen, batch):
        k_noise, k_sample, k_vsd, k_cd, k_fake = jax.random.split(state.step_key(), 5)
        text, data, null = batch["text"], batch["latents"], frozen["null_text"]
        teacher = teacher_role.module(frozen["teacher"])
        fake_params = jax.lax.stop_gradient(state.params["fake"])
        # The CD target reads the EMA on the device (copied in from host memory if it waits there).
        ema = ema_on_device(student_role, state.ema.get("student"))
        noise = jax.random.normal(k_noise, data.shape, jnp.float32)

        def generator_loss(params, text, data, noise, k_sample, k_vsd, k_cd):
            real = make_denoiser(teacher, schedule, prediction_type, text, null, dc.real_guidance,
                                 dc.real_convention)
            fake = make_denoiser(fake_role.module(fake_params, frozen["teacher"]), schedule, prediction_type, text)
            student = consistency_fn(params, text)
            terms, aux = {}, {}
            if use_vsd:  # with beta_VSD = 0 neither the sample nor the fake score is computed
                x, _ = training_sample(student, consistency_fn(jax.lax.stop_gradient(params), text), noise, grids,
                                       schedule, k_sample, dc.sample_mode, data, per_example)
                aux["x"] = jax.lax.stop_gradient(x)
                terms["loss_vsd"], vsd_aux = vsd_loss(x, real, fake, k_vsd, schedule, t_min, t_max)
                aux.update({k: v for k, v in vsd_aux.items() if k != "t"})  # VSD's health scalars
            if dc.cd_weight:
                cd_teacher = make_denoiser(teacher, schedule, prediction_type, text, null, dc.cd_guidance,
                                           dc.cd_convention)
                terms["loss_cd"], _ = consistency_loss(
                    lambda x_t, t: student(x_t, t)[0], lambda x_t, t: consistency_fn(ema, text)(x_t, t)[0],
                    ddim_teacher_solve(cd_teacher, schedule), data, k_cd, schedule, cd_grid, dc.cd_steps,
                    dc.cd_distance, dc.huber_c)
            total = dc.vsd_weight * terms.get("loss_vsd", 0.0) + dc.cd_weight * terms.get("loss_cd", 0.0)
            return total, (terms, aux)

        (gen_loss, (terms, aux)), grads = accumulated_value_and_grad(
            generator_loss, state.params["student"], (text, data, noise), (k_sample, k_vsd, k_cd), dc.microbatches,
            has_aux=True)
        lr_student = lr(optimizer_count(state.opt_state["student"]))
        student, student_opt_state, g_student = optimizer_step(student_role, state.params["student"],
                                                               state.opt_state["student"], grads)
        params = {"student": student, "fake": state.params["fake"]}
        opt_states = dict(state.opt_state, student=student_opt_state)
        finite = all_finite(gen_loss, grads)
        metrics = dict(loss_generator=gen_loss, grad_norm_student=g_student, lr_student=lr_student, **terms,
                       **{k: v for k, v in aux.items() if k != "x"},
                       fake_score_updates=dc.fake_updates if use_vsd else 0)
        outputs = {}

        if use_vsd:  # the fake score learns the student's current distribution with the teacher's own objective
            batch_size = data.shape[0]

            def fake_update(carry, key):
                p_fake, opt_state = carry
                if fresh:  # DMD2 / FastVideo: new noise, a new caption order and a new sample every update
                    k_perm, k_sample_u, key = jax.random.split(key, 3)
                    order = jax.random.permutation(k_perm, batch_size)
                    t_u = text[order]
                    x_u = jax.lax.stop_gradient(student_sample(student, t_u, data[order], k_sample_u))
                else:  # re-noise the generator step's own samples (cheaper: no student evaluations)
                    t_u, x_u = text, aux["x"]

                def loss_fn(p, x, t, k):
                    return denoising_loss(fake_role.module(p, frozen["teacher"]), x, t, k, schedule,
                                          prediction_type)[0]

                lr_used = fake_lr(optimizer_count(opt_state))
                loss, g = accumulated_value_and_grad(loss_fn, p_fake, (x_u, t_u), (key,), dc.fake_microbatches)
                p_fake, opt_state, gnorm = optimizer_step(fake_role, p_fake, opt_state, g)
                ys = (loss, gnorm, all_finite(loss, g), lr_used, x_u if expose_fake_samples else None)
                return (p_fake, opt_state), ys

            (params["fake"], opt_states["fake"]), (fake_losses, fake_norms, fake_finite, fake_lrs, fake_x) = \
                jax.lax.scan(fake_update, (state.params["fake"], state.opt_state["fake"]),
                             jax.random.split(k_fake, dc.fake_updates))
            finite &= jnp.all(fake_finite)
            metrics.update(loss_fake=jnp.mean(fake_losses), grad_norm_fake=jnp.mean(fake_norms),
                           lr_fake=jnp.mean(fake_lrs),
                           **health_metrics(aux["x"], data, config.health, dc.repeat_captions))  # train/health.py
            if expose_fake_samples:
                outputs["fake_samples"] = fake_x

        if reward is not None:  # the LRM learns the labelled rewards; then the student climbs the LRM
            params["lrm"], opt_states["lrm"], lrm_metrics, lrm_finite = reward.lrm_update(
                state.params["lrm"], state.opt_state["lrm"], batch)
            metrics.update(lrm_metrics)
            finite &= lrm_finite
            if ft_role is not None:
                ft_key = jax.random.fold_in(state.step_key(), 1000)  # its own stream: the others stay as without it
                params["student"], opt_states["student_ft"], ft_metrics, ft_finite = reward.finetune_step(
                    ft_role, ft_lr, params["student"], params["lrm"], opt_states["student_ft"], student_sample,
                    text, data, ft_key, state.step, batch)
                metrics.update(ft_metrics)
                finite &= ft_finite
            # What the labeller scores: the student's samples of this step (drawn without gradient if VSD is off).
            outputs["student_x0"] = aux["x"] if use_vsd else jax.lax.stop_gradient(
                student_sample(state.params["student"], text, data, k_sample, noise))

        if outputs:
            metrics["_outputs"] = outputs
        emas = {} if ema is None else {"student": next_ema(student_role, state.ema["student"], params["student"],
                                                            finite)}
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_states, ema=emas)
        return guard_state(roles, finite, new, state), scalar_metrics(finite=finite, **metrics)

    roles = {"student": student_role, "fake": fake_role}
    shapes = {"student": abstract_params, "fake": fake_abstract}
    if reward is not None:
        roles["lrm"], shapes["lrm"] = reward.role, reward.abstract_params
    if ft_role is not None:
        roles["student_ft"] = ft_role
    return DistillStep(train_step, roles, shapes, teacher_role, teacher_abstract, reward, lr, grids, fake_init)


def step_flops(config, dit: DiTConfig, latent_shape, text_shape, reward) -> dict:
    """Analytic FLOPs per role of one step (train/flops.py); the small LRM is measured by XLA."""
    lrm = 0.0
    if reward is not None:
        module = reward.role.module(reward.abstract_params)
        x = jax.ShapeDtypeStruct((1, *latent_shape), jnp.float32)
        t = jax.ShapeDtypeStruct((1, *text_shape), jnp.float32)
        lrm = float(jax.jit(lambda a, b: module(a, b)).lower(x, t).cost_analysis().get("flops", 0.0))
    return distill_step_flops(config, dit, latent_shape, text_shape[0], lrm)
