"""Attention kernels and context parallelism against the plain XLA reference.

CPU runs the reference, the Pallas splash kernel through the Pallas interpreter, and the context-parallel
path (tokens split over the `context` axis of 8 virtual devices, keys/values all-gathered per layer).
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dollar_jax.compile_effort import step_options
from dollar_jax.models import WanDiT, preset
from dollar_jax.models.attention import (attention, local_attention, parse_splash_blocks, splash_attention,
                                         splash_tiling, xla_attention)
from dollar_jax.models.layers import logical_axes
from dollar_jax.parallel import make_mesh, sharding, tree_shardings

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")


def _qkv(batch, tq, tk, heads=2, head_dim=16, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (batch, tq, heads, head_dim)), jax.random.normal(kk, (batch, tk, heads, head_dim)),
            jax.random.normal(kv, (batch, tk, heads, head_dim)))


# Padded self-attention, text-like keys, and multi-block keys under an explicit tiling (two 128-token compute
# sub-blocks per 256-token key block; the backward's own sizes).
@pytest.mark.parametrize("tq,tk,blocks", [(100, 100, "auto"), (128, 7, "auto"),
                                          (40, 600, "q=128,kv=256,kv_compute=128,kv_dkv=128,q_dq=128")])
def test_splash_matches_reference_forward_and_backward(tq, tk, blocks):
    q, k, v = _qkv(2, tq, tk)
    splash = functools.partial(splash_attention, interpret=True, block_sizes=blocks)
    out = jax.jit(splash)(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(xla_attention(q, k, v)), atol=2e-5, rtol=2e-5)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    got = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(xla_attention), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=5e-5, rtol=5e-5)


def test_splash_tilings_fit_the_sequence_and_bad_ones_are_named():
    # Wan 480p: 32,760 video tokens against the v6e preset; 512 text keys shrink its 1024-token key blocks.
    padded_q, padded_k, b = splash_tiling(32760, 512, "v6e")
    assert (padded_q, padded_k) == (32768, 512)
    assert (b.block_q, b.block_kv, b.block_kv_compute, b.block_q_dkv) == (2048, 512, 512, 2048)
    padded_q, padded_k, b = splash_tiling(32760, 32760, "auto")
    assert (padded_q, b.block_q, b.block_kv) == (32768, 512, 512)
    padded_q, padded_k, b = splash_tiling(300, 300, "q=1024,kv=256")  # one shrunk query block, two key blocks
    assert (padded_q, padded_k, b.block_q, b.block_kv, b.block_kv_compute) == (384, 512, 384, 256, 256)
    for spec, problem in (("q=100", "multiples of 128"), ("kv=256,kv_compute=384", "must divide"),
                          ("block=128", "name=size"), ("v9", "preset")):
        with pytest.raises(ValueError, match=problem):
            parse_splash_blocks(spec)
    with pytest.raises(ValueError, match="multiples of 128"):
        preset("tiny", splash_block_sizes="q=64")  # the model config refuses it before any step


def test_remat_policy_keeps_the_splash_residuals_by_name():
    """With save_attention the splash forward kernel runs again in the backward pass (its log-sum-exp is not
    kept); keeping q, k, v and the kernel's named residuals runs it as often as without remat. Counted in the
    gradient's program after dead-code elimination (what jit compiles)."""
    from jax._src.interpreters import partial_eval as pe

    def forward_kernels(policy):
        cfg = preset("tiny", num_layers=1, attention="splash_interpret", remat_policy=policy)
        graphdef, state = nnx.split(WanDiT(cfg, rngs=nnx.Rngs(0)))
        x, text = jnp.zeros((1, 2, 4, 4, cfg.in_channels)), jnp.zeros((1, 3, cfg.text_dim))
        grad = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x, jnp.ones((1,)), text))))(state)
        live, _ = pe.dce_jaxpr(grad.jaxpr, [True] * len(grad.jaxpr.outvars))
        return str(live).count("name=splash_mha_fwd")

    once = forward_kernels("none")
    assert forward_kernels("save_attention") > once
    assert forward_kernels("save_attention_residuals") == once


def test_residual_remat_policies_change_memory_not_the_gradient():
    cfg = preset("tiny", num_layers=2, num_attention_heads=2, attention_head_dim=8, ffn_dim=32)
    graphdef, state = nnx.split(WanDiT(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 4, 4, cfg.in_channels)).astype(np.float32)
    text = rng.standard_normal((1, 3, cfg.text_dim)).astype(np.float32)

    def grad(policy):  # offload_attention moves the saved tensors to pinned host memory, which CPU has too
        graph = nnx.graphdef(WanDiT(cfg.replace(remat_policy=policy), rngs=nnx.Rngs(0)))
        loss = lambda p: jnp.sum(jnp.sin(nnx.merge(graph, p)(x, jnp.full((1,), 300.0), text)))
        return jax.tree.leaves(jax.jit(jax.grad(loss), compiler_options=step_options("light"))(state))  # run once

    want = grad("none")
    for policy in ("save_attention_residuals", "offload_attention"):  # the policies that name their own tensors
        for a, b in zip(grad(policy), want, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=policy)


def test_accelerator_kernels_refuse_the_wrong_backend():
    q, k, v = _qkv(1, 8, 8)
    for kernel, needs in (("splash", "TPU"), ("cudnn", "GPU")):
        with pytest.raises(ValueError, match=needs):
            local_attention(q, k, v, kernel)
    with pytest.raises(ValueError, match="Unknown attention kernel"):
        local_attention(q, k, v, "flash9")


@needs_8
@pytest.mark.parametrize("shape", [{"context": 8}, {"data": 2, "context": 2, "tensor": 2}])
def test_context_parallel_attention_gathers_keys_and_matches(shape):
    q, k, v = _qkv(2, 64, 64, heads=4)
    mesh = make_mesh(shape)
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda q, k, v: attention(q, k, v, "xla"))
        hlo = fn.lower(q, k, v).compile().as_text()
        out = fn(q, k, v)
    assert "all-gather" in hlo  # keys/values move, queries stay split
    np.testing.assert_allclose(np.asarray(out), np.asarray(xla_attention(q, k, v)), atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module")
def dit_and_inputs():
    cfg = preset("tiny", num_attention_heads=4, attention_head_dim=8, ffn_dim=48)
    graphdef, state = nnx.split(WanDiT(cfg, rngs=nnx.Rngs(0)))
    keys = iter(jax.random.split(jax.random.key(1), 100))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape), nnx.to_pure_dict(state))
    rng = np.random.default_rng(0)
    # 3*3*3 = 27 tokens: the context axis of 4 does not divide them, so the DiT pads to 28 and masks the pad.
    x = rng.standard_normal((2, 3, 6, 6, cfg.in_channels)).astype(np.float32)
    t = np.asarray([100.0, 700.0], np.float32)
    text = rng.standard_normal((2, 5, cfg.text_dim)).astype(np.float32)
    return cfg, graphdef, params, logical_axes(state), (x, t, text)


def _loss_and_grad(graphdef):
    def loss(params, x, t, text):
        return jnp.mean(nnx.merge(graphdef, params)(x, t, text) ** 2)

    return jax.jit(jax.value_and_grad(loss), compiler_options=step_options("light"))  # run once: compiling dominates


@needs_8
@pytest.mark.parametrize("kernel", ["xla", "splash_interpret"])
def test_context_parallel_dit_equals_unsharded(dit_and_inputs, kernel, caplog):
    cfg, graphdef, params, axes, (x, t, text) = dit_and_inputs
    ref_loss, ref_grads = _loss_and_grad(graphdef)(params, x, t, text)
    graphdef_k, _ = nnx.split(nnx.eval_shape(lambda: WanDiT(cfg.replace(attention=kernel), rngs=nnx.Rngs(0))))
    mesh = make_mesh({"context": 4, "tensor": 2})
    sharding._warned.clear()
    with jax.set_mesh(mesh), caplog.at_level(logging.WARNING, logger="dollar_jax.parallel.sharding"):
        placed = jax.device_put(params, tree_shardings(mesh, params, axes))
        loss, grads = _loss_and_grad(graphdef_k)(placed, x, t, text)
    assert not [r for r in caplog.records if "act_length" in r.getMessage()]  # padded, not replicated
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    for g, r in zip(flat, ref_flat):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5, rtol=2e-4)


# ---- padding masks, kernel choice, cuDNN ---------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["xla", "splash_interpret"])
def test_padded_keys_get_no_weight(kernel):
    # The DiT pads tokens to a multiple of the context axis; the kernels must ignore keys from kv_valid on.
    q, k, v = _qkv(1, 40, 48)
    junk = jnp.full_like(k[:, 40:], 50.0)  # large padding values: any leak would show
    k_pad, v_pad = k.at[:, 40:].set(junk), v.at[:, 40:].set(junk)
    got = jax.jit(lambda q, k, v: local_attention(q, k, v, kernel, kv_valid=40))(q, k_pad, v_pad)
    np.testing.assert_allclose(np.asarray(got), np.asarray(xla_attention(q, k[:, :40], v[:, :40])), atol=2e-5,
                               rtol=2e-5)


def test_auto_picks_the_backend_kernel(monkeypatch):
    from dollar_jax.models import attention as attn

    assert attn.resolve_kernel("auto", jnp.float32, 16) == "xla"  # this machine: CPU
    for backend, dtype, head_dim, want in (("tpu", jnp.float32, 128, "splash"), ("gpu", jnp.bfloat16, 128, "cudnn"),
                                          ("gpu", jnp.float32, 128, "xla"), ("gpu", jnp.bfloat16, 12, "xla"),
                                          ("cpu", jnp.bfloat16, 128, "xla")):
        monkeypatch.setattr(attn.jax, "default_backend", lambda b=backend: b)
        assert attn.resolve_kernel("auto", dtype, head_dim) == want, (backend, dtype, head_dim)
        assert attn.resolve_kernel("xla", dtype, head_dim) == "xla"  # an explicit choice is kept
    with pytest.raises(ValueError, match="bfloat16/float16"):
        attn.check_cudnn_inputs(jnp.zeros((1, 8, 2, 16), jnp.float32))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU backend")
@pytest.mark.parametrize("head_dim,kv_valid", [(128, None), (64, 250), (128, 300)])
def test_cudnn_matches_xla(head_dim, kv_valid):
    # What the DiT sends on a GPU: BTNH bf16, Wan's head_dim 128, token counts that are no multiple of
    # anything, padded keys masked by sequence length. Reference: XLA attention (float32 softmax) on the
    # same bf16 inputs.
    q, k, v = (a.astype(jnp.bfloat16) for a in _qkv(2, 300, 300, heads=4, head_dim=head_dim, seed=3))
    weights = jax.random.normal(jax.random.key(4), q.shape, jnp.float32)

    def loss(kernel):
        return lambda q, k, v: jnp.sum(local_attention(q, k, v, kernel, kv_valid).astype(jnp.float32) * weights)

    for kernel in ("cudnn", "auto"):
        out = jax.jit(lambda q, k, v: local_attention(q, k, v, kernel, kv_valid))(q, k, v)
        ref = jax.jit(lambda q, k, v: local_attention(q, k, v, "xla", kv_valid))(q, k, v)
        assert out.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2)
    hlo = jax.jit(loss("cudnn")).lower(q, k, v).compile().as_text()
    assert "cudnn" in hlo.lower()  # the fused kernel ran, not a fallback
    got = jax.jit(jax.grad(loss("cudnn"), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        scale = np.abs(w).max()
        np.testing.assert_allclose(g / scale, w / scale, atol=3e-2)
