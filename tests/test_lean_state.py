"""The lean-state switches change memory, not maths: each run with a switch matches the run without it,
bit-exact where the switch only drops storage, within bfloat16 precision where it rounds storage."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dollar_jax.compile_effort import step_options
from dollar_jax.config import config_from_file, optimizer, schedule_of
from dollar_jax.models import WanDiT
from dollar_jax.parallel.sharding import in_memory, on_device
from dollar_jax.train.optim import LeanAdamState, clip_by_global_norm, make_optimizer
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


@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipped, and left alone
def test_global_norm_clip_is_bit_exact_with_optax(max_norm):
    grads = _tree(7, 3.0)
    ours = jax.jit(lambda g: clip_by_global_norm(max_norm).update(g, optax.EmptyState())[0])(grads)
    ref = jax.jit(lambda g: optax.clip_by_global_norm(max_norm).update(g, optax.EmptyState())[0])(grads)
    jax.tree.map(np.testing.assert_array_equal, ours, ref)
    assert (max_norm > 1) == all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(grads)))


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


@pytest.mark.parametrize("memory", ["device", "host"])
def test_update_scale_scales_the_applied_update_and_the_guard_holds(memory):
    # L_FT's ramp goes through optimizer_step's update_scale: the update is scaled, the optimiser state is not,
    # and a non-finite update still moves nothing (nan_guard="update"), with the state on the device or the host.
    opt, _ = make_optimizer(optimizer(learning_rate=1e-2, decay="constant"), 10)
    role = Role("m", None, None, opt, guard_updates=True, opt_memory=memory)
    params, grads = _tree(0), _tree(1)
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)
    state = opt.init(params)
    if memory == "host":
        state = jax.device_put(state, jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host"))
    step = jax.jit(lambda p, s, g, scale: optimizer_step(role, p, s, g, update_scale=scale)[:2])
    full, full_state = step(params, state, grads, jnp.float32(1.0))
    half, half_state = step(params, state, grads, jnp.float32(0.5))
    jax.tree.map(lambda h, f, p: np.testing.assert_allclose(h - p, 0.5 * (f - p), rtol=1e-5, atol=1e-7),
                 half, full, params)
    jax.tree.map(np.testing.assert_array_equal, half_state, full_state)
    kept, kept_state = step(params, state, bad, jnp.float32(0.5))
    jax.tree.map(np.testing.assert_array_equal, (kept, kept_state), (params, state))
    if memory == "host":
        assert {a.sharding.memory_kind for a in jax.tree.leaves(half_state)} == {"pinned_host"}


def _perturbed(params):
    """A fresh DiT's output projection is zero, so nothing upstream of it would get a gradient: perturb it all."""
    # Drawn with NumPy: a jax.random draw per leaf shape would compile a program for each (about 30 per model).
    return jax.tree.map(lambda p: jnp.asarray(np.asarray(p) + 0.05 * np.random.default_rng(p.size).standard_normal(
        p.shape).astype(np.float32), p.dtype), params)


def _step_config(**distill):
    c = config_from_file("configs/wan21_distill.py:local")
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


def _run_steps(config, steps=2, metrics=None, then_nan=False):
    """`steps` steps of the jitted step; returns the state (and appends each step's metrics to `metrics`).
    `then_nan`: one more step, on a batch of NaN latents and text: every update of it is non-finite."""
    step = _build(config)
    latent, text = tuple(config.data.latent_shape), tuple(config.data.text_shape)
    from dollar_jax.config import dit_config

    params = _perturbed(nnx.to_pure_dict(nnx.state(WanDiT(dit_config(config), rngs=nnx.Rngs(3)), nnx.Param)))
    state = init_state(step.roles, {"student": params, "fake": step.fake_init(params)}, seed=0)
    frozen = {"teacher": params, "null_text": jnp.zeros(text)}
    options = step_options("light")  # a short run, compiled as config.step_compile="light" compiles it
    fn = jax.jit(step.train_step, compiler_options=options)
    if "host" in (config.distill.ema_memory, config.distill.optim_memory):
        # As the train loop places them: the EMA / the student's optimiser state wait in pinned host memory.
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, state)
        shardings = shardings.replace(
            ema=in_memory(shardings.ema, config.distill.ema_memory),
            opt_state={n: in_memory(s, step.roles[n].opt_memory) for n, s in shardings.opt_state.items()})
        state = jax.device_put(state, shardings)
        fn = jax.jit(step.train_step, out_shardings=(shardings, None), compiler_options=options)
    for i in range(steps):
        k1, k2 = jax.random.split(jax.random.key(100 + i))
        batch = {"latents": jax.random.normal(k1, (2, *latent)), "text": jax.random.normal(k2, (2, *text))}
        state, m = fn(state, frozen, batch)
        assert bool(m["finite"])
        if metrics is not None:
            metrics.append(jax.device_get(m))
    if then_nan:
        state, m = fn(state, frozen, jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), batch))
        assert not bool(m["finite"]) and int(state.step) == steps + 1
    return state


@pytest.fixture(scope="module")
def reference():
    """The step as before the switches: Adam keeps its (zero-weight) first moment, the whole state is guarded."""
    config = _step_config(nan_guard="state")
    config.distill.optim.drop_zero_first_moment = False
    config.distill.fake_optim.drop_zero_first_moment = False
    return _run_steps(config)


def test_step_with_per_update_guard_without_first_moment_and_host_ema_and_moments_is_bit_exact(reference):
    # The default drops the first moment (b1 = 0); the EMA and the student's optimiser state wait in host memory
    # between steps and are updated there. A third, non-finite step must change nothing (each update, the host
    # optimiser state and the host EMA guard themselves).
    lean = _run_steps(_step_config(nan_guard="update", ema_memory="host", optim_memory="host"), then_nan=True)
    adam = lambda s: s.opt_state["student"][1][0]  # noqa: E731  chain(clip, chain(adam, lr))
    assert adam(reference).mu is not None and adam(lean).mu is None
    assert {a.sharding.memory_kind for a in jax.tree.leaves(lean.ema)} == {"pinned_host"}
    assert {a.sharding.memory_kind for a in jax.tree.leaves(lean.opt_state["student"])} == {"pinned_host"}
    assert {a.sharding.memory_kind for a in jax.tree.leaves(lean.opt_state["fake"])} == {"device"}
    assert {a.sharding.memory_kind for a in jax.tree.leaves(lean.params)} == {"device"}
    copied = on_device(lean.ema)  # what a sampler or the export reads
    assert {a.sharding.memory_kind for a in jax.tree.leaves(copied)} == {"device"}
    jax.tree.map(np.testing.assert_array_equal, copied, lean.ema)
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


def test_vsd_only_keeps_no_ema_and_a_lora_fake_score_trains_only_its_adapters(reference):
    # Two independent switches in one compiled step (each compile is most of a test's time on 2 cores).
    metrics, config = [], _step_config(cd_weight=0.0, fake_lora_rank=2)
    without_cd = _run_steps(config, metrics=metrics)
    assert without_cd.ema == {}
    for m in metrics:  # VSD only: no CD term, and the generator's loss is VSD's
        assert "loss_cd" not in m and "loss_vsd" in m
        np.testing.assert_allclose(m["loss_generator"], config.distill.vsd_weight * m["loss_vsd"], rtol=1e-6)
    # The fake score is the teacher plus rank-2 adapters: the state holds the adapters only, they started at
    # up = 0 (the fake score was the teacher) and the fake-score updates moved them.
    fake = without_cd.params["fake"]
    names = {str(path[-1].key) for path, _ in jax.tree_util.tree_flatten_with_path(fake)[0]}
    assert names == {"lora_down", "lora_up"}
    ups = _named(fake, "lora_up")
    assert len(ups) == 10 and all(np.abs(np.asarray(up)).max() > 0 for up in ups)  # 4 + 4 + 2 linears
    size = lambda tree: sum(a.size for a in jax.tree.leaves(tree))  # noqa: E731
    assert size(fake) < size(reference.params["fake"]) / 2
    assert np.isfinite([m["loss_fake"] for m in metrics]).all()
    assert _build(_step_config(cd_weight=0.0, export="ema")).roles["student"].ema_decay is not None
    with pytest.raises(ValueError, match="nan_guard"):
        _build(_step_config(nan_guard="sometimes"))


def _named(tree, leaf: str) -> list:
    """Every leaf called `leaf` ("lora_up", "lora_down") of a LoRA parameter tree."""
    return [a for path, a in jax.tree_util.tree_flatten_with_path(tree)[0] if str(path[-1].key) == leaf]


def test_lora_model_starts_as_its_base_and_its_gradient_reaches_only_the_adapters():
    from dollar_jax.models import preset
    from dollar_jax.models.lora import lora_axes, lora_init
    from dollar_jax.train.state import split_model

    role, base = split_model("fake", WanDiT(preset("tiny"), rngs=nnx.Rngs(0)))
    base = _perturbed(base)
    lora = lora_init(base, 3, jax.random.key(1))
    assert jax.tree.structure(lora_axes(role.axes), is_leaf=lambda a: isinstance(a, tuple)) == jax.tree.structure(lora)
    assert lora_axes(role.axes)["blocks"]["ffn"]["fc_in"] == {"lora_down": ("layers", "embed", None),
                                                            "lora_up": ("layers", None, "mlp")}
    lora_role = dataclasses.replace(role, lora_scale=0.5)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 2, 4, 4, 4)), jnp.float32)
    t, text = jnp.asarray([100.0, 700.0]), jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
    def loss(adapters, b):  # the LoRA model's loss, with its output and the base model's beside it
        out = lora_role.module(adapters, b)(x, t, text)
        return jnp.sum(out ** 2), (out, role.module(b)(x, t, text))

    # One compiled program (run eagerly, the DiT's many small ops take most of a minute on 2 cores).
    program = jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=step_options("light"))
    (_, (out, base_out)), grads = program(lora, base)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(base_out))
    assert all(float(jnp.abs(g).max()) == 0.0 for g in _named(grads, "lora_down"))  # up = 0: none reaches down
    assert all(float(jnp.abs(g).max()) > 0.0 for g in _named(grads, "lora_up"))
    with pytest.raises(ValueError, match="LoRA over a frozen model"):
        lora_role.module(lora)
