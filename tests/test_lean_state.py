"""The lean-state switches change memory, not maths: each run with a switch matches the run without it,
bit-exact where the switch only drops storage, within bfloat16 precision where it rounds storage."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dollar_jax.config import optimizer, schedule_of
from dollar_jax.models import WanDiT
from dollar_jax.train.optim import LeanAdamState, make_optimizer
from dollar_jax.train.state import Role, init_state, optimizer_step

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _tree(seed, scale=1.0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"w": scale * jax.random.normal(k1, (7, 5)), "b": {"c": scale * jax.random.normal(k2, (5,))}}


def _run(opt, steps=4):
    params = _tree(0)
    state = opt.init(params)
    for i in range(steps):
        updates, state = opt.update(_tree(10 + i, 0.1 * (i + 1)), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name,b1,wd", [("adamw", 0.0, 0.01), ("adamw", 0.9, 0.01), ("adam", 0.0, 0.0)])
def test_lean_adam_is_bit_exact_with_optax(name, b1, wd):
    c = optimizer(name=name, b1=b1, b2=0.999, weight_decay=wd, learning_rate=1e-2, decay="constant", grad_clip=0.0)
    lr = 1e-2
    reference = (optax.adamw(lr, b1=b1, b2=0.999, eps=1e-8, weight_decay=wd) if name == "adamw"
                 else optax.adam(lr, b1=b1, b2=0.999, eps=1e-8))
    lean, _ = make_optimizer(c, 10)
    ref_params, _ = _run(reference)
    lean_params, lean_state = _run(lean)
    jax.tree.map(np.testing.assert_array_equal, lean_params, ref_params)
    adam_state = next(s for s in jax.tree.leaves(lean_state, is_leaf=lambda s: isinstance(s, LeanAdamState))
                      if isinstance(s, LeanAdamState))
    assert (adam_state.mu is None) == (b1 == 0.0)  # b1 = 0 stores no first moment


def test_bf16_moments_stay_within_bf16_precision():
    base = optimizer(b1=0.9, b2=0.999, learning_rate=1e-2, decay="constant")
    lean = optimizer(b1=0.9, b2=0.999, learning_rate=1e-2, decay="constant", moment_dtype="bfloat16")
    ref_params, _ = _run(make_optimizer(base, 10)[0])
    params, state = _run(make_optimizer(lean, 10)[0])
    assert {a.dtype for a in jax.tree.leaves(state) if a.ndim} == {jnp.dtype(jnp.bfloat16)}
    # 4 steps of lr 1e-2: the moments' bf16 rounding (2^-8 relative) moves each update by < 1% of lr.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=4 * 1e-2 * 2 ** -7), params, ref_params)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
    with pytest.raises(ValueError, match="moment_dtype"):
        make_optimizer(optimizer(moment_dtype="float16"), 10)


def test_per_update_nan_guard_skips_only_a_non_finite_update():
    opt, _ = make_optimizer(optimizer(learning_rate=1e-2, decay="constant"), 10)
    guarded = Role("m", None, None, opt, guard_updates=True)
    plain = Role("m", None, None, opt)
    params = _tree(0)
    state = opt.init(params)
    good, bad = _tree(1), jax.tree.map(lambda g: g.at[0].set(jnp.nan), _tree(1))
    p1, s1, _ = optimizer_step(guarded, params, state, good)
    p2, s2, _ = optimizer_step(plain, params, state, good)
    jax.tree.map(np.testing.assert_array_equal, (p1, s1), (p2, s2))  # finite: the same update, bit for bit
    p3, s3, norm = optimizer_step(guarded, params, state, bad)
    jax.tree.map(np.testing.assert_array_equal, (p3, s3), (params, state))  # non-finite: nothing moved
    assert not np.isfinite(norm)


def _step_config(**distill):
    spec = importlib.util.spec_from_file_location("wan21_distill", os.path.join(ROOT, "configs", "wan21_distill.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("local")
    c.model.update(dict(num_attention_heads=2, attention_head_dim=8, ffn_dim=32, num_layers=1, text_dim=16,
                        freq_dim=16, in_channels=4, out_channels=4, remat_policy="none", attention="xla"))
    c.data.update(dict(latent_shape=(2, 4, 4, 4), text_shape=(4, 16)))
    c.distill.update(dict(batch_size=2, fake_updates=2, cd_steps=2, **distill))
    return c


def _build(config):
    from dollar_jax.config import dit_config
    from dollar_jax.train.dollar_step import build_step

    latent, text = tuple(config.data.latent_shape), tuple(config.data.text_shape)
    return build_step(config, dit_config(config), schedule_of(config), config.diffusion.prediction_type, latent, text)


def _run_steps(config, steps=2, metrics=None):
    """`steps` steps of the jitted step; returns the state (and appends each step's metrics to `metrics`)."""
    step = _build(config)
    latent, text = tuple(config.data.latent_shape), tuple(config.data.text_shape)
    from dollar_jax.config import dit_config

    params = nnx.to_pure_dict(nnx.state(WanDiT(dit_config(config), rngs=nnx.Rngs(3)), nnx.Param))
    state = init_state(step.roles, {"student": params, "fake": params}, seed=0)
    frozen = {"teacher": params, "null_text": jnp.zeros(text)}
    fn = jax.jit(step.train_step)
    for i in range(steps):
        k1, k2 = jax.random.split(jax.random.key(100 + i))
        batch = {"latents": jax.random.normal(k1, (2, *latent)), "text": jax.random.normal(k2, (2, *text))}
        state, m = fn(state, frozen, batch)
        assert bool(m["finite"])
        if metrics is not None:
            metrics.append(jax.device_get(m))
    return state


@pytest.fixture(scope="module")
def reference():
    """The step as before the switches: Adam keeps its (zero-weight) first moment, the whole state is guarded."""
    config = _step_config(nan_guard="state")
    config.distill.optim.drop_zero_first_moment = False
    config.distill.fake_optim.drop_zero_first_moment = False
    return _run_steps(config)


def test_step_with_per_update_guard_and_without_first_moment_is_bit_exact(reference):
    lean = _run_steps(_step_config(nan_guard="update"))  # the default drops the first moment (b1 = 0)
    adam = lambda s: s.opt_state["student"][1][0]  # noqa: E731  chain(clip, chain(adam, lr))
    assert adam(reference).mu is not None and adam(lean).mu is None
    jax.tree.map(np.testing.assert_array_equal, lean.params, reference.params)
    jax.tree.map(np.testing.assert_array_equal, lean.ema, reference.ema)
    jax.tree.map(np.testing.assert_array_equal, adam(lean).nu, adam(reference).nu)


def test_bf16_fake_ema_and_moments_stay_close(reference):
    config = _step_config(fake_dtype="bfloat16", ema_dtype="bfloat16")
    config.distill.optim.moment_dtype = config.distill.fake_optim.moment_dtype = "bfloat16"
    lean = _run_steps(config)
    assert {a.dtype for a in jax.tree.leaves(lean.params["fake"])} == {jnp.dtype(jnp.bfloat16)}
    assert {a.dtype for a in jax.tree.leaves(lean.ema["student"])} == {jnp.dtype(jnp.bfloat16)}
    # Two steps of lr 1e-5 (student) / 2e-5 (fake) on bf16 storage: the parameters agree to bf16 resolution.
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2 ** -5, atol=2e-3)  # noqa
    for role in ("student", "fake"):
        jax.tree.map(close, lean.params[role], reference.params[role])
    jax.tree.map(close, lean.ema["student"], reference.ema["student"])


def test_ema_is_not_kept_when_nothing_reads_it(reference):
    metrics, config = [], _step_config(cd_weight=0.0)
    without_cd = _run_steps(config, metrics=metrics)
    assert without_cd.ema == {}
    for m in metrics:  # VSD only: no CD term, and the generator's loss is VSD's
        assert "loss_cd" not in m and "loss_vsd" in m
        np.testing.assert_allclose(m["loss_generator"], config.distill.vsd_weight * m["loss_vsd"], rtol=1e-6)
    assert _build(_step_config(cd_weight=0.0, export="ema")).roles["student"].ema_decay is not None
    with pytest.raises(ValueError, match="nan_guard"):
        _build(_step_config(nan_guard="sometimes"))
