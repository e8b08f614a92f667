"""The reward half of a DOLLAR iteration: LRM regression on labelled latents, then a generator step on L_FT.

Plugged into the DOLLAR step (dollar_jax/train/dollar_step.py) when config.reward.enabled. The host side
is the labeller (decode + pixel reward in a background thread) and the L_FT gate (opened when the LRM agrees
with the true reward on held-out latents); the device side is two pure updates, the second (L_FT) on its
own optimiser state, switched on by a start step and the gate, and ramped in.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dollar_jax.data.pipeline import host_batch_size
from dollar_jax.losses.reward import lrm_regression_loss, reward_finetune_loss
from dollar_jax.models.reward_models import LRMConfig, make_lrm
from dollar_jax.rewards import reward_from_config
from dollar_jax.rewards.decoders import make_decoder
from dollar_jax.rewards.labeller import Labeller
from dollar_jax.train.optim import make_optimizer
from dollar_jax.train.state import (accumulated_value_and_grad, all_finite, optimizer_step, select_if,
                                    split_model)

LRM_KEYS = ("lrm_latents", "lrm_text", "lrm_score", "lrm_valid", "ft_gate")


def lrm_config(config, latent_channels: int, text_dim: int) -> LRMConfig:
    r = config.reward
    return LRMConfig(kind=r.lrm_kind, latent_channels=latent_channels, width=r.lrm_width, text_dim=text_dim,
                     first_stride=r.lrm_first_stride)


@dataclasses.dataclass
class RewardPart:
    role: object
    abstract_params: dict
    make_params: object
    weight: float
    microbatches: int
    batch_size: int
    latent_shape: tuple
    text_shape: tuple
    ft_start_step: int = 0
    ft_ramp_steps: int = 0
    ft_min_correlation: float = -1.0  # -1: no gate (a correlation is never below -1)
    labeller: Labeller | None = None
    gate_open: bool = False  # host side: has the LRM's held-out correlation reached ft_min_correlation?

    # ---- host side ---------------------------------------------------------------------------------------
    def start_labeller(self, config, autoencoder_dir: str = "") -> None:
        """Start the labeller thread: decode with config.reward.decoder (the world's autoencoder at
        `autoencoder_dir`, or the Wan VAE) and score with config.reward.name.

        Several hosts: each labels the rows it read (its part of every global batch) and trains the LRM on
        its own labelled rows; the checkpoint keeps every host's labeller state apart (train/checkpointing.py)."""
        r = config.reward
        decode = make_decoder(r.decoder, autoencoder_dir=autoencoder_dir, vae_path=r.vae_path)
        self.labeller = Labeller(decode, reward_from_config(config), lag=r.label_lag, window=r.label_window,
                                 seed=config.seed)

    @property
    def gated(self) -> bool:
        return self.ft_min_correlation > -1.0

    def observe(self, evaluation: dict) -> None:
        """Host side: open the L_FT gate (for good) once the evaluator's LRM-vs-true-reward correlation on
        held-out latents reaches reward.ft_min_correlation."""
        corr = evaluation.get("lrm_true_correlation")
        if corr is not None and np.isfinite(corr) and corr >= self.ft_min_correlation:
            self.gate_open = True

    def extra_inputs(self, done: int) -> dict:
        """The labelled batch step `done` trains the LRM on (zeros with valid = 0 before any label exists), and
        the L_FT gate as a batch input (the step stays pure; the gate is host state saved with checkpoints)."""
        n = host_batch_size(self.batch_size)  # reward.lrm_batch_size is global, like every batch size
        gate = np.full((n,), 1.0 if self.gate_open or not self.gated else 0.0, np.float32)
        b = self.labeller.batch(done, n)
        if b is None:
            return {"lrm_latents": np.zeros((n, *self.latent_shape), np.float32),
                    "lrm_text": np.zeros((n, *self.text_shape), np.float32),
                    "lrm_score": np.zeros((n,), np.float32), "lrm_valid": np.zeros((n,), np.float32),
                    "ft_gate": gate}
        return {"lrm_latents": b["latents"], "lrm_text": b["text"], "lrm_score": b["score"],
                "lrm_valid": np.ones((n,), np.float32), "ft_gate": gate}

    def host_state(self) -> dict:
        return {**self.labeller.state(), "ft_gate_open": np.asarray(self.gate_open, np.int32)}

    def restore_host_state(self, state: dict) -> None:
        self.labeller.restore(state)
        self.gate_open = bool(np.asarray(state.get("ft_gate_open", 0)))

    def abstract_inputs(self) -> dict:
        """Global shapes of the labelled inputs the step reads (for abstract compilation)."""
        n = self.batch_size
        return {"lrm_latents": jax.ShapeDtypeStruct((n, *self.latent_shape), jnp.float32),
                "lrm_text": jax.ShapeDtypeStruct((n, *self.text_shape), jnp.float32),
                "lrm_score": jax.ShapeDtypeStruct((n,), jnp.float32),
                "lrm_valid": jax.ShapeDtypeStruct((n,), jnp.float32),
                "ft_gate": jax.ShapeDtypeStruct((n,), jnp.float32)}

    def after_step(self, done: int, outputs: dict | None, raw_batch: dict) -> None:
        """Send the real latents and the student's x0 predictions of step `done` to the labeller. The loop calls
        this once the step is known finite, with `outputs` None when it was not (skipped: nothing to label);
        a step with any non-finite latent is skipped too, so the labeller never decodes NaNs."""
        if outputs is None:
            self.labeller.skip(done)
            return
        prompts = [c.decode() if isinstance(c, bytes) else str(c) for c in raw_batch["caption"]]
        latents = np.concatenate([np.asarray(raw_batch["latents"], np.float32), local(outputs["student_x0"])])
        if not np.all(np.isfinite(latents)):
            # Never decode NaNs. The whole step is skipped rather than some rows, since every step keeps the same
            # rows (text row i % rows; the checkpoint stacks the window by step).
            self.labeller.skip(done)
            return
        # Both halves share the batch's text rows (latent i uses text i % rows): stored once.
        self.labeller.submit(done, latents, np.asarray(raw_batch["text"]), prompts + prompts)

    # ---- device side (pure) --------------------------------------------------------------------------------
    def lrm_update(self, params, opt_state, batch):
        def loss_fn(p):
            return lrm_regression_loss(self.role.module(p), batch["lrm_latents"], batch["lrm_text"],
                                       batch["lrm_score"], batch["lrm_valid"])

        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new_params, new_opt, gnorm = optimizer_step(self.role, params, opt_state, grads)
        any_valid = jnp.sum(batch["lrm_valid"]) > 0  # nothing labelled yet: leave the LRM as it is
        return select_if(any_valid, new_params, params), select_if(any_valid, new_opt, opt_state), {
            "loss_lrm": loss, "grad_norm_lrm": gnorm, "lrm_active": any_valid.astype(jnp.float32)}, all_finite(loss, grads)

    def finetune_step(self, ft_role, ft_lr, student_params, lrm_params, opt_state, sample_fn, text, data, key,
                      step, batch):
        """The L_FT generator step on its own optimiser state, when it is on (lax.cond: an off step costs
        nothing and leaves the L_FT optimiser's count unchanged). On from step reward.ft_start_step, once the
        host-side gate is open; the update is scaled by min(1, n / ft_ramp_steps) for its n-th step (Adam
        normalises the gradient, so the ramp scales the update: a ramp of beta_FT's effect, not of its value).
        Returns (student params, L_FT optimiser state, metrics, finite)."""
        active = (step >= self.ft_start_step) & (jnp.max(batch["ft_gate"]) > 0)
        count = optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1]
        ramp = (jnp.minimum(1.0, (count + 1.0) / self.ft_ramp_steps) if self.ft_ramp_steps
                else jnp.ones((), jnp.float32))

        def on(operands):
            params, opt = operands
            grads, loss = self.finetune_grads(params, lrm_params, sample_fn, text, data, key)
            # Through optimizer_step, as every update: its per-update NaN guard (nan_guard="update"), its
            # host-memory optimiser state (distill.optim_memory="host").
            params, opt, gnorm = optimizer_step(ft_role, params, opt, grads, update_scale=ramp)
            return params, opt, loss.astype(jnp.float32), gnorm.astype(jnp.float32), all_finite(loss, grads)

        def off(operands):
            params, opt = operands
            zero = jnp.zeros((), jnp.float32)
            return params, opt, zero, zero, jnp.ones((), bool)

        params, opt_state, loss, gnorm, finite = jax.lax.cond(active, on, off, (student_params, opt_state))
        on_f = active.astype(jnp.float32)
        return params, opt_state, {"loss_ft": loss, "grad_norm_ft": gnorm, "ft_active": on_f,
                                   "ft_scale": on_f * ramp, "lr_ft": on_f * ft_lr(count)}, finite

    def finetune_grads(self, student_params, lrm_params, sample_fn, text, data, key):
        """Gradient of weight * L_FT for the student, accumulated over `microbatches` chunks of the batch.

        `sample_fn(params, text, data, key)` draws the student's training samples (with gradient)."""
        lrm = self.role.module(jax.lax.stop_gradient(lrm_params))

        def loss_fn(p, t, d, k):
            return self.weight * reward_finetune_loss(lrm, sample_fn(p, t, d, k), t)

        # One chunk draws with split(key, 1)[0], as L_FT always has (several: split(key, n)[c] in both).
        key = jax.random.split(key, 1)[0] if self.microbatches == 1 else key
        loss, grads = accumulated_value_and_grad(loss_fn, student_params, (text, data), (key,), self.microbatches)
        return grads, loss / self.weight


def local(x) -> np.ndarray:
    """This host's rows of a (possibly multi-host) global batch array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.global_array_to_host_local_array(x, x.sharding.mesh, x.sharding.spec))
    return np.asarray(x)


def make_reward_part(config, latent_shape, text_shape) -> RewardPart:
    r = config.reward
    cfg = lrm_config(config, latent_shape[-1], text_shape[-1])
    optimizer, _ = make_optimizer(r.lrm_optim, config.distill.steps)
    make = lambda: make_lrm(cfg, rngs=nnx.Rngs(config.seed + 1))
    role, abstract_params = split_model("lrm", make(), optimizer)
    if config.distill.batch_size % r.ft_microbatches:
        raise ValueError(f"reward.ft_microbatches={r.ft_microbatches} must divide distill.batch_size")
    if r.label_lag < 2:
        raise ValueError(f"reward.label_lag={r.label_lag}: must be >= 2 (a step's samples reach the labeller only "
                         "once the next step has been dispatched and the step is known finite)")
    if r.ft_start_step < 0 or r.ft_ramp_steps < 0:
        raise ValueError("reward.ft_start_step and reward.ft_ramp_steps must be >= 0")
    if not -1.0 <= r.ft_min_correlation <= 1.0:
        raise ValueError(f"reward.ft_min_correlation must be in [-1, 1] (-1: no gate), got {r.ft_min_correlation}")
    return RewardPart(role=role, abstract_params=abstract_params, make_params=lambda: split_model("l", make())[1],
                      weight=float(r.weight), microbatches=int(r.ft_microbatches), batch_size=int(r.lrm_batch_size),
                      latent_shape=tuple(latent_shape), text_shape=tuple(text_shape),
                      ft_start_step=int(r.ft_start_step), ft_ramp_steps=int(r.ft_ramp_steps),
                      ft_min_correlation=float(r.ft_min_correlation))
