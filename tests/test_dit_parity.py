"""Parity: tiny random diffusers WanTransformer3DModel -> convert -> WanDiT equals the torch output (fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

wan_reference = pytest.importorskip("wan_reference")
from dollar_jax.checkpoint import load_dit  # noqa: E402
from dollar_jax.convert import convert  # noqa: E402

pytestmark = pytest.mark.torch

# (diffusers config overrides, latent (frames, height, width), text length)
CASES = {
    "base-odd-frames": (dict(), (3, 4, 6), 7),
    "3-heads-8-dim-no-cross-norm": (dict(num_attention_heads=3, attention_head_dim=8, cross_attn_norm=False,
                                         text_dim=24, ffn_dim=40), (5, 4, 4), 5),
    "temporal-patch-2": (dict(patch_size=(2, 2, 2), num_attention_heads=4, attention_head_dim=16, text_dim=48,
                              in_channels=3, out_channels=5, freq_dim=64), (4, 4, 6), 6),
    "patch-1x1x1-3-layers": (dict(patch_size=(1, 1, 1), num_attention_heads=2, attention_head_dim=20, num_layers=3,
                                  text_dim=16), (1, 3, 5), 4),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    overrides, grid, text_len = CASES[request.param]
    model = wan_reference.build_wan(seed=len(request.param), **overrides)
    folder = tmp_path_factory.mktemp(request.param)
    wan_reference.save_diffusers(model, str(folder / "torch"))
    convert(str(folder / "torch"), str(folder / "flax"))
    return model, load_dit(str(folder / "flax")), grid, text_len


def _inputs(model, grid, text_len, batch, seed):
    rng = np.random.default_rng(seed)
    c = model.config
    latents = rng.standard_normal((batch, *grid, c.in_channels)).astype(np.float32)
    text = rng.standard_normal((batch, text_len, c.text_dim)).astype(np.float32)
    return latents, text


@pytest.mark.parametrize("timesteps", [[0.0, 999.0], [37.5, 500.0]])
@pytest.mark.parametrize("pad_text", [False, True])
def test_forward_matches_diffusers(case, timesteps, pad_text):
    model, flax_model, grid, text_len = case
    latents, text = _inputs(model, grid, text_len, batch=2, seed=int(sum(timesteps)))
    if pad_text:  # what the Wan pipeline does: the prompt's tokens, then zeros up to the text length
        text[0, 2:] = 0.0
        text[1, text_len - 1:] = 0.0
    t = np.asarray(timesteps, np.float32)
    ref = wan_reference.torch_forward(model, latents, t, text)
    out = np.asarray(flax_model(jnp.asarray(latents), jnp.asarray(t), jnp.asarray(text)))
    assert out.shape == ref.shape
    assert wan_reference.relative_error(out, ref) < 1e-4


def test_original_layout_matches_diffusers(tmp_path):
    """Original Wan key names (with the ComfyUI-style prefix) convert to the same model."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model = wan_reference.build_wan(seed=3, num_attention_heads=3, attention_head_dim=8, text_dim=24)
    # The test's renaming is checked against diffusers' own original->diffusers converter first.
    original = wan_reference.to_original_state_dict(model.state_dict(), prefix="model.diffusion_model.")
    back = convert_wan_transformer_to_diffusers(dict(original))
    assert set(back) == set(model.state_dict())

    wan_reference.save_original(model, str(tmp_path / "orig"), prefix="model.diffusion_model.")
    report = convert(str(tmp_path / "orig"), str(tmp_path / "flax"))
    assert report["layout"] == "original"
    latents, text = _inputs(model, (3, 4, 4), 6, batch=1, seed=1)
    t = np.asarray([250.0], np.float32)
    ref = wan_reference.torch_forward(model, latents, t, text)
    out = np.asarray(load_dit(str(tmp_path / "flax"))(jnp.asarray(latents), jnp.asarray(t), jnp.asarray(text)))
    assert wan_reference.relative_error(out, ref) < 1e-4


def test_bfloat16_storage_and_compute_stays_close(tmp_path):
    model = wan_reference.build_wan(seed=5)
    wan_reference.save_diffusers(model, str(tmp_path / "torch"))
    convert(str(tmp_path / "torch"), str(tmp_path / "flax"), dtype="bfloat16")
    flax_model = load_dit(str(tmp_path / "flax"), dtype="bfloat16")
    assert flax_model.blocks.attn1.to_q.kernel[...].dtype == jnp.bfloat16
    latents, text = _inputs(model, (3, 4, 4), 5, batch=1, seed=2)
    t = np.asarray([400.0], np.float32)
    ref = wan_reference.torch_forward(model, latents, t, text)
    inputs = (jnp.asarray(latents), jnp.asarray(t), jnp.asarray(text))
    out = np.asarray(flax_model(*inputs).astype(jnp.float32))
    assert wan_reference.relative_error(out, ref) < 5e-2
    # The final norm and output head compute in float32 under bf16 compute (Wan's head runs under float32
    # autocast): the last matmul of the forward, after the scanned blocks, reads and writes float32.
    jaxpr = jax.make_jaxpr(flax_model)(*inputs).jaxpr
    head = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"][-1]
    assert [v.aval.dtype for v in head.invars + head.outvars] == [jnp.float32] * 3
    block = [e for e in jaxpr.eqns if e.primitive.name == "scan"][0]
    assert block.outvars[0].aval.dtype == jnp.bfloat16  # the blocks themselves do run in bf16
