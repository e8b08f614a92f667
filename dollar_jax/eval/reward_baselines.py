"""The latent reward model against its alternatives (the paper's Table 8.5): reward fine-tuning of one trained
few-step student by three methods, at equal steps, batch, learning rate and prompts, on the embedded world.

  lrm    DOLLAR's: a latent reward model (LRM) regresses the true reward of the student's own samples (decoded
         and scored on the host, so the reward may be non-differentiable), and the student climbs the LRM
         through its training sample (L_FT). Nothing is decoded in the backward pass.
  pixel  the differentiable pixel path: decode the student's training sample with the autoencoder and
         backpropagate a JAX twin of the reward through the decoder (differentiable rewards only).
  pg     policy gradient (DDPO-style REINFORCE) on the student's sampling chain: each consistency re-noising
         step x_{k+1} ~ N(alpha_{k+1} f(x_k, t_k), sigma_{k+1}^2) is a Gaussian policy; the true reward,
         standardised over the batch, weights the chain's log-likelihood gradient. Any reward.

Every method starts from the same student, uses the same optimiser (config.reward.ft_optim, the DOLLAR step's
L_FT optimiser), the same sample draw where it needs one (`training_sample`, as L_FT draws it) and the same
training prompts. Evaluation: fixed prompts x noise (the demo's evaluation prompts), 4-step sampling, before
and after: the true reward and caption adherence, and for the LRM its correlation with the true reward on
those samples over training. The CLI is benchmarks/reward_baselines.py; configs/demo.py:paper runs it too.
"""

from __future__ import annotations

import datetime
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dollar_jax import storage
from dollar_jax.checkpoint import load_autoencoder, load_dit, read_model_folder_config, teacher_parameterisation
from dollar_jax.data import arrays_dataset, world
from dollar_jax.data.text import text_encoder
from dollar_jax.diffusion.consistency import consistency_denoiser
from dollar_jax.diffusion.samplers import make_denoiser
from dollar_jax.diffusion.student import training_sample
from dollar_jax.eval import world_eval
from dollar_jax.eval.generate import make_generate, student_sampler
from dollar_jax.losses.reward import lrm_regression_loss, pearson, reward_finetune_loss
from dollar_jax.models.reward_models import make_lrm
from dollar_jax.paths import Paths
from dollar_jax.rewards import make_reward, registered
from dollar_jax.rewards.differentiable import DIFFERENTIABLE
from dollar_jax.train.optim import make_optimizer
from dollar_jax.train.reward_step import lrm_config

METHODS = ("lrm", "pixel", "pg")
RESULTS = "reward_baselines.json"


def parse_specs(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """"sharpness:lrm,pixel,pg;jpeg_compressibility:lrm,pg" -> [(reward, methods), ...]; a clear error on a
    bad entry (an unknown reward or method, the pixel path on a reward without a differentiable twin)."""
    specs = []
    for entry in (e.strip() for e in text.split(";") if e.strip()):
        reward, _, methods = entry.partition(":")
        methods = tuple(m.strip() for m in methods.split(",") if m.strip()) or METHODS
        if reward not in registered():
            raise ValueError(f"reward baseline {entry!r}: unknown reward {reward!r}; registered: {registered()}")
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"reward baseline {entry!r}: unknown method(s) {unknown}; choose from {METHODS}")
        if "pixel" in methods and reward not in DIFFERENTIABLE:
            raise ValueError(f"reward baseline {entry!r}: the pixel path needs a differentiable reward "
                             f"({sorted(DIFFERENTIABLE)})")
        specs.append((reward, methods))
    return specs


# ------------------------------------------------------------------------------------------- the policy

def chain_log_likelihood(denoise, xs: jax.Array, timesteps, schedule) -> jax.Array:
    """log p(x_1..x_K | x_0) [B] of a consistency sampling chain under `denoise`, up to a constant.

    xs [K+1, B, ...]: x_0 (the starting noise) then each re-noised state; transition k is
    x_{k+1} ~ N(alpha(t_{k+1}) f(x_k, t_k), sigma(t_{k+1})^2 I), for the K = len(timesteps) - 1 stochastic steps
    (the last step's x0 is a deterministic function of x_K)."""
    total = jnp.zeros(xs.shape[1], jnp.float32)
    for k in range(len(timesteps) - 1):
        x0, _ = denoise(xs[k], jnp.full(xs.shape[1:2], timesteps[k], jnp.float32))
        a, s = schedule.alpha_sigma(jnp.asarray(timesteps[k + 1], jnp.float32))
        resid = (xs[k + 1] - a * x0) / s
        total = total - 0.5 * jnp.sum(resid.reshape(resid.shape[0], -1) ** 2, axis=1)
    return total


def rollout(denoise, noise: jax.Array, timesteps, schedule, key) -> tuple[jax.Array, jax.Array]:
    """(xs [K+1, B, ...], final x0 [B, ...]): the student's stochastic multistep sampling, every state kept."""
    xs, x = [noise], noise
    for k, t in enumerate(timesteps):
        x0, _ = denoise(x, jnp.full(x.shape[:1], t, jnp.float32))
        if k + 1 == len(timesteps):
            return jnp.stack(xs), x0
        a, s = schedule.alpha_sigma(jnp.asarray(timesteps[k + 1], jnp.float32))
        x = a * x0 + s * jax.random.normal(jax.random.fold_in(key, k), x.shape, jnp.float32)
        xs.append(x)
    raise ValueError("an empty grid")


# ------------------------------------------------------------------------------------------- the benchmark

class Setup:
    """The student, its sampler, the autoencoder, the prompts and the optimiser every method shares."""

    def __init__(self, config, workdir: str, student: str, batch: int, eval_prompts: int, eval_samples: int):
        self.config, self.batch = config, batch
        paths = Paths.of(config, workdir)
        self.folder = os.path.join(paths.workdir, student)
        self.schedule, self.prediction_type, _ = teacher_parameterisation(self.folder)
        self.graphdef, self.params0 = nnx.split(load_dit(self.folder))
        self.spec = student_sampler(read_model_folder_config(self.folder, "student")[0], 4)
        self.timesteps = tuple(self.spec.timesteps)
        self.ae = load_autoencoder(paths.autoencoder)
        self.wcfg = world.world_config(config)
        encoder = text_encoder(config)
        train = world.prompt_set(self.wcfg, 256, seed=config.demo.seed + 1)
        self.train_captions = [world.caption(c, self.wcfg) for c in train]
        self.train_text = encoder.encode(self.train_captions)
        combos = world.prompt_set(self.wcfg, eval_prompts, seed=config.demo.seed)
        groups = np.repeat(np.arange(len(combos)), eval_samples)
        self.eval_factors = {f: np.asarray([combos[g][f] for g in groups]) for f in world.FACTORS}
        self.eval_captions = [world.caption(combos[g], self.wcfg) for g in groups]
        self.eval_text = jnp.asarray(encoder.encode(self.eval_captions))
        self.latent_shape = tuple(arrays_dataset.feature_shapes(paths.data, config.data.latents)["latents"][1])
        self.eval_noise = jax.random.normal(jax.random.key(1234), (len(groups), *self.latent_shape))
        self._generate = make_generate(lambda p: nnx.merge(self.graphdef, p), self.schedule, self.prediction_type,
                                       self.spec)
        self.optimizer, _ = make_optimizer(config.reward.ft_optim, 10**6)

    def denoiser(self, params, text):
        apply = nnx.merge(self.graphdef, params)
        d = make_denoiser(apply, self.schedule, self.prediction_type, text)
        return consistency_denoiser(d, self.schedule, self.spec.sigma_data, self.spec.timestep_scale)

    def training_x0(self, params, text, key):
        """The student's training sample with gradient, as the DOLLAR step's L_FT draws it."""
        k_noise, k_sample = jax.random.split(key)
        noise = jax.random.normal(k_noise, (text.shape[0], *self.latent_shape))
        stopped = jax.lax.stop_gradient(params)
        x0, _ = training_sample(self.denoiser(params, text), self.denoiser(stopped, text), noise, self.timesteps,
                                self.schedule, k_sample)
        return x0

    def text_batch(self, step: int):
        idx = (np.arange(self.batch) + step * self.batch) % len(self.train_captions)
        return jnp.asarray(self.train_text[idx]), [self.train_captions[i] for i in idx]

    def evaluate(self, params, reward, lrm=None) -> dict:
        latents = np.asarray(self._generate(params, self.eval_noise, self.eval_text, None, jax.random.key(7)))
        videos = world_eval.decode(self.ae, latents)
        true = np.asarray(reward(videos, self.eval_captions), np.float32)
        adherence = world.adherence(videos, self.eval_factors, self.wcfg)
        out = {"reward": float(true.mean()), "adherence": float(np.mean([adherence[f] for f in world.FACTORS]))}
        if lrm is not None:
            module, lrm_params = lrm
            pred = module(lrm_params, jnp.asarray(latents), self.eval_text)
            out["lrm_true_correlation"] = float(pearson(pred, jnp.asarray(true)))
        return out


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    return {"argument_bytes": int(m.argument_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes)}


def _host_reward(setup, reward, latents, captions) -> np.ndarray:
    return np.asarray(reward(world_eval.decode(setup.ae, np.asarray(latents)), captions), np.float32)


def run_method(method: str, setup: Setup, reward_name: str, steps: int, seed: int) -> dict:
    reward = make_reward(reward_name)
    opt = setup.optimizer
    params, opt_state = setup.params0, setup.optimizer.init(setup.params0)
    text0, _ = setup.text_batch(0)
    key = jax.random.key(seed)
    programs, lrm = {}, None

    if method == "lrm":
        r = setup.config.reward
        cfg = lrm_config(setup.config, setup.latent_shape[-1], text0.shape[-1])
        lrm_graph, lrm_params = nnx.split(make_lrm(cfg, rngs=nnx.Rngs(seed + 1)))
        lrm_opt, _ = make_optimizer(r.lrm_optim, 10**6)
        lrm_opt_state = lrm_opt.init(lrm_params)
        lrm_module = lambda p, z, t: nnx.merge(lrm_graph, p)(z, t)  # noqa: E731
        lrm = (lrm_module, lrm_params)

        def lrm_update(lp, lo, z, t, score):
            (loss, _), g = jax.value_and_grad(
                lambda p: lrm_regression_loss(lambda z_, t_: lrm_module(p, z_, t_), z, t, score,
                                              jnp.ones_like(score)), has_aux=True)(lp)
            u, lo = lrm_opt.update(g, lo, lp)
            return optax.apply_updates(lp, u), lo, loss

        def ft_update(p, o, lp, t, k):
            def loss_fn(p_):
                return reward_finetune_loss(lambda z_, t_: lrm_module(jax.lax.stop_gradient(lp), z_, t_),
                                            setup.training_x0(p_, t, k), t)
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, o = opt.update(g, o, p)
            return optax.apply_updates(p, u), o, loss

        # Compiled ahead of the timed steps (and run as compiled): the step times hold no compilation.
        sample = jax.jit(lambda p, t, k: jax.lax.stop_gradient(setup.training_x0(p, t, k))).lower(
            params, text0, key).compile()
        z0 = jax.ShapeDtypeStruct((setup.batch, *setup.latent_shape), jnp.float32)
        lrm_step = jax.jit(lrm_update).lower(lrm_params, lrm_opt_state, z0, text0, jnp.zeros(setup.batch)).compile()
        ft_step = jax.jit(ft_update).lower(params, opt_state, lrm_params, text0, key).compile()
        programs = {"sample": sample, "lrm_update": lrm_step, "ft_update": ft_step}
        buffer_z, buffer_t, buffer_s = [], [], []

        def one_step(i, params, opt_state):
            nonlocal lrm_params, lrm_opt_state
            text, captions = setup.text_batch(i)
            k_label, k_ft, k_pick = jax.random.split(jax.random.fold_in(key, i), 3)
            z = sample(params, text, k_label)
            # The DOLLAR step labels with a lag (an asynchronous labeller); here the labels are waited for, which
            # charges the method its decode + reward time in full.
            buffer_z.append(np.asarray(z)), buffer_t.append(np.asarray(text))
            buffer_s.append(_host_reward(setup, reward, z, captions))
            window = slice(-r.label_window, None) if r.label_window else slice(None)
            zs, ts, ss = (np.concatenate(b[window]) for b in (buffer_z, buffer_t, buffer_s))
            pick = np.asarray(jax.random.choice(k_pick, len(zs), (setup.batch,), replace=len(zs) < setup.batch))
            lrm_params, lrm_opt_state, _ = lrm_step(lrm_params, lrm_opt_state, zs[pick], ts[pick], ss[pick])
            params, opt_state, loss = ft_step(params, opt_state, lrm_params, text, k_ft)
            return params, opt_state, loss

    elif method == "pixel":
        if reward_name not in DIFFERENTIABLE:
            raise ValueError(f"The pixel path needs a differentiable reward ({sorted(DIFFERENTIABLE)}), "
                             f"not {reward_name!r}")
        reward_jax = DIFFERENTIABLE[reward_name]

        def pixel_update(p, o, t, k):
            def loss_fn(p_):
                videos = jnp.clip(setup.ae.decode(setup.training_x0(p_, t, k)), 0.0, 1.0)
                return -jnp.mean(reward_jax(videos))
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, o = opt.update(g, o, p)
            return optax.apply_updates(p, u), o, loss

        step = jax.jit(pixel_update).lower(params, opt_state, text0, key).compile()
        programs = {"pixel_update": step}

        def one_step(i, params, opt_state):
            text, _ = setup.text_batch(i)
            return step(params, opt_state, text, jax.random.fold_in(key, i))

    elif method == "pg":
        roll = jax.jit(lambda p, t, k: rollout(setup.denoiser(p, t), jax.random.normal(
            jax.random.fold_in(k, 99), (t.shape[0], *setup.latent_shape)), setup.timesteps, setup.schedule, k))

        def pg_update(p, o, xs, t, advantage):
            def loss_fn(p_):
                logp = chain_log_likelihood(setup.denoiser(p_, t), xs, setup.timesteps, setup.schedule)
                return -jnp.mean(advantage * logp)
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, o = opt.update(g, o, p)
            return optax.apply_updates(p, u), o, loss

        roll = roll.lower(params, text0, key).compile()
        xs0 = jax.ShapeDtypeStruct((len(setup.timesteps), setup.batch, *setup.latent_shape), jnp.float32)
        step = jax.jit(pg_update).lower(params, opt_state, xs0, text0, jnp.zeros(setup.batch)).compile()
        programs = {"rollout": roll, "pg_update": step}

        def one_step(i, params, opt_state):
            text, captions = setup.text_batch(i)
            xs, x0 = roll(params, text, jax.random.fold_in(key, i))
            scores = _host_reward(setup, reward, x0, captions)
            advantage = (scores - scores.mean()) / (scores.std() + 1e-6)  # DDPO's per-batch standardisation
            return step(params, opt_state, xs, text, jnp.asarray(advantage))
    else:
        raise ValueError(f"Unknown method {method!r}; choose from {METHODS}")

    before = setup.evaluate(params, reward, lrm)
    times, curve = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        params, opt_state, loss = one_step(i, params, opt_state)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - t0)
        if not np.isfinite(float(loss)):
            raise FloatingPointError(f"{method}: non-finite loss at step {i + 1}")
        if lrm is not None and (i + 1) % max(1, steps // 4) == 0:
            curve.append({"step": i + 1, **setup.evaluate(params, reward, (lrm[0], lrm_params))})
    after = setup.evaluate(params, reward, (lrm[0], lrm_params) if lrm is not None else None)
    memory = {name: _memory(c) for name, c in programs.items()}
    return {"method": method, "reward_name": reward_name, "steps": steps, "batch": setup.batch, "before": before,
            "after": after, "reward_gain": after["reward"] - before["reward"],
            "adherence_change": after["adherence"] - before["adherence"],
            "seconds_per_step": float(np.median(times)),
            "peak_temp_bytes": max((m.get("temp_bytes", 0) for m in memory.values()), default=0),
            "programs": memory, "curve": curve}


def table(rows: list[dict]) -> list[str]:
    """Markdown table lines, one row per method (the benchmark's output and REPORT.md's section)."""
    lines = ["| method | reward | steps x batch | reward before | after | gain | adherence before | after | "
             "s / step | largest program's temporaries (MiB) | LRM-vs-true correlation over training |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        corr = ", ".join(f"{c['step']}: {c['lrm_true_correlation']:.2f}" for c in r["curve"]) or "-"
        lines.append(f"| {r['method']} | {r['reward_name']} | {r['steps']} x {r['batch']} | "
                     f"{r['before']['reward']:.4f} | {r['after']['reward']:.4f} | {r['reward_gain']:+.4f} | "
                     f"{r['before']['adherence']:.3f} | {r['after']['adherence']:.3f} | {r['seconds_per_step']:.3f} | "
                     f"{r['peak_temp_bytes'] / 2**20:.1f} | {corr} |")
    return lines


def markdown(rows: list[dict], command: str) -> str:
    """The table under the command, machine and date that produced it."""
    return "\n".join([f"`{command}` ({platform.node()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}, "
                      f"{datetime.date.today()})", "", *table(rows)]) + "\n"


def run_for_demo(config, workdir: str, student: str, out_path: str) -> list[dict]:
    """Every configured baseline (config.demo.reward_baselines) from the demo's `student`, written to `out_path`."""
    d = config.demo
    setup = Setup(config, workdir, student, config.distill.batch_size, d.prompts, min(4, d.samples_per_prompt))
    rows = [run_method(method, setup, reward, d.reward_baseline_steps, config.seed)
            for reward, methods in parse_specs(d.reward_baselines) for method in methods]
    storage.write_json(out_path, rows, indent=1)
    return rows
