"""tools/export_diffusers.py: diffusers WanTransformer3DModel -> Flax -> export -> diffusers is the identity on
weights, matches the Flax forward, and the exported scheduler samples the student as JAX does."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

wan_reference = pytest.importorskip("wan_reference")
from dollar_jax.checkpoint import PARAMS_DIR, CheckpointError, abstract_dit, load_dit  # noqa: E402
from dollar_jax.checkpoint import read_model_folder_config, restore_pytree, write_model_folder  # noqa: E402
from dollar_jax.convert import ConversionError, convert  # noqa: E402
from dollar_jax.convert.wan import _flatten, _unflatten  # noqa: E402
from dollar_jax.convert.wan_export import diffusers_tensors, export  # noqa: E402
from dollar_jax.models.dit_config import DiTConfig  # noqa: E402

torch = wan_reference.torch
pytestmark = pytest.mark.torch
ROOT = os.path.dirname(os.path.dirname(__file__))
STUDENT_TIMESTEPS = [999.0, 749.0, 499.0, 249.0]
LATENT_SHAPE = (3, 4, 6, 4)  # [F, H, W, C] of the tiny Wan (4 channels)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = wan_reference.build_wan(seed=3)
    wan_reference.save_diffusers(model, str(root / "torch"))
    convert(str(root / "torch"), str(root / "flax"))
    student = wan_reference.make_student_folder(str(root / "flax"), str(root / "student"), STUDENT_TIMESTEPS,
                                               LATENT_SHAPE, (6, 32))
    # A small shard limit: the export is several shards with an index, as real checkpoints are.
    report = export(student, str(root / "hf"), max_shard_size="40KB")
    return {"root": root, "torch": model, "student": student, "hf": str(root / "hf"), "report": report}


def test_round_trip_gives_identical_weights_in_a_sharded_folder(exported):
    from diffusers import WanTransformer3DModel

    hf = exported["hf"]
    assert len(exported["report"]["files"]) > 1
    assert os.path.exists(os.path.join(hf, "transformer", "diffusion_pytorch_model.safetensors.index.json"))
    loaded, info = WanTransformer3DModel.from_pretrained(os.path.join(hf, "transformer"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    original = exported["torch"].state_dict()
    roundtrip = loaded.state_dict()
    assert set(original) == set(roundtrip)
    for key, value in original.items():
        assert torch.equal(value, roundtrip[key]), key
    assert loaded.config.num_layers == exported["torch"].config.num_layers


def test_exported_forward_and_scheduler_reproduce_the_student(exported, monkeypatch):
    """The exported transformer's forward matches the Flax model, and diffusers' FlowMatchLCMScheduler,
    configured by the export and run as the README's recipe, gives the JAX student's 4-step samples when
    both draw the same re-noising noise."""
    import diffusers.schedulers.scheduling_flow_match_lcm as lcm
    from diffusers import FlowMatchLCMScheduler, WanTransformer3DModel
    from flax import nnx

    from dollar_jax.checkpoint import teacher_parameterisation
    from dollar_jax.eval.generate import make_generate, student_spec

    hf = exported["hf"]
    with open(os.path.join(hf, "dollar_sampler.json")) as f:
        sampler = json.load(f)
    assert sampler["timesteps"] == STUDENT_TIMESTEPS
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((2, *LATENT_SHAPE)).astype(np.float32)
    text = rng.standard_normal((2, 6, 32)).astype(np.float32)

    # JAX: the sampler dollar_jax.sample uses.
    schedule, prediction_type, _ = teacher_parameterisation(exported["student"])
    from dollar_jax.parallel import make_mesh

    # One device: compiling the sampler for 8 virtual devices would only slow the test down.
    graphdef, params = nnx.split(load_dit(exported["student"], mesh=make_mesh({"fsdp": 1}, jax.devices()[:1])))
    generate = make_generate(lambda p: nnx.merge(graphdef, p), schedule, prediction_type,
                             student_spec(STUDENT_TIMESTEPS, 0.5, 10.0))
    key = jax.random.key(7)
    want = np.asarray(generate(params, jnp.asarray(noise), jnp.asarray(text), jnp.zeros_like(text), key))
    # The noises `samplers.sample` draws at each step (split, then normal), fed to the torch scheduler.
    renoise = []
    for _ in STUDENT_TIMESTEPS:
        key, sub = jax.random.split(key)
        renoise.append(torch.from_numpy(np.asarray(jax.random.normal(sub, noise.shape)).transpose(0, 4, 1, 2, 3).copy()))
    monkeypatch.setattr(lcm, "randn_tensor", lambda shape, **kw: renoise.pop(0))

    transformer = WanTransformer3DModel.from_pretrained(os.path.join(hf, "transformer")).eval()
    t = np.asarray([999.0, 249.0], np.float32)
    ref = wan_reference.torch_forward(transformer, noise, t, text)
    out = np.asarray(jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))(params, noise, t, text))
    assert wan_reference.relative_error(out, ref) < 1e-4

    # diffusers: the README recipe.
    scheduler = FlowMatchLCMScheduler.from_pretrained(os.path.join(hf, "scheduler"))
    scheduler.set_timesteps(sigmas=sampler["sigmas"])
    np.testing.assert_allclose(scheduler.timesteps.numpy(), STUDENT_TIMESTEPS, rtol=1e-6)
    x = torch.from_numpy(noise.transpose(0, 4, 1, 2, 3).copy())
    emb = torch.from_numpy(text)
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = transformer(x, t.expand(len(x)), emb, return_dict=False)[0]
            x = scheduler.step(v, t, x).prev_sample
    got = x.numpy().transpose(0, 2, 3, 4, 1)
    assert not renoise
    assert wan_reference.relative_error(got, want) < 1e-4


def _flat_params(folder):
    section, _ = read_model_folder_config(folder, "dit")
    config = DiTConfig.from_dict(section)
    _, abstract, _ = abstract_dit(config)
    flat = _flatten(restore_pytree(os.path.join(folder, PARAMS_DIR), abstract))
    return config, {k: np.asarray(v) for k, v in flat.items()}


def test_missing_or_misshaped_parameter_is_named(exported):
    config, flat = _flat_params(exported["student"])
    missing = dict(flat)
    missing.pop("blocks/ffn/fc_in/bias")
    with pytest.raises(ConversionError, match="missing: blocks/ffn/fc_in/bias"):
        list(diffusers_tensors(config, missing))
    bad = dict(flat, **{"patch_embedding/kernel": np.zeros((17, 24), np.float32)})
    with pytest.raises(ConversionError, match="mis-shaped: patch_embedding/kernel"):
        list(diffusers_tensors(config, bad))
    extra = dict(flat, **{"blocks/attn1/extra/kernel": np.zeros((2, 3, 3), np.float32)})
    with pytest.raises(ConversionError, match="unexpected: blocks/attn1/extra/kernel"):
        list(diffusers_tensors(config, extra))


def test_folder_with_a_missing_tensor_writes_nothing(exported, tmp_path):
    """A model folder whose weights lack a tensor: the error names it and no output (not even partial) appears."""
    config, flat = _flat_params(exported["student"])
    flat.pop("proj_out/bias")
    _, blob = read_model_folder_config(exported["student"], "dit")
    broken = write_model_folder(str(tmp_path / "broken"), blob, _unflatten(flat))
    dst = tmp_path / "out" / "hf"
    with pytest.raises(CheckpointError, match="missing: proj_out/bias"):
        export(broken, str(dst))
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_cli_error_is_one_line_and_keeps_existing_output(exported, tmp_path):
    """One subprocess: an existing --dst is refused with one error line and left as it was."""
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export_diffusers.py"),
                          f"--model={exported['student']}", f"--dst={dst}"],
                         cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "already exists" in errors[0] and "--overwrite" in errors[0]
    assert (dst / "keep.txt").read_text() == "precious"
