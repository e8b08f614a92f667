"""The pieces the reward baselines' numbers rest on (dollar_jax/eval/reward_baselines.py): the pixel path's
differentiable rewards are the host rewards, and the policy gradient's chain likelihood is the likelihood of the
chain the rollout drew."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dollar_jax.diffusion.schedules import make_schedule
from dollar_jax.eval import reward_baselines as baselines
from dollar_jax.rewards import make_reward
from dollar_jax.rewards.differentiable import DIFFERENTIABLE


@pytest.mark.parametrize("name", sorted(DIFFERENTIABLE))
def test_differentiable_twins_equal_the_host_rewards(name):
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, (3, 4, 32, 32, 3), dtype=np.uint8)
    videos[1] //= 4  # a dull clip beside the noisy ones
    host = make_reward(name)(videos, [""] * 3)
    twin = DIFFERENTIABLE[name](jnp.asarray(videos, jnp.float32) / 255.0)
    np.testing.assert_allclose(np.asarray(twin), host, rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda v: DIFFERENTIABLE[name](v).sum())(jnp.asarray(videos, jnp.float32) / 255.0)
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).sum() > 0


def test_chain_likelihood_is_the_rollouts_own_noise_and_its_gradient_is_reinforce():
    schedule = make_schedule("vp", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = (999.0, 749.0, 499.0, 249.0)
    noise = jax.random.normal(jax.random.key(0), (5, 6))

    def denoiser(theta):
        return lambda x, t: (theta * jnp.tanh(x) + 0.1 * t[:, None] / 1000.0, x)

    xs, x0 = baselines.rollout(denoiser(0.7), noise, timesteps, schedule, jax.random.key(1))
    assert xs.shape == (4, 5, 6) and x0.shape == (5, 6)
    # At the rollout's own parameters each transition's residual is the fresh noise it drew: log p = -|eps|^2 / 2.
    eps = [jax.random.normal(jax.random.fold_in(jax.random.key(1), k), (5, 6)) for k in range(3)]
    logp = baselines.chain_log_likelihood(denoiser(0.7), xs, timesteps, schedule)
    np.testing.assert_allclose(np.asarray(logp), -0.5 * sum(np.sum(np.asarray(e) ** 2, axis=1) for e in eps),
                               rtol=1e-4)
    # d log p / d theta = sum_k (alpha_{k+1} / sigma_{k+1}) eps_k . d f / d theta (REINFORCE's score function).
    grad = jax.grad(lambda th: baselines.chain_log_likelihood(denoiser(th), xs, timesteps, schedule).sum())(0.7)
    want = 0.0
    for k in range(3):
        a, s = schedule.alpha_sigma(jnp.asarray(timesteps[k + 1]))
        want += float(jnp.sum(a / s * eps[k] * jnp.tanh(xs[k])))
    np.testing.assert_allclose(float(grad), want, rtol=1e-4)


def test_specs_parse_and_bad_ones_are_named():
    assert baselines.parse_specs("sharpness:lrm,pixel,pg; jpeg_compressibility:lrm,pg") == [
        ("sharpness", ("lrm", "pixel", "pg")), ("jpeg_compressibility", ("lrm", "pg"))]
    assert baselines.parse_specs("") == [] and baselines.parse_specs("vividness") == [("vividness", baselines.METHODS)]
    with pytest.raises(ValueError, match="unknown reward 'sharpnes'"):
        baselines.parse_specs("sharpnes:lrm")
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['ddpo'\]"):
        baselines.parse_specs("sharpness:ddpo")
    with pytest.raises(ValueError, match="pixel path needs a differentiable reward"):
        baselines.parse_specs("jpeg_compressibility:pixel")


def test_report_section_tabulates_every_method():
    from dollar_jax.eval.report import reward_baselines_section

    def row(method, gain):
        return {"method": method, "reward_name": "sharpness", "steps": 100, "batch": 16, "reward_gain": gain,
                "before": {"reward": 0.4, "adherence": 0.6}, "after": {"reward": 0.4 + gain, "adherence": 0.58},
                "seconds_per_step": 0.5, "peak_temp_bytes": 3 * 2**20,
                "curve": [{"step": 50, "lrm_true_correlation": 0.7}] if method == "lrm" else []}

    assert reward_baselines_section({}) == []
    text = "\n".join(reward_baselines_section({"reward_baselines": [row("lrm", 0.02), row("pg", -0.001)]}))
    assert "## The latent reward model against its alternatives" in text and "100 steps of batch 16" in text
    assert "| lrm | sharpness | 100 x 16 | 0.4000 | 0.4200 | +0.0200 | 0.600 | 0.580 | 0.500 | 3.0 | 50: 0.70 |" in text
    assert "| pg | sharpness | 100 x 16 | 0.4000 | 0.3990 | -0.0010 |" in text
