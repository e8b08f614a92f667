"""The DiT on 8 virtual CPU devices (data x fsdp x tensor = 2 x 2 x 2) equals the single-device forward."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dollar_jax.models import WanDiT, preset
from dollar_jax.models.layers import logical_axes
from dollar_jax.parallel import axis_rules, make_mesh, tree_shardings
from dollar_jax.parallel.mesh import resolve_mesh_shape
from dollar_jax.parallel.sharding import mesh_spec

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")


@pytest.fixture(scope="module")
def model_and_inputs():
    cfg = preset("tiny", num_attention_heads=4, attention_head_dim=8, ffn_dim=48)
    model = WanDiT(cfg, rngs=nnx.Rngs(0))
    # Give the zero-initialised output layers values so the comparison sees every path.
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    keys = iter(jax.random.split(jax.random.key(1), 100))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape), params)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 4, 4, cfg.in_channels)).astype(np.float32)
    t = np.asarray([0.0, 250.0, 500.0, 999.0], np.float32)
    text = rng.standard_normal((4, 6, cfg.text_dim)).astype(np.float32)
    return graphdef, params, logical_axes(state), (x, t, text)


def _forward(graphdef):
    return jax.jit(lambda params, x, t, text: nnx.merge(graphdef, params)(x, t, text))


def test_sharded_forward_equals_single_device(model_and_inputs):
    graphdef, params, axes, (x, t, text) = model_and_inputs
    single = _forward(graphdef)(params, x, t, text)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = tree_shardings(mesh, params, axes)
    with jax.set_mesh(mesh):
        placed = jax.device_put(params, shardings)
        batch = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
        out = _forward(graphdef)(placed, jax.device_put(x, batch), jax.device_put(t, batch), jax.device_put(text, batch))
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), rtol=2e-5, atol=2e-5)


def test_context_axis_sharding_equals_single_device(model_and_inputs):
    graphdef, params, axes, (x, t, text) = model_and_inputs
    single = _forward(graphdef)(params, x, t, text)
    mesh = make_mesh({"fsdp": 2, "context": 4})
    with jax.set_mesh(mesh):
        out = _forward(graphdef)(jax.device_put(params, tree_shardings(mesh, params, axes)), x, t, text)
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), rtol=2e-5, atol=2e-5)


def test_parameter_shardings_follow_the_rules(model_and_inputs):
    graphdef, params, axes, _ = model_and_inputs
    mesh = make_mesh({"fsdp": 2, "context": 2, "tensor": 2})
    placed = jax.device_put(params, tree_shardings(mesh, params, axes))
    fc = ("fsdp", "context")  # parameters are split over the context axis too, not replicated on it
    expect = {
        ("blocks", "attn1", "to_q", "kernel"): P(None, fc, "tensor"),
        ("blocks", "attn1", "to_out", "kernel"): P(None, "tensor", fc),
        ("blocks", "attn2", "norm_k", "scale"): P(None, "tensor"),
        ("blocks", "ffn", "fc_in", "kernel"): P(None, fc, "tensor"),
        ("blocks", "ffn", "fc_out", "kernel"): P(None, "tensor", fc),
        ("blocks", "scale_shift_table"): P(None, None, fc),
        ("patch_embedding", "kernel"): P(None, fc),
        ("condition_embedder", "time_linear_2", "kernel"): P(fc, None),  # a mesh axis is used once
    }
    for path, spec in expect.items():
        leaf, names = placed, axes
        for k in path:
            leaf, names = leaf[k], names[k]
        assert mesh_spec(names, mesh) == spec, path
        assert leaf.sharding.spec == spec, path
    # Every placed parameter carries exactly the spec the rules table gives for its logical names.
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda a: isinstance(a, tuple))
    for leaf, names in zip(jax.tree.leaves(placed), flat_axes, strict=True):
        assert leaf.sharding.spec == mesh_spec(names, mesh)
    # Without a context axis the same rules read as plain FSDP; the batch never goes over context.
    plain = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert tree_shardings(plain, params, axes)["blocks"]["attn1"]["to_q"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert mesh_spec(("act_batch", "act_length"), mesh) == P("fsdp", "context")


def test_rules_override_changes_placement(model_and_inputs):
    _, params, axes, _ = model_and_inputs
    mesh = make_mesh({"fsdp": 8})
    with axis_rules([("embed", None), ("heads", "fsdp"), ("mlp", "fsdp"), ("layers", None), ("patch", None),
                     ("patch_out", None), ("text_embed", None), ("time_freq", None), ("modulation", None),
                     ("norm", None)]):
        shardings = tree_shardings(mesh, params, axes)
    assert shardings["blocks"]["attn1"]["to_q"]["kernel"].spec == P(None, None, "fsdp")


def test_indivisible_parameter_is_a_clear_error(model_and_inputs):
    _, params, axes, _ = model_and_inputs
    mesh = make_mesh({"tensor": 8})  # 4 heads * 8 dims = 32 is divisible, ffn 48 is divisible; text_dim 32 too
    bad = dict(params, extra=jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match="not divisible"):
        tree_shardings(mesh, bad, dict(axes, extra=("heads", None)))


def test_mesh_shape_resolution():
    assert resolve_mesh_shape({"data": 2, "fsdp": -1}, 8) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    with pytest.raises(ValueError, match="Unknown mesh axes"):
        resolve_mesh_shape({"dat": 2}, 8)
    with pytest.raises(ValueError, match="needs 6 devices"):
        resolve_mesh_shape({"data": 2, "tensor": 3}, 8)


@dataclasses.dataclass(frozen=True)
class _TorusChip:
    """What jax's mesh builder reads of a TPU device: enough to lay out a torus without libtpu."""

    id: int
    coords: tuple[int, int, int]
    platform: str = "tpu"
    device_kind: str = "TPU v6 lite"
    core_on_chip: int = 0
    process_index: int = 0
    slice_index: int = 0


def test_mesh_axis_that_splits_a_torus_axis_is_built():
    # fsdp=16 x context=4 on a v6e 8x8 torus: 16 is no product of whole torus axes (8, 8), which
    # jax.make_mesh refuses on v6e. The mesh must still use every chip once, with context on neighbours.
    chips = [_TorusChip(i, (x, y, 0)) for i, (y, x) in enumerate(itertools.product(range(8), range(8)))]
    mesh = make_mesh({"fsdp": 16, "context": 4}, devices=chips)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 16, "context": 4, "tensor": 1}
    assert sorted(chip.id for chip in mesh.devices.flat) == list(range(64))
    ring = [chip.coords for chip in mesh.devices[0, 0, :, 0]]
    assert all(sum(abs(a - b) for a, b in zip(p, q)) == 1 for p, q in zip(ring, ring[1:])), ring
