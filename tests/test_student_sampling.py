"""Every sampler samples a student with the consistency scalings it was trained with (not the defaults)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dollar_jax.checkpoint import dit_params, load_dit, teacher_parameterisation, write_model_folder
from dollar_jax.config import base_config
from dollar_jax.eval.generate import make_generate, student_sampler, student_spec
from dollar_jax.eval.world_benchmark import entries_for
from dollar_jax.jobs import distill as distill_job
from dollar_jax.models.dit import WanDiT
from dollar_jax.models.dit_config import preset
from dollar_jax.parallel import make_mesh
from dollar_jax.sample import generate_folder
from dollar_jax.train.state import split_model

LATENT_SHAPE = (2, 4, 4, 4)  # [F, H, W, C]
# Far from LCM's (0.5, 10): at the grid's timesteps these give c_skip of 0.04-0.14 instead of ~1e-6, so a
# sampler that fell back to the defaults would produce visibly different latents.
SIGMA_DATA, TIMESTEP_SCALE = 20.0, 0.1


@pytest.fixture(scope="module", autouse=True)
def one_device():
    """One device: the 8 virtual ones would only slow a tiny model down on 2 cores."""
    with jax.set_mesh(make_mesh(dict(data=1, fsdp=1, context=1, tensor=1))):
        yield


@pytest.fixture(scope="module")
def student(one_device, tmp_path_factory):
    """A hand-written student folder, as jobs/distill.py `run` writes it, from a config with non-default
    scalings; returns (config, folder)."""
    config = base_config()
    config.distill.update(dict(sigma_data=SIGMA_DATA, timestep_scale=TIMESTEP_SCALE, eval_steps=(2,)))
    dit = preset("tiny", num_layers=1)
    # Initialised in one jit: building the model op by op costs far more on a busy CPU.
    params = jax.jit(lambda: dit_params(WanDiT(dit, rngs=nnx.Rngs(0))))()
    folder = str(tmp_path_factory.mktemp("models") / "student")
    d = config.diffusion
    write_model_folder(folder, {
        "dit": dit.to_dict(),
        "diffusion": {"schedule": d.schedule, "beta_schedule": d.beta_schedule, "beta_start": d.beta_start,
                      "beta_end": d.beta_end, "flow_shift": d.flow_shift, "prediction_type": d.prediction_type},
        "student": distill_job.student_section(config.distill),
        "latents": {"shape": list(LATENT_SHAPE)},
    }, params)
    return config, folder


def test_sample_cli_and_the_training_evaluator_draw_the_same_latents(student, tmp_path):
    config, folder = student
    text = np.asarray(jax.random.normal(jax.random.key(3), (2, 5, 32)), np.float32)
    generate_folder(folder, str(tmp_path / "out"), text=text, steps=2, seed=0)
    from_cli = np.load(tmp_path / "out" / "latents.npy")

    # The in-training evaluator's 2-step generator, built from the config (as make_world_evaluator does).
    schedule, prediction_type, _ = teacher_parameterisation(folder)
    graphdef, params = nnx.split(load_dit(folder))
    role, _ = split_model("student", nnx.merge(graphdef, params))
    generators = distill_job.student_generators(config.distill, role, schedule, prediction_type)
    # The CLI's noise (video i: fold_in(key(seed), i)) and re-noising key (batch b: fold_in(key(seed + 1), b)).
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(jax.random.key(0), i), LATENT_SHAPE))(
        jnp.arange(2))
    args = (noise, jnp.asarray(text), jnp.zeros_like(text), jax.random.fold_in(jax.random.key(1), 0))
    in_training = np.asarray(generators[2](params, *args))
    np.testing.assert_allclose(in_training, from_cli, rtol=1e-5, atol=1e-5)

    # The defaults would have sampled something else: the test can tell.
    grid = student_sampler(distill_job.student_section(config.distill), 2).timesteps
    defaults = np.asarray(make_generate(role.module, schedule, prediction_type, student_spec(grid, 0.5, 10.0))(
        params, *args))
    assert np.max(np.abs(defaults - from_cli)) > 1e-2


def test_benchmark_entries_carry_the_folders_scalings(student):
    _, folder = student
    (entry,) = entries_for(folder, "student", [2], 4.5, "uncond_anchor")
    assert (entry.spec.sigma_data, entry.spec.timestep_scale) == (SIGMA_DATA, TIMESTEP_SCALE)
    assert entry.spec.timesteps == (999.0, 499.0)


def test_a_student_section_without_its_scalings_is_refused():
    with pytest.raises(ValueError, match="lacks \\['sigma_data', 'timestep_scale'\\]"):
        student_sampler({"timesteps": [999.0, 499.0]})
    with pytest.raises(ValueError, match="divisor"):
        student_sampler({"timesteps": [999.0, 749.0, 499.0, 249.0], "sigma_data": 0.5, "timestep_scale": 10.0}, 3)
