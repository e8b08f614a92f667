"""Wan2.1 VAE: diffusers `AutoencoderKLWan` folder (config.json + safetensors) -> Flax `WanVAE`.

The Flax model's parameter names mirror diffusers' module names, so the mapping is one short table of
rules, `VAE_TABLE`, applied to every parameter path of the target model (from `nnx.eval_shape`): the
first rule whose pattern matches names the torch key and the transform. As for the transformer
(dollar_jax/convert/wan.py), every missing, unexpected or mis-shaped key is reported together from the
safetensors headers before any data is read, then tensors stream one at a time into preallocated arrays.

Only diffusers' layout is read (the original Wan2.1_VAE.pth is a pickle, not safetensors).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from dollar_jax.checkpoint import aligned_empty, mismatch_report, write_model_folder
from dollar_jax.convert import safetensors_io as st
from dollar_jax.convert.wan import IDENTITY, ConversionError, Transform, _flatten, _unflatten
from dollar_jax.models.layers import abstract
from dollar_jax.models.wan_vae import WanVAE, WanVAEConfig, WanVAEConfigError

# torch Conv{2,3}d (out, in, *window) -> channels-last (*window, in, out).
CONV = Transform(
    "conv_channels_last",
    lambda s: (*s[2:], s[1], s[0]) if len(s) >= 3 else ("bad", s),
    lambda a: a.transpose(*range(2, a.ndim), 1, 0),
    lambda a, c: a.transpose(a.ndim - 1, a.ndim - 2, *range(a.ndim - 2)),
)
# WanRMS_norm's gamma is stored broadcastable, (C, 1, 1) or (C, 1, 1, 1); the Flax scale is (C,).
RMS_GAMMA = Transform(
    "squeeze_trailing",
    lambda s: s[:1] if len(s) >= 1 and all(d == 1 for d in s[1:]) else ("bad", s),
    lambda a: a.reshape(a.shape[0]),
)


@dataclasses.dataclass(frozen=True)
class Rule:
    flax: str  # regex on the Flax parameter path ("/"-separated); group "p" is the module path
    torch: str  # the torch key, "{p}" being the module path with "." separators
    transform: Transform


VAE_TABLE: tuple[Rule, ...] = (
    # The spatial conv of a resampler sits at index 1 of an nn.Sequential (after the upsample / zero pad).
    Rule(r"(?P<p>.*)/resample/kernel", "{p}.resample.1.weight", CONV),
    Rule(r"(?P<p>.*)/resample/bias", "{p}.resample.1.bias", IDENTITY),
    Rule(r"(?P<p>.*)/kernel", "{p}.weight", CONV),
    Rule(r"(?P<p>.*)/bias", "{p}.bias", IDENTITY),
    Rule(r"(?P<p>.*)/gamma", "{p}.gamma", RMS_GAMMA),
)


def torch_key(flax_path: str) -> tuple[str, Transform]:
    for rule in VAE_TABLE:
        m = re.fullmatch(rule.flax, flax_path)
        if m:
            return rule.torch.format(p=m.group("p").replace("/", ".")), rule.transform
    raise ConversionError(f"no VAE_TABLE rule maps the Flax parameter {flax_path} (table out of date)")


def abstract_vae(config: WanVAEConfig):
    """(graphdef, abstract pure-dict params) of a WanVAE, without allocating weights."""
    graphdef, state = nnx.split(abstract(lambda: WanVAE(config, rngs=nnx.Rngs(0))))
    return graphdef, nnx.to_pure_dict(state)


def read_config(src: str, **numerics) -> WanVAEConfig:
    path = os.path.join(src, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{src} has no config.json")
    with open(path) as f:
        d = json.load(f)
    if d.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise ConversionError(f"{path} describes a {d['_class_name']}, not an AutoencoderKLWan")
    try:
        return WanVAEConfig.from_diffusers(d, **numerics)
    except (WanVAEConfigError, TypeError) as e:
        raise ConversionError(f"{path}: {e}") from e


def plan_conversion(src: str, **numerics):
    """Check every key and shape from the headers; return (config, graphdef, {torch key: (flax path,
    transform)}, entries, expected flat abstract params). Reads no tensor data."""
    config = read_config(src, **numerics)
    graphdef, abstract_params = abstract_vae(config)
    expected = _flatten(abstract_params)
    plan = {}
    for path in expected:
        key, transform = torch_key(path)
        plan[key] = (path, transform)
    entries = st.read_headers(st.find_files(src))
    missing = sorted(set(plan) - set(entries))
    unexpected = sorted(set(entries) - set(plan))
    misshaped = []
    for key in sorted(set(plan) & set(entries)):
        path, transform = plan[key]
        want, got = tuple(expected[path].shape), transform.shape(entries[key].shape)
        if got != want:
            misshaped.append(f"{key}: source shape {entries[key].shape} -> {got} after {transform.name}, "
                             f"but {path} needs {want}")
    if missing or unexpected or misshaped:
        raise ConversionError(mismatch_report(f"{src} does not match an AutoencoderKLWan with its config.json:",
                                              missing, unexpected, misshaped))
    return config, graphdef, plan, entries, expected


def read_arrays(src: str, param_dtype: str = "float32", **numerics):
    """(config, graphdef, flat {flax path: np.ndarray}) of a diffusers VAE folder, checked, one tensor in
    memory at a time. Arrays are stored in `param_dtype`; `numerics` (e.g. the compute `dtype`) go to the config."""
    config, graphdef, plan, entries, expected = plan_conversion(src, param_dtype=param_dtype, **numerics)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if param_dtype == "bfloat16" else np.dtype(param_dtype)
    arrays = {path: aligned_empty(spec.shape, np_dtype) for path, spec in expected.items()}
    for key, (path, transform) in plan.items():
        value = transform.apply(st.read_tensor(entries[key]))
        if not np.all(np.isfinite(value.astype(np.float32))):
            raise ConversionError(f"{src}: tensor {key} holds NaN or infinite values")
        arrays[path][...] = value
    return config, graphdef, arrays


def load_diffusers_vae(src: str, **numerics) -> WanVAE:
    """A ready WanVAE straight from a diffusers AutoencoderKLWan folder (no model folder written).

    `numerics`: WanVAEConfig fields that do not change the weights (dtype, param_dtype, encode_chunk,
    decode_chunk)."""
    _, graphdef, arrays = read_arrays(src, **numerics)
    params = jax.tree.map(jax.numpy.asarray, _unflatten(arrays))
    return nnx.merge(graphdef, params)


def convert(src: str, dst: str, dtype: str = "float32", overwrite: bool = False) -> dict:
    """Convert the diffusers VAE folder `src` into the model folder `dst` (config.json + params/).
    Nothing is written unless every key checks out and every tensor is read."""
    t0 = time.perf_counter()
    if os.path.exists(dst) and not overwrite:
        raise ConversionError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    config, _, arrays = read_arrays(src, dtype)
    write_model_folder(dst, {"wan_vae": config.to_dict(),
                             "source": {"format": "wan-vae-diffusers", "path": os.path.abspath(src)}},
                       _unflatten(arrays))
    return {"kind": "vae", "params": sum(int(a.size) for a in arrays.values()), "tensors": len(arrays),
            "seconds": time.perf_counter() - t0}
