"""The DOLLAR step on a tiny random DiT (no trained world): what the fake score trains on, the L_FT step's own
optimiser, skipping VSD, and the flow shift on every timestep draw."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dollar_jax.config import base_config, embedded_world
from dollar_jax.diffusion import FlowSchedule, VPSchedule
from dollar_jax.models.dit import WanDiT
from dollar_jax.models.dit_config import DiTConfig
from dollar_jax.train.dollar_step import build_step, optimizer_count
from dollar_jax.train.state import init_state, split_model

LATENT, TEXT, BATCH = (1, 4, 4, 16), (4, 32), 4


def tiny_config(**distill):
    c = embedded_world(base_config(), quick=True)
    c.model.update(dict(num_layers=1, ffn_dim=32))
    c.distill.update(dict(steps=10, batch_size=BATCH, fake_updates=3, cd_steps=2, cd_grid=10))
    c.distill.update(distill)
    c.reward.update(dict(lrm_batch_size=BATCH, lrm_width=8))
    return c


def run_steps(config, n, gate=1.0, expose=False, schedule=VPSchedule(), prediction="conjugate_v"):
    """n steps of the jitted step from a random teacher copy; returns (states, metrics) per step."""
    dit = DiTConfig.from_dict(config.model.to_dict())
    step = build_step(config, dit, schedule, prediction, LATENT, TEXT, expose_fake_samples=expose)
    _, teacher = split_model("t", WanDiT(dit, rngs=nnx.Rngs(3)))
    # adaLN-zero leaves a fresh DiT constant in its input; perturb the head so samples depend on the noise.
    teacher["proj_out"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(4), teacher["proj_out"]["kernel"].shape)
    params = {"student": teacher, "fake": teacher}
    if step.reward is not None:
        params["lrm"] = step.reward.make_params()
    state = init_state(step.roles, params, 0)
    frozen = {"teacher": teacher, "null_text": jnp.zeros(TEXT)}
    fn = jax.jit(step.train_step)
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        batch = {"latents": rng.normal(size=(BATCH, *LATENT)).astype(np.float32),
                 "text": rng.normal(size=(BATCH, *TEXT)).astype(np.float32)}
        if step.reward is not None:
            batch.update(lrm_latents=rng.normal(size=(BATCH, *LATENT)).astype(np.float32),
                         lrm_text=rng.normal(size=(BATCH, *TEXT)).astype(np.float32),
                         lrm_score=rng.normal(size=(BATCH,)).astype(np.float32),
                         lrm_valid=np.ones((BATCH,), np.float32), ft_gate=np.full((BATCH,), gate, np.float32))
        state, metrics = fn(state, frozen, batch)
        out.append((state, jax.device_get(metrics)))
    return step, out


def _distinct_rows(x):
    rows = np.asarray(x).reshape(-1, int(np.prod(x.shape[-4:])))
    return len({hashlib.sha1(r.tobytes()).hexdigest() for r in rows})


@pytest.mark.parametrize("mode, expected", [("fresh", 3 * BATCH), ("reuse", BATCH)])
def test_fake_score_sees_fresh_samples_every_update(mode, expected):
    _, [(_, m)] = run_steps(tiny_config(fake_samples=mode), 1, expose=True)
    samples = m["_outputs"]["fake_samples"]
    assert samples.shape == (3, BATCH, *LATENT)
    assert np.all(np.isfinite(samples)) and bool(m["finite"])
    assert _distinct_rows(samples) == expected
