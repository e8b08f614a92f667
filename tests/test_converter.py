"""Converter behaviour on good and bad checkpoints (synthetic safetensors; no torch needed)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dollar_jax.checkpoint import CheckpointError, abstract_dit, load_dit
from dollar_jax.convert import ConversionError, convert
from dollar_jax.convert import safetensors_io as st
from dollar_jax.convert.wan import WAN_TABLE
from dollar_jax.models import preset

CFG = preset("tiny", num_layers=2)
DIFFUSERS_CONFIG = {
    "_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 2,
    "attention_head_dim": 12, "in_channels": 4, "out_channels": 4, "text_dim": 32, "freq_dim": 32, "ffn_dim": 64,
    "num_layers": 2, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
    "rope_max_seq_len": 64, "image_dim": None, "added_kv_proj_dim": None,
}


def _inverse_shape(transform, shape):
    """Torch-side shape of a Flax parameter, for synthesising a source checkpoint."""
    if transform.name == "linear":
        return shape[::-1]
    if transform.name == "squeeze_leading":
        return (1, *shape)
    if transform.name == "conv3d_to_patch":
        pt, ph, pw = CFG.patch_size
        return (shape[1], CFG.in_channels, pt, ph, pw)
    return shape


def synthetic_state_dict(seed=0) -> dict[str, np.ndarray]:
    """A diffusers-layout state dict with random values, shaped from the conversion table + eval_shape."""
    _, abstract, _ = abstract_dit(CFG)
    rng = np.random.default_rng(seed)
    out = {}
    for row in WAN_TABLE:
        node = abstract
        for part in row.target.split("/"):
            node = node[part]
        shape = tuple(node.shape)
        layers = range(CFG.num_layers) if row.per_layer else [None]
        for i in layers:
            s = shape[1:] if i is not None else shape
            key = row.diffusers.format(i=i) if i is not None else row.diffusers
            out[key] = rng.standard_normal(_inverse_shape(row.transform, s)).astype(np.float32)
    return out


def write_checkpoint(folder, tensors, shards=1, config=DIFFUSERS_CONFIG):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    names = sorted(tensors)
    if shards == 1:
        st.write_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"), tensors)
        return folder
    weight_map = {}
    for s in range(shards):
        fname = f"diffusion_pytorch_model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        st.write_file(os.path.join(folder, fname), part)
        weight_map.update({n: fname for n in part})
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return folder


def test_sharded_checkpoint_with_index_converts_and_places_every_value(tmp_path):
    sd = synthetic_state_dict()
    src = write_checkpoint(str(tmp_path / "src"), sd, shards=3)
    report = convert(src, str(tmp_path / "dst"))
    assert report["tensors"] == len(sd)
    model = load_dit(str(tmp_path / "dst"))
    # Spot-check each transform family against the source values.
    np.testing.assert_array_equal(model.blocks.attn1.to_q.kernel[...][1], sd["blocks.1.attn1.to_q.weight"].T)
    np.testing.assert_array_equal(model.blocks.scale_shift_table[...][0], sd["blocks.0.scale_shift_table"][0])
    np.testing.assert_array_equal(model.blocks.norm2.bias[...][1], sd["blocks.1.norm2.bias"])
    w = sd["patch_embedding.weight"]  # (out, in, pt, ph, pw) -> rows ordered (pt, ph, pw, in)
    np.testing.assert_array_equal(model.patch_embedding.kernel[...][1 * CFG.in_channels + 2], w[:, 2, 0, 0, 1])
    np.testing.assert_array_equal(model.proj_out.kernel[...], sd["proj_out.weight"].T)


def test_bfloat16_source_tensors_convert(tmp_path):
    import ml_dtypes

    sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in synthetic_state_dict().items()}
    src = write_checkpoint(str(tmp_path / "src"), sd)
    convert(src, str(tmp_path / "dst"), dtype="bfloat16")
    model = load_dit(str(tmp_path / "dst"), param_dtype="bfloat16")
    assert model.proj_out.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(model.proj_out.kernel[...]), sd["proj_out.weight"].T)


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda sd: sd.pop("blocks.1.attn2.to_k.weight"), "missing: blocks.1.attn2.to_k.weight"),
        (lambda sd: sd.__setitem__("blocks.0.ffn.net.2.bias", np.zeros((7,), np.float32)),
         "mis-shaped: blocks.0.ffn.net.2.bias"),
        (lambda sd: sd.__setitem__("blocks.0.attn1.to_q.weight", np.zeros((24, 25), np.float32)),
         "mis-shaped: blocks.0.attn1.to_q.weight"),
        (lambda sd: sd.__setitem__("blocks.0.attn1.extra_proj.weight", np.zeros((3,), np.float32)),
         "unexpected: blocks.0.attn1.extra_proj.weight"),
        (lambda sd: sd.__setitem__("blocks.2.attn1.to_q.weight", np.zeros((24, 24), np.float32)),
         "unexpected: blocks.2.attn1.to_q.weight"),
    ],
    ids=["missing", "bias-reshaped", "weight-reshaped", "unknown-key", "extra-layer"],
)
def test_bad_checkpoint_names_the_key_and_writes_nothing(tmp_path, damage, expected):
    sd = synthetic_state_dict()
    damage(sd)
    src = write_checkpoint(str(tmp_path / "src"), sd)
    dst = tmp_path / "out" / "model"
    with pytest.raises(ConversionError) as err:
        convert(src, str(dst))
    assert expected in str(err.value)
    assert not dst.exists()
    leftovers = os.listdir(tmp_path / "out") if (tmp_path / "out").exists() else []
    assert leftovers == []


def test_truncated_shard_is_reported_before_anything_is_written(tmp_path):
    src = write_checkpoint(str(tmp_path / "src"), synthetic_state_dict(), shards=2)
    shard = sorted(p for p in os.listdir(src) if p.endswith("00002.safetensors"))[0]
    path = os.path.join(src, shard)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(st.SafetensorsError, match="truncated"):
        convert(src, str(tmp_path / "dst"))
    assert not (tmp_path / "dst").exists()


def test_existing_destination_is_not_overwritten(tmp_path):
    src = write_checkpoint(str(tmp_path / "src"), synthetic_state_dict())
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    with pytest.raises(ConversionError, match="already exists"):
        convert(src, str(dst))
    assert (dst / "keep.txt").read_text() == "precious"


def test_image_conditioned_config_is_rejected(tmp_path):
    config = dict(DIFFUSERS_CONFIG, image_dim=1280)
    src = write_checkpoint(str(tmp_path / "src"), synthetic_state_dict(), config=config)
    with pytest.raises(ValueError, match="Image-conditioned"):
        convert(src, str(tmp_path / "dst"))


def test_loading_a_checkpoint_of_another_size_lists_the_mismatch(tmp_path):
    src = write_checkpoint(str(tmp_path / "src"), synthetic_state_dict())
    convert(src, str(tmp_path / "dst"))
    cfg_path = tmp_path / "dst" / "config.json"
    blob = json.loads(cfg_path.read_text())
    blob["dit"]["ffn_dim"] = 48
    cfg_path.write_text(json.dumps(blob))
    with pytest.raises(CheckpointError, match="mis-shaped: blocks/ffn/fc_in/kernel"):
        load_dit(str(tmp_path / "dst"))


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_weights", os.path.join(
        os.path.dirname(__file__), "..", "tools", "convert_weights.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    sd = synthetic_state_dict()
    sd.pop("proj_out.bias")
    src = write_checkpoint(str(tmp_path / "src"), sd)
    assert cli.main(["--src", src, "--dst", str(tmp_path / "dst")]) == 1
    assert "missing: proj_out.bias" in capsys.readouterr().err
    sd = synthetic_state_dict()
    src = write_checkpoint(str(tmp_path / "src2"), sd)
    assert cli.main(["--src", src, "--dst", str(tmp_path / "dst")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tensors"] == len(sd)



def test_cli_stays_on_the_host_cpu():
    # On a TPU worker the converter must not grab the chips: JAX_PLATFORMS=cpu is set before the tool's own
    # imports load JAX (a platform the user set is kept: os.environ.setdefault).
    import subprocess
    import sys

    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "convert_weights.py")
    probe = (f"import os, runpy, sys; runpy.run_path({tool!r}, run_name='probe'); "
             "print(os.environ['JAX_PLATFORMS'], 'jax' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["cpu", "True"]  # set, and JAX was imported after it
