"""The reward half of a DOLLAR iteration: LRM regression on labelled latents, then a generator step on L_FT.

Plugged into the DOLLAR step (dollar_jax/train/dollar_step.py) when config.reward.enabled. The host side
is the labeller (decode + pixel reward in a background thread); the device side is two pure updates.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dollar_jax.data.pipeline import host_batch_size
from dollar_jax.losses.reward import lrm_regression_loss, reward_finetune_loss
from dollar_jax.models.reward_models import LatentRewardModel, LRMConfig
from dollar_jax.rewards import reward_from_config
from dollar_jax.rewards.decoders import make_decoder
from dollar_jax.rewards.labeller import Labeller
from dollar_jax.train.optim import make_optimizer
from dollar_jax.train.state import all_finite, optimizer_step, split_model

LRM_KEYS = ("lrm_latents", "lrm_text", "lrm_score", "lrm_valid")


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
    labeller: Labeller | None = None

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

    def extra_inputs(self, done: int) -> dict:
        """The labelled batch step `done` trains the LRM on (zeros with valid = 0 before any label exists)."""
        n = host_batch_size(self.batch_size)  # reward.lrm_batch_size is global, like every batch size
        b = self.labeller.batch(done, n)
        if b is None:
            return {"lrm_latents": np.zeros((n, *self.latent_shape), np.float32),
                    "lrm_text": np.zeros((n, *self.text_shape), np.float32),
                    "lrm_score": np.zeros((n,), np.float32), "lrm_valid": np.zeros((n,), np.float32)}
        return {"lrm_latents": b["latents"], "lrm_text": b["text"], "lrm_score": b["score"],
                "lrm_valid": np.ones((n,), np.float32)}

    def abstract_inputs(self) -> dict:
        """Global shapes of the labelled inputs the step reads (for abstract compilation)."""
        n = self.batch_size
        return {"lrm_latents": jax.ShapeDtypeStruct((n, *self.latent_shape), jnp.float32),
                "lrm_text": jax.ShapeDtypeStruct((n, *self.text_shape), jnp.float32),
                "lrm_score": jax.ShapeDtypeStruct((n,), jnp.float32),
                "lrm_valid": jax.ShapeDtypeStruct((n,), jnp.float32)}

    def after_step(self, done: int, outputs: dict, raw_batch: dict) -> None:
        """Send the real latents and the student's x0 predictions of step `done` to the labeller."""
        prompts = [c.decode() if isinstance(c, bytes) else str(c) for c in raw_batch["caption"]]
        latents = np.concatenate([np.asarray(raw_batch["latents"], np.float32), local(outputs["student_x0"])])
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
        keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(any_valid, a, b), n, o)
        return keep(new_params, params), keep(new_opt, opt_state), {
            "loss_lrm": loss, "grad_norm_lrm": gnorm, "lrm_active": any_valid.astype(jnp.float32)}, all_finite(loss, grads)

    def finetune_grads(self, student_params, lrm_params, sample_fn, text, data, key):
        """Gradient of weight * L_FT for the student, accumulated over `microbatches` chunks of the batch.

        `sample_fn(params, text, data, key)` draws the student's training samples (with gradient)."""
        lrm = self.role.module(jax.lax.stop_gradient(lrm_params))
        n = self.microbatches
        split = lambda a: a.reshape(n, a.shape[0] // n, *a.shape[1:])

        def one(carry, inputs):
            k, t, d = inputs
            loss, g = jax.value_and_grad(
                lambda p: self.weight * reward_finetune_loss(lrm, sample_fn(p, t, d, k), t))(student_params)
            return jax.tree.map(jnp.add, carry, g), loss

        zeros = jax.tree.map(jnp.zeros_like, student_params)
        grads, losses = jax.lax.scan(one, zeros, (jax.random.split(key, n), split(text), split(data)))
        return jax.tree.map(lambda g: g / n, grads), jnp.mean(losses) / self.weight


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
    make = lambda: LatentRewardModel(cfg, rngs=nnx.Rngs(config.seed + 1))
    role, abstract_params = split_model("lrm", make(), optimizer)
    if config.distill.batch_size % r.ft_microbatches:
        raise ValueError(f"reward.ft_microbatches={r.ft_microbatches} must divide distill.batch_size")
    return RewardPart(role=role, abstract_params=abstract_params, make_params=lambda: split_model("l", make())[1],
                      weight=float(r.weight), microbatches=int(r.ft_microbatches), batch_size=int(r.lrm_batch_size),
                      latent_shape=tuple(latent_shape), text_shape=tuple(text_shape))
