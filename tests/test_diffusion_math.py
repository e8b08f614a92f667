"""Schedules, prediction types, guidance conventions and the sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dollar_jax.diffusion import (
    PREDICTION_TYPES,
    FlowSchedule,
    VPSchedule,
    boundary_scalings,
    consistency_denoiser,
    from_x0_eps,
    guide,
    guided_output,
    make_denoiser,
    sample,
    to_x0_eps,
)

SCHEDULES = [VPSchedule(), VPSchedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
             VPSchedule(beta_schedule="cosine"), FlowSchedule(shift=3.0)]


def test_paper_timestep_grids():
    vp = VPSchedule()
    grid = vp.sampling_timesteps(50)
    np.testing.assert_array_equal(grid, np.arange(999, 0, -20))  # 999, 979, ..., 19
    np.testing.assert_array_equal(vp.sampling_timesteps(4), [999, 749, 499, 249])
    np.testing.assert_array_equal(vp.sampling_timesteps(2), [999, 499])
    np.testing.assert_array_equal(vp.sampling_timesteps(1), [999])


def test_flow_grid_is_shifted_towards_noise():
    flow = FlowSchedule(shift=3.0)
    grid = flow.sampling_timesteps(10) / 1000
    plain = np.linspace(1, 0, 11)[:-1]
    np.testing.assert_allclose(grid, 3 * plain / (1 + 2 * plain), rtol=1e-6)
    assert grid[0] == 1.0 and np.all(np.diff(grid) < 0) and np.all(grid[1:] > plain[1:])


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"{type(s).__name__}-{getattr(s, 'beta_schedule', 'flow')}")
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_prediction_types_round_trip(schedule, prediction_type):
    key = jax.random.key(0)
    x0, eps = jax.random.normal(key, (2, 4, 3, 3, 2)), jax.random.normal(jax.random.key(1), (2, 4, 3, 3, 2))
    t = jnp.asarray([120.0, 870.0])
    a, s = schedule.alpha_sigma(t)
    x_t = a[:, None, None, None, None] * x0 + s[:, None, None, None, None] * eps
    target = from_x0_eps(x0, eps, a, s, prediction_type)
    x0_hat, eps_hat = to_x0_eps(target, x_t, a, s, prediction_type)
    np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
    np.testing.assert_allclose(eps_hat, eps, atol=2e-4)


def test_conjugate_velocity_is_the_papers_formula():
    vp = VPSchedule()
    a, s = vp.alpha_sigma(jnp.asarray(500.0))
    x_t, v = jnp.asarray(0.3), jnp.asarray(-1.2)
    x0_hat, _ = to_x0_eps(v, x_t, a, s, "conjugate_v")
    np.testing.assert_allclose(x0_hat, (x_t + s * v) / (a + s), rtol=1e-6)


def test_vp_alpha_sigma_matches_alphas_cumprod():
    vp = VPSchedule()
    a, s = vp.alpha_sigma(jnp.arange(1000.0))
    np.testing.assert_allclose(a**2, vp.alphas_cumprod, rtol=1e-5)
    np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=1e-6)


def test_cfg_conventions_differ_by_one_in_scale():
    c, u = jnp.asarray([1.0, -2.0]), jnp.asarray([0.5, 0.25])
    for w in (0.0, 1.0, 3.5, 7.5):
        np.testing.assert_allclose(guide(c, u, w, "cond_anchor"), guide(c, u, w + 1.0, "uncond_anchor"), rtol=1e-6)
    np.testing.assert_allclose(guide(c, u, 1.0, "uncond_anchor"), c)  # no guidance
    np.testing.assert_allclose(guide(c, u, 0.0, "cond_anchor"), c)
    np.testing.assert_allclose(guide(c, u, 7.5, "cond_anchor"), c + 7.5 * (c - u), rtol=1e-6)
    with pytest.raises(ValueError, match="CFG convention"):
        guide(c, u, 1.0, "diffusers")


def test_guided_output_batches_cond_and_uncond():
    calls = []

    def apply_fn(x, t, text):
        calls.append(x.shape[0])
        return x * text.mean(axis=(1, 2))[:, None, None, None, None]

    x = jnp.ones((2, 1, 1, 1, 1))
    text, null = jnp.full((2, 3, 4), 2.0), jnp.zeros((3, 4))
    out = guided_output(apply_fn, x, 0.0, text, null, 3.0, "uncond_anchor")
    assert calls == [4]
    np.testing.assert_allclose(out, 6.0)


@pytest.mark.parametrize("schedule", [VPSchedule(), FlowSchedule()], ids=["vp", "flow"])
@pytest.mark.parametrize("num_steps", [1, 4, 50])
def test_ddim_with_exact_x0_reproduces_the_data(schedule, num_steps):
    data = jax.random.normal(jax.random.key(2), (3, 2, 4, 4, 2))

    def oracle(x_t, t):  # knows the data: exact x0, and the eps consistent with it
        a, s = schedule.alpha_sigma(t)
        return data, (x_t - a[:, None, None, None, None] * data) / s[:, None, None, None, None]

    noise = jax.random.normal(jax.random.key(3), data.shape)
    grid = schedule.sampling_timesteps(num_steps)
    a0, s0 = schedule.alpha_sigma(grid[0])
    out = sample(oracle, a0 * data + s0 * noise, grid, schedule)
    np.testing.assert_allclose(out, data, atol=1e-5)
    out = sample(oracle, noise, grid, schedule, renoise="fresh", rng=jax.random.key(4))
    np.testing.assert_allclose(out, data, atol=1e-5)


def test_ddim_on_the_flow_schedule_is_euler():
    flow = FlowSchedule(shift=5.0)
    grid = flow.sampling_timesteps(8)
    # Any velocity field: a fixed nonlinear function of (x, t).
    velocity = lambda x, t: jnp.tanh(x) * (1 + t[:, None, None, None, None] / 1000) - 0.3
    apply_fn = lambda x, t, text: velocity(x, t)
    denoiser = make_denoiser(apply_fn, flow, "flow", text=jnp.zeros((2, 1, 1)))
    x = jax.random.normal(jax.random.key(5), (2, 2, 3, 3, 1))
    ddim = sample(denoiser, x, grid, flow)
    sigmas = np.append(grid / 1000, 0.0)
    euler = x
    for i, t in enumerate(grid):
        euler = euler + (sigmas[i + 1] - sigmas[i]) * velocity(euler, jnp.full((2,), t))
    np.testing.assert_allclose(ddim, euler, atol=1e-5)


def test_partial_solve_stops_at_final_timestep():
    vp = VPSchedule()
    data = jnp.ones((1, 1, 2, 2, 1))
    oracle = lambda x_t, t: (data, jnp.zeros_like(x_t))
    out = sample(oracle, jnp.zeros_like(data), [999.0, 979.0], vp, final_timestep=959.0)
    a, _ = vp.alpha_sigma(959.0)
    np.testing.assert_allclose(out, a * data, rtol=1e-6)


def test_consistency_boundary_condition():
    c_skip, c_out = boundary_scalings(jnp.asarray([0.0, 19.0, 999.0]))
    np.testing.assert_allclose(c_skip[0], 1.0)
    np.testing.assert_allclose(c_out[0], 0.0)
    assert c_skip[2] < 1e-6 and c_out[2] > 0.999999
    vp = VPSchedule()
    junk = lambda x_t, t: (x_t * 0 + 123.0, x_t)
    f = consistency_denoiser(junk, vp)
    x = jax.random.normal(jax.random.key(6), (2, 1, 2, 2, 1))
    np.testing.assert_allclose(f(x, jnp.zeros((2,)))[0], x)  # f(x, 0) = x whatever the network says


def test_logit_normal_training_timesteps_follow_their_density_and_the_config_is_checked():
    from scipy.stats import norm

    from dollar_jax.config import base_config, validate
    from dollar_jax.losses.denoising import sample_timesteps

    vp = VPSchedule()
    t = np.asarray(sample_timesteps(jax.random.key(0), 20000, vp, logit_normal=(0.5, 1.0)))
    assert np.all(t == np.round(t)) and t.min() >= 0 and t.max() <= 999  # integers on the discrete schedule
    for q in (0.1, 0.5, 0.9):  # T sigmoid(m + s z): its quantiles
        assert abs(np.quantile(t, q) - 999 / (1 + np.exp(-(0.5 + norm.ppf(q))))) < 8
    uniform = np.asarray(sample_timesteps(jax.random.key(0), 20000, vp))
    assert np.mean(t < 100) < 0.02 < 0.08 < np.mean(uniform < 100)  # few nearly clean draws
    c = base_config()
    c.teacher.timesteps = "logit-normal"
    with pytest.raises(ValueError, match="config.teacher.timesteps must be 'uniform' or 'logit_normal'"):
        validate(c)
