"""The teacher samplers against diffusers' schedulers driving the same tiny Wan model.

Flow (Wan2.1): FlowMatchEulerDiscreteScheduler with shift 3 and the Wan pipeline's CFG,
VP (the paper's teacher family): DDIMScheduler with trailing spacing (t = 999, 979, ..., 19).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

wan_reference = pytest.importorskip("wan_reference")
import torch  # noqa: E402
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

from dollar_jax.checkpoint import load_dit  # noqa: E402
from dollar_jax.convert import convert  # noqa: E402
from dollar_jax.diffusion import FlowSchedule, VPSchedule, make_denoiser, sample  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch_model = wan_reference.build_wan(seed=11)
    folder = tmp_path_factory.mktemp("sampler")
    wan_reference.save_diffusers(torch_model, str(folder / "torch"))
    convert(str(folder / "torch"), str(folder / "flax"))
    flax_model = load_dit(str(folder / "flax"))
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2, 3, 4, 4, 4)).astype(np.float32)
    text = rng.standard_normal((2, 5, 32)).astype(np.float32)
    null = np.zeros((2, 5, 32), np.float32)
    return torch_model, flax_model, noise, text, null


def _torch_guided(model, x, t, text, null, scale):
    """The Wan pipeline's guidance: uncond + scale * (cond - uncond) (our 'uncond_anchor')."""
    cond = model(x, t.expand(x.shape[0]), text, return_dict=False)[0]
    uncond = model(x, t.expand(x.shape[0]), null, return_dict=False)[0]
    return uncond + scale * (cond - uncond)


def _flax_sample(flax_model, schedule, prediction_type, noise, text, null, steps, scale):
    fn = jax.jit(lambda x, c, u: sample(
        make_denoiser(flax_model, schedule, prediction_type, c, u, scale, "uncond_anchor"),
        x, schedule.sampling_timesteps(steps), schedule))
    return np.asarray(fn(jnp.asarray(noise), jnp.asarray(text), jnp.asarray(null)))


def test_flow_euler_with_cfg_matches_diffusers(models):
    torch_model, flax_model, noise, text, null = models
    steps, scale = 8, 5.0
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    x = torch.from_numpy(noise.transpose(0, 4, 1, 2, 3).copy())
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = _torch_guided(torch_model, x, t, torch.from_numpy(text), torch.from_numpy(null), scale)
            x = scheduler.step(out, t, x, return_dict=False)[0]
    ref = x.numpy().transpose(0, 2, 3, 4, 1)
    np.testing.assert_allclose(FlowSchedule(shift=3.0).sampling_timesteps(steps), scheduler.timesteps.numpy(),
                               rtol=1e-5)
    ours = _flax_sample(flax_model, FlowSchedule(shift=3.0), "flow", noise, text, null, steps, scale)
    assert wan_reference.relative_error(ours, ref) < 1e-4


def test_vp_ddim_50_steps_with_cfg_matches_diffusers(models):
    torch_model, flax_model, noise, text, null = models
    steps, scale = 50, 3.5
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, timestep_spacing="trailing", set_alpha_to_one=True,
                              prediction_type="epsilon", clip_sample=False)
    scheduler.set_timesteps(steps)
    np.testing.assert_array_equal(scheduler.timesteps.numpy(), np.arange(999, 0, -20))
    x = torch.from_numpy(noise.transpose(0, 4, 1, 2, 3).copy())
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = _torch_guided(torch_model, x, t.float(), torch.from_numpy(text), torch.from_numpy(null), scale)
            x = scheduler.step(out, t, x, eta=0.0, return_dict=False)[0]
    ref = x.numpy().transpose(0, 2, 3, 4, 1)
    ours = _flax_sample(flax_model, VPSchedule(), "eps", noise, text, null, steps, scale)
    assert wan_reference.relative_error(ours, ref) < 1e-4
