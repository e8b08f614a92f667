"""optimizer name "muon": the DiT's block matrices orthogonalised layer by layer, Adam for every other leaf."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dollar_jax.config import config_from_file, dit_config, optimizer
from dollar_jax.models.dit import WanDiT
from dollar_jax.train.optim import make_optimizer


def _first_update(params, grads, **opt):
    tx, _ = make_optimizer(optimizer(name="muon", decay="constant", warmup_steps=0, grad_clip=0.0, **opt), 10)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return updates


def test_block_matrices_are_orthogonalised_per_layer_and_the_rest_takes_adam():
    params = nnx.split(WanDiT(dit_config(config_from_file("configs/demo.py:quick")), rngs=nnx.Rngs(0)), nnx.Param)[1]
    rng = np.random.default_rng(0)

    def gradient(p):  # matrices: rank one plus a little noise (condition numbers in the hundreds)
        shape = p.shape
        u = rng.standard_normal(shape[:-1] + (1,))
        v = rng.standard_normal(shape[:-2] + (1, shape[-1])) if len(shape) > 1 else 1.0  # vectors: u alone
        return jnp.asarray(u * v + 3e-2 * rng.standard_normal(shape), jnp.float32)

    grads = jax.tree.map(gradient, params)
    updates = _first_update(params, grads, learning_rate=0.1)

    kernel, g = updates["blocks"]["ffn"]["fc_in"]["kernel"][...], grads["blocks"]["ffn"]["fc_in"]["kernel"][...]
    assert kernel.shape[0] == 2  # stacked layers
    for layer in range(kernel.shape[0]):
        s_raw = np.linalg.svd(np.asarray(g[layer]), compute_uv=False)
        s = np.linalg.svd(np.asarray(kernel[layer]), compute_uv=False)
        assert s_raw[0] / s_raw[-1] > 50  # the gradient is far from orthogonal ...
        assert s[0] / s[-1] < 3  # ... Newton-Schulz makes each layer's update nearly so (not the stack as one)
    # Nesterov Adam's first step on a non-block leaf: v_hat = g^2 and m_hat = g (1 + b1 / (1 + b1)), so the update
    # is -lr * 1.47 * sign(g) at b1 = 0.9.
    for leaf in (("patch_embedding", "kernel"), ("proj_out", "bias"), ("blocks", "attn1", "norm_q", "scale")):
        u, gl = updates, grads
        for k in leaf:
            u, gl = u[k], gl[k]
        np.testing.assert_allclose(np.asarray(u[...]), -0.1 * (1 + 0.9 / 1.9) * np.sign(np.asarray(gl[...])), rtol=2e-3)


def test_a_model_without_block_matrices_is_an_error_not_a_silent_adam():
    params = {"dense": {"kernel": jnp.ones((4, 3))}}
    with pytest.raises(ValueError, match="'muon' needs a DiT's stacked block kernels"):
        _first_update(params, params, learning_rate=0.1)
