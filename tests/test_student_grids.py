"""Timesteps of the DOLLAR step: the flow shift on every draw, several student grids at once, and the
labeller's side of a skipped step (fast: toy denoisers, no DiT)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # noqa: F401  (diffusers' schedulers need it)
from diffusers import FlowMatchEulerDiscreteScheduler

from dollar_jax.diffusion import FlowSchedule, VPSchedule
from dollar_jax.diffusion.student import StudentGrids, student_grids, training_sample
from dollar_jax.losses.denoising import sample_timesteps
from dollar_jax.rewards.labeller import Labeller
from dollar_jax.train.reward_step import RewardPart

FLOW = FlowSchedule(shift=3.0)


def wan_shift(sigma, shift):
    """Wan2.1's shift, written from its paper/sampler: sigma' = shift * sigma / (1 + (shift - 1) * sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def test_flow_warp_is_wans_shift_and_vp_is_untouched():
    t = np.linspace(0.0, 1000.0, 11)
    np.testing.assert_allclose(FLOW.warp_timesteps(t), 1000.0 * wan_shift(t / 1000.0, 3.0), rtol=1e-12)
    np.testing.assert_array_equal(VPSchedule().warp_timesteps(t), t)
    # The student's 4-step grid on a flow teacher is the sampler's shifted 4-step grid (diffusers' scheduler).
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4, sigmas=np.linspace(1.0, 0.0, 5)[:-1])
    grid = student_grids((1000.0, 750.0, 500.0, 250.0), FLOW).grids[0]
    np.testing.assert_allclose(grid, scheduler.timesteps.numpy(), rtol=1e-5)
    assert student_grids((999.0, 749.0, 499.0, 249.0), VPSchedule()).grids == ((999.0, 749.0, 499.0, 249.0),)
    with pytest.raises(ValueError, match="descending"):
        student_grids((249.0, 999.0), FLOW)


def test_training_timestep_draws_go_through_the_shift():
    key = jax.random.key(0)
    raw = sample_timesteps(key, 4096, FLOW, 20.0, 980.0, warp=False)
    warped = sample_timesteps(key, 4096, FLOW, 20.0, 980.0)  # what VSD and the fake score draw
    np.testing.assert_allclose(warped, 1000.0 * wan_shift(raw / 1000.0, 3.0), rtol=1e-5)
    assert float(jnp.median(warped)) > 700.0  # shift 3 puts half the draws above sigma = 0.75
    vp = sample_timesteps(key, 16, VPSchedule(), 20.0, 980.0)
    np.testing.assert_array_equal(vp, jnp.round(vp))  # VP: integers, unwarped


GRIDS = student_grids(((999.0, 749.0, 499.0, 249.0), (999.0, 499.0), (999.0,)), VPSchedule())


def _zero_student(x, t):
    return jnp.zeros_like(x), x  # the chain predicts x0 = 0: after any chain step x = sigma(t) * fresh noise


def _identity(x, t):
    return x, x


@pytest.mark.parametrize("per_example", [False, True])
def test_several_grids_per_iteration_or_per_example(per_example):
    noise = jax.random.normal(jax.random.key(1), (64, 1, 4, 4, 16))
    seen = set()
    draw = jax.jit(lambda key: training_sample(_identity, _zero_student, noise, GRIDS, VPSchedule(), key,
                                               per_example=per_example))
    for seed in range(40 if not per_example else 4):
        # The final prediction is the identity, so the output IS x_j: the noise at j = 0, else the re-noised
        # chain state at the drawn grid position.
        x0, t = draw(jax.random.key(seed))
        t = np.asarray(t)
        assert set(t.tolist()) <= {999.0, 749.0, 499.0, 249.0}
        if not per_example:
            assert len(set(t.tolist())) == 1
        for b in range(len(t)):
            if t[b] == 999.0:
                np.testing.assert_array_equal(x0[b], noise[b])
            else:
                sigma = float(VPSchedule().alpha_sigma(t[b])[1])
                assert abs(float(jnp.std(x0[b])) - sigma) < 0.2 * sigma
        seen |= set(t.tolist()) if per_example else {tuple(t.tolist())[0]}
    assert seen == {999.0, 749.0, 499.0, 249.0}


def test_grid_table_pads_with_each_grids_last_step():
    np.testing.assert_array_equal(GRIDS.table, [[999, 749, 499, 249], [999, 499, 499, 499], [999, 999, 999, 999]])
    np.testing.assert_array_equal(GRIDS.lengths, [4, 2, 1])
    assert isinstance(GRIDS, StudentGrids)


def test_labeller_never_sees_a_skipped_step_or_non_finite_latents():
    submitted = []
    lab = Labeller(lambda z: z, lambda v, p: (submitted.append(v.copy()), v.reshape(len(v), -1).mean(1))[1],
                   lag=2, window=1)
    part = RewardPart(role=None, abstract_params=None, make_params=None, weight=1.0, microbatches=1, batch_size=2,
                      latent_shape=(1, 1, 1, 1), text_shape=(1, 1), labeller=lab)
    raw = {"latents": np.ones((2, 1, 1, 1, 1), np.float32), "text": np.zeros((2, 1, 1), np.float32),
           "caption": [b"a", b"b"]}
    good = np.full((2, 1, 1, 1, 1), 2.0, np.float32)
    bad = np.asarray([[[[[np.nan]]]], [[[[2.0]]]]], np.float32)
    part.after_step(1, {"student_x0": good}, raw)  # labelled: 2 real + 2 student rows
    part.after_step(2, {"student_x0": bad}, raw)  # one NaN row: the whole step is skipped (rows stay aligned)
    part.after_step(3, None, raw)  # a non-finite step: nothing submitted, later steps do not wait for it
    batch = part.extra_inputs(3)  # lag 2, window 1: step 1's labels
    assert batch["lrm_valid"].sum() == 2 and np.all(np.isfinite(batch["lrm_latents"]))
    assert part.extra_inputs(4)["lrm_valid"].sum() == 0  # may use only step 2: skipped
    assert part.extra_inputs(5)["lrm_valid"].sum() == 0  # only step 3: skipped
    assert len(submitted) == 1 and submitted[0].shape[0] == 4 and np.all(np.isfinite(submitted[0]))
    state = part.host_state()
    # Step 2 left the window when step 5's batch was drawn; skipped step 3 is kept, so a resume does not wait.
    assert state["skipped"].tolist() == [3] and int(state["ft_gate_open"]) == 0
    # A batch for an earlier step, whose labels were dropped when a later batch was drawn: an error, not a hang.
    with pytest.raises(ValueError, match="step order"):
        part.extra_inputs(3)
    lab.close()


def test_a_multi_grid_student_samples_only_the_step_counts_it_trained():
    from dollar_jax.jobs.distill import student_grids as eval_grids
    from dollar_jax.sample import sampler_for

    grids = [[999.0, 749.0, 499.0, 249.0], [999.0, 499.0], [999.0]]
    blob = {"student": {"timesteps": grids[0], "grids": grids, "sigma_data": 0.5, "timestep_scale": 10.0}}
    for n, grid in ((4, grids[0]), (2, grids[1]), (1, grids[2])):
        assert list(sampler_for(blob, VPSchedule(), n, 0.0, "uncond_anchor")[0].timesteps) == grid
    with pytest.raises(ValueError, match=r"samples in \[1, 2, 4\] steps, not 3"):
        sampler_for(blob, VPSchedule(), 3, 0.0, "uncond_anchor")

    class DC:  # the distill section's keys the evaluator reads
        student_grids, student_timesteps, eval_steps = ((999.0, 499.0), (999.0,)), (999.0, 499.0), (1, 2, 4)

    with pytest.raises(ValueError, match=r"\[4\] steps were not trained"):
        eval_grids(DC)
    DC.eval_steps = (1, 2)
    assert eval_grids(DC, FLOW)[2] == student_grids((999.0, 499.0), FLOW).grids[0]


def test_lft_gate_opens_on_the_lrm_correlation_and_is_host_state():
    lab = Labeller(lambda z: z, lambda v, p: v.reshape(len(v), -1).mean(1), lag=2, window=4)
    part = RewardPart(role=None, abstract_params=None, make_params=None, weight=1.0, microbatches=1, batch_size=2,
                      latent_shape=(1, 1, 1, 1), text_shape=(1, 1), ft_min_correlation=0.8, labeller=lab)
    assert part.extra_inputs(1)["ft_gate"].tolist() == [0.0, 0.0]  # gated, nothing measured yet
    part.observe({"lrm_true_correlation": 0.5})
    assert part.extra_inputs(2)["ft_gate"].max() == 0.0
    part.observe({"lrm_true_correlation": 0.85})
    part.observe({"lrm_true_correlation": 0.1})  # once open, it stays open
    assert part.extra_inputs(2)["ft_gate"].tolist() == [1.0, 1.0]
    resumed = RewardPart(**{**part.__dict__, "gate_open": False})
    resumed.restore_host_state(part.host_state())
    assert resumed.gate_open
    ungated = RewardPart(**{**part.__dict__, "gate_open": False, "ft_min_correlation": -1.0})
    assert ungated.extra_inputs(1)["ft_gate"].tolist() == [1.0, 1.0]
    lab.close()
