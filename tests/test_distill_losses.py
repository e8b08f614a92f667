"""VSD and CD on closed-form toys (Gaussian data, analytic scores and probability-flow ODE)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dollar_jax.diffusion import VPSchedule
from dollar_jax.diffusion.predictions import broadcast_to
from dollar_jax.diffusion.student import training_sample
from dollar_jax.losses.consistency import consistency_loss, ddim_teacher_solve, distance, timestep_pairs
from dollar_jax.losses.vsd import vsd_gradient, vsd_loss

VP = VPSchedule()
SHAPE = (8, 4, 4, 4, 4)  # 256 iid elements per example: the per-example normaliser is a mean


def gaussian_denoiser(mean, var):
    """The exact E[x0 | x_t] for data ~ N(mean, var) under the VP schedule (and the matching eps)."""

    def denoise(x_t, t):
        a, s = (broadcast_to(c, x_t) for c in VP.alpha_sigma(t))
        x0 = mean + a * var / (a * a * var + s * s) * (x_t - a * mean)
        return x0, (x_t - a * x0) / s

    return denoise


def _vsd_grad_wrt_theta(theta, data_mean, rng, fake_is_real=False):
    z = jax.random.normal(jax.random.key(0), SHAPE)
    student_var = 0.5**2

    def loss(th):
        x = th + 0.5 * z  # the student's samples
        real = gaussian_denoiser(data_mean, 1.0)
        fake = real if fake_is_real else gaussian_denoiser(jax.lax.stop_gradient(th), student_var)
        return vsd_loss(x, real, fake, rng, VP, 20.0, 980.0)[0]

    return jax.grad(loss)(theta)


@pytest.mark.parametrize("theta, data_mean", [(1.0, -1.0), (-2.0, 0.5), (0.3, 0.0)])
def test_vsd_moves_a_gaussian_student_toward_the_teacher(theta, data_mean):
    g = _vsd_grad_wrt_theta(jnp.asarray(theta), data_mean, jax.random.key(1))
    assert np.sign(g) == np.sign(theta - data_mean)  # gradient descent moves theta toward the data mean
    # And a few steps of descent actually close the gap.
    th = jnp.asarray(theta)
    for i in range(40):
        th = th - 1.0 * _vsd_grad_wrt_theta(th, data_mean, jax.random.key(10 + i))
    assert abs(float(th) - data_mean) < 0.05 * abs(theta - data_mean)


def test_vsd_gradient_is_zero_when_fake_equals_real():
    g = _vsd_grad_wrt_theta(jnp.asarray(1.5), -1.0, jax.random.key(2), fake_is_real=True)
    assert float(g) == 0.0
    x = jax.random.normal(jax.random.key(3), (4, 2, 3, 3, 1))
    np.testing.assert_array_equal(vsd_gradient(x, x * 0.5, x * 0.5), 0.0)


# ---- consistency distillation: data ~ N(0, v) has an exact probability-flow ODE ------------------------
V = 0.25


def ode_scale(t):
    a, s = VP.alpha_sigma(t)
    return jnp.sqrt(a * a * V + s * s)


def exact_solve(x, path, t_low):
    """The probability-flow ODE of N(0, V) data from t_high (= path[0]) to t_low, in closed form."""
    return x * broadcast_to(ode_scale(t_low) / ode_scale(path[0]), x)


def exact_consistency(x, t):
    """The exact consistency function: the ODE map to t = 0 (so f(x, 0) = x)."""
    return x * broadcast_to(ode_scale(jnp.zeros_like(t)) / ode_scale(t), x)


GRID = VP.sampling_timesteps(50)


def test_cd_loss_is_zero_at_the_exact_consistency_function_and_positive_elsewhere():
    x0 = jnp.sqrt(V) * jax.random.normal(jax.random.key(4), (64, 2, 2, 2, 1))
    args = (exact_solve, x0, jax.random.key(5), VP, GRID, 5)
    exact, _ = consistency_loss(exact_consistency, exact_consistency, *args)
    assert float(exact) < 1e-6
    for wrong in (lambda x, t: 1.1 * exact_consistency(x, t), lambda x, t: exact_consistency(x, t) + 0.05):
        assert float(consistency_loss(wrong, exact_consistency, *args)[0]) > 1e-3
    assert float(consistency_loss(wrong, exact_consistency, *args, kind="l2")[0]) > 1e-4
    # Boundary condition of the exact function.
    x = jax.random.normal(jax.random.key(6), (3, 1, 1, 1, 1))
    np.testing.assert_allclose(exact_consistency(x, jnp.zeros((3,))), x, rtol=1e-6)


def test_cd_gradient_reaches_only_the_student():
    x0 = jnp.sqrt(V) * jax.random.normal(jax.random.key(7), (16, 1, 2, 2, 1))

    def loss(scale_student, scale_target):
        student = lambda x, t: scale_student * exact_consistency(x, t)
        target = lambda x, t: scale_target * exact_consistency(x, t)
        return consistency_loss(student, target, exact_solve, x0, jax.random.key(8), VP, GRID, 5)[0]

    g_student, g_target = jax.grad(loss, argnums=(0, 1))(1.2, 1.0)
    assert float(g_student) > 0 and float(g_target) == 0.0


def test_cd_timestep_pairs_follow_the_papers_grid():
    t_high, path, t_low = timestep_pairs(jax.random.key(9), 512, GRID, 5)
    np.testing.assert_array_equal(t_high - t_low, 100.0)  # m = 5 steps of 20 on the 50-step grid
    assert float(t_low.min()) == 19.0 and float(t_high.max()) == 999.0
    np.testing.assert_array_equal(path[0], t_high)
    np.testing.assert_array_equal(path[-1] - t_low, 20.0)


def test_ddim_solver_with_the_exact_denoiser_tracks_the_ode():
    x = jax.random.normal(jax.random.key(10), (8, 1, 1, 1, 1))
    t_high, path, t_low = timestep_pairs(jax.random.key(11), 8, GRID, 5)
    ddim = ddim_teacher_solve(gaussian_denoiser(0.0, V), VP)(x, path, t_low)
    np.testing.assert_allclose(ddim, exact_solve(x, path, t_low), rtol=0.05)


def test_pseudo_huber_distance():
    a, b = jnp.asarray([0.0, 1.0]), jnp.asarray([0.0, 0.0])
    np.testing.assert_allclose(distance(a, b, "huber", 0.001), (np.sqrt(1 + 1e-6) - 1e-3) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="distance"):
        distance(a, b, "l1")


def test_backward_simulation_gives_gradient_only_through_the_last_step():
    timesteps = VP.sampling_timesteps(4)
    noise = jax.random.normal(jax.random.key(12), (4, 1, 2, 2, 1))

    def make(w):
        return lambda x, t: (w * x, x)

    def loss(w, key):
        x0, t = training_sample(make(w), make(jax.lax.stop_gradient(w)), noise, timesteps, VP, key)
        return jnp.sum(x0), t

    for seed in range(6):
        (value, t), g = jax.value_and_grad(loss, has_aux=True)(2.0, jax.random.key(seed))
        assert float(t[0]) in set(timesteps.tolist())
        # d/dw of w * x_j where x_j is a stopped function of w: exactly sum(x_j) = value / w.
        np.testing.assert_allclose(g, value / 2.0, rtol=1e-5)
    x0, t = training_sample(make(1.0), make(1.0), noise, timesteps, VP, jax.random.key(0), mode="noised_data",
                            data=jnp.zeros_like(noise))
    a, s = VP.alpha_sigma(t[0])
    np.testing.assert_allclose(x0, s * noise, rtol=1e-6)
