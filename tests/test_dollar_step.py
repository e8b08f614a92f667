"""The DOLLAR step on a tiny random DiT (no trained world): what the fake score trains on, the L_FT step's own
optimiser, skipping VSD, and the flow shift on every timestep draw."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dollar_jax.compile_effort import step_options
from dollar_jax.config import base_config, embedded_world
from dollar_jax.diffusion import VPSchedule
from dollar_jax.models.dit import WanDiT
from dollar_jax.models.dit_config import DiTConfig
from dollar_jax.parallel import make_mesh
from dollar_jax.train.dollar_step import build_step, optimizer_count
from dollar_jax.train.state import accumulated_value_and_grad, init_state, split_model

LATENT, TEXT, BATCH = (1, 4, 4, 16), (4, 32), 4


def tiny_config(**distill):
    c = embedded_world(base_config(), quick=True)
    c.model.update(dict(num_layers=1, ffn_dim=32))
    c.distill.update(dict(steps=10, batch_size=BATCH, fake_updates=3, cd_steps=2, cd_grid=10))
    c.distill.update(distill)
    c.reward.update(dict(lrm_batch_size=BATCH, lrm_width=32))
    return c


def run_steps(config, n, gates=None, expose=False, schedule=VPSchedule(), prediction="conjugate_v"):
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
    fn = jax.jit(step.train_step, compiler_options=step_options("light"))  # as config.step_compile="light"
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        batch = {"latents": rng.normal(size=(BATCH, *LATENT)).astype(np.float32),
                 "text": rng.normal(size=(BATCH, *TEXT)).astype(np.float32)}
        if step.reward is not None:
            batch.update(lrm_latents=rng.normal(size=(BATCH, *LATENT)).astype(np.float32),
                         lrm_text=rng.normal(size=(BATCH, *TEXT)).astype(np.float32),
                         lrm_score=rng.normal(size=(BATCH,)).astype(np.float32),
                         lrm_valid=np.ones((BATCH,), np.float32), ft_gate=np.full((BATCH,), (gates or [1.0] * n)[i], np.float32))
        state, metrics = fn(state, frozen, batch)
        out.append((state, jax.device_get(metrics)))
    return step, out


def _distinct_rows(x):
    rows = np.asarray(x).reshape(-1, int(np.prod(x.shape[-4:])))
    return len({hashlib.sha1(r.tobytes()).hexdigest() for r in rows})


@pytest.fixture(scope="module")
def fresh_with_reward():
    """One compile: fresh fake samples, the LRM and L_FT from step 2 on, ramped over 2 L_FT steps; every
    gradient accumulated over 2 micro-batches."""
    c = tiny_config(fake_samples="fresh", cd_weight=0.0, microbatches=2, fake_microbatches=2)
    c.reward.update(dict(enabled=True, weight=1.0, ft_start_step=1, ft_ramp_steps=2, ft_microbatches=2))
    c.reward.ft_optim.learning_rate = 3e-4
    return run_steps(c, 4, expose=True, gates=(1.0, 1.0, 0.0, 1.0))


@pytest.mark.slow  # ~60 s on 2 busy cores: one compile of the whole step
def test_fresh_fake_samples_are_new_every_update(fresh_with_reward):
    _, steps = fresh_with_reward
    for _, m in steps:
        samples = m["_outputs"]["fake_samples"]
        assert samples.shape == (3, BATCH, *LATENT) and np.all(np.isfinite(samples)) and bool(m["finite"])
        assert _distinct_rows(samples) == 3 * BATCH  # fake_updates x B distinct samples per iteration
        assert m["fake_score_updates"] == 3


@pytest.mark.slow
def test_reused_fake_samples_are_the_generator_steps():
    _, [(_, m)] = run_steps(tiny_config(fake_samples="reuse", cd_weight=0.0), 1, expose=True)
    samples = m["_outputs"]["fake_samples"]
    assert _distinct_rows(samples) == BATCH
    np.testing.assert_array_equal(samples[0], samples[2])


@pytest.mark.slow
def test_lft_has_its_own_optimiser_state_counting_lft_steps(fresh_with_reward):
    step, steps = fresh_with_reward
    assert step.roles["student_ft"].param_owner == "student" and "student_ft" not in step.abstract_params
    active = [m["ft_active"] for _, m in steps]
    assert active == [0.0, 1.0, 0.0, 1.0]  # step 1: before ft_start_step; step 3: the host gate was closed
    for i, (state, m) in enumerate(steps):
        assert int(optimizer_count(state.opt_state["student"])) == i + 1  # VSD(+CD) steps: one per iteration
        assert int(optimizer_count(state.opt_state["student_ft"])) == sum(active[: i + 1])  # L_FT steps only
        assert m["lr_student"] == pytest.approx(1e-4) and m["lr_fake"] == pytest.approx(2e-4)
    assert [m["lr_ft"] for _, m in steps] == pytest.approx([0.0, 3e-4, 0.0, 3e-4])
    assert [m["ft_scale"] for _, m in steps] == pytest.approx([0.0, 0.5, 0.0, 1.0])  # the ramp over 2 L_FT steps
    # A closed gate leaves the student as the VSD step left it: no L_FT update, no moments touched.
    s2, s3 = steps[1][0], steps[2][0]
    for a, b in zip(jax.tree.leaves(s2.opt_state["student_ft"]), jax.tree.leaves(s3.opt_state["student_ft"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_zero_vsd_weight_skips_the_sample_and_the_fake_score():
    config = tiny_config(vsd_weight=0.0, cd_steps=1, cd_grid=4, microbatches=2)
    _, [(state, m)] = run_steps(config, 1)
    assert m["fake_score_updates"] == 0 and "loss_fake" not in m and "loss_vsd" not in m and "loss_cd" in m
    np.testing.assert_allclose(m["loss_generator"], config.distill.cd_weight * m["loss_cd"], rtol=1e-6)  # CD only
    assert int(optimizer_count(state.opt_state["fake"])) == 0


def test_accumulated_gradient_is_the_mean_over_micro_batches_with_their_own_draws():
    """The generator's and the fake score's accumulation: chunk c of n sees rows c*B/n.. with the keys
    split(key, n)[c]; the result is the mean of the chunks' values and gradients, per-row aux put back in order."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32), "b": jnp.ones((3,))}
    x, y = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32), jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)

    def loss(p, x, y, key):  # a mean over rows, with a random draw per row like VSD's timesteps
        noise = jax.random.normal(key, x.shape)
        pred = jnp.tanh((x + noise) @ p["w"] + p["b"])
        return jnp.mean((pred - y) ** 2), {"pred": pred, "scale": jnp.std(noise)}

    key = jax.random.key(7)
    whole = accumulated_value_and_grad(loss, params, (x, y), (key,), 1, has_aux=True)
    plain = jax.value_and_grad(loss, has_aux=True)(params, x, y, key)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(plain), strict=True):  # one chunk: the plain step
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    (value, aux), grads = accumulated_value_and_grad(loss, params, (x, y), (key,), 4, has_aux=True)
    chunks = [jax.value_and_grad(loss, has_aux=True)(params, x[2 * c:2 * c + 2], y[2 * c:2 * c + 2], k)
              for c, k in enumerate(jax.random.split(key, 4))]
    np.testing.assert_allclose(value, np.mean([v for (v, _), _ in chunks]), rtol=1e-6)
    np.testing.assert_allclose(aux["pred"], np.concatenate([a["pred"] for (_, a), _ in chunks]), rtol=1e-6)
    np.testing.assert_allclose(aux["scale"], np.mean([a["scale"] for (_, a), _ in chunks]), rtol=1e-6)
    for name in params:
        np.testing.assert_allclose(grads[name], np.mean([g[name] for _, g in chunks], axis=0), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="does not split into 3 equal micro-batches"):
        accumulated_value_and_grad(loss, params, (x, y), (key,), 3, has_aux=True)
    if jax.device_count() >= 8:  # chunks of 4 on 8 batch shards would each be replicated: refused
        with jax.set_mesh(make_mesh({"fsdp": 8})), pytest.raises(ValueError, match="8 batch shards"):
            accumulated_value_and_grad(loss, params, (x, y), (key,), 2, has_aux=True)
