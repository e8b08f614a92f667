"""Wan2.1 transformer: PyTorch checkpoint (diffusers or original layout) -> dollar-jax model folder.

The mapping is one declarative table, `WAN_TABLE`: one row per parameter family with its name in the
diffusers layout, its name in the original Wan layout, its path in the Flax parameter tree, and the
transform that turns the torch tensor into the Flax array. "{i}" stands for the block index; rows under
"blocks/" fill one slice of a stacked [num_layers, ...] array.

Conversion is checked before any tensor data is read: the expected parameter shapes come from
`nnx.eval_shape` of the target model, the source shapes from the safetensors headers, and every missing,
unexpected or mis-shaped key is reported together. Data is then streamed tensor by tensor into
preallocated destination arrays (peak memory: one copy of the weights plus one tensor), written to a
temporary folder, and renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable

import ml_dtypes
import numpy as np

from dollar_jax import storage
from dollar_jax.checkpoint import abstract_dit, aligned_empty, write_model_folder
from dollar_jax.convert import safetensors_io as st
from dollar_jax.models.dit_config import DiTConfig


class ConversionError(ValueError):
    """The source checkpoint does not match the model it claims to be."""


# ---- transforms -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Transform:
    """One torch <-> Flax tensor layout change, in both directions (import and export share the table)."""

    name: str
    shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # source shape -> Flax shape (for checking)
    apply: Callable[[np.ndarray], np.ndarray]  # torch -> Flax; may return a view
    # Flax -> torch, given the model's config (a patch kernel does not know its own patch size); None for a
    # table that is only ever read one way (the VAE's: nothing exports a VAE).
    invert: Callable[[np.ndarray, DiTConfig], np.ndarray] | None = None


IDENTITY = Transform("identity", lambda s: s, lambda a: a, lambda a, c: a)
# torch Linear stores (out, in); Flax Dense uses (in, out).
LINEAR = Transform("linear", lambda s: s[::-1] if len(s) == 2 else ("bad", s), lambda a: a.T, lambda a, c: a.T)
# Conv3d (out, in, pt, ph, pw) with stride == kernel == patch is a matmul over flattened (pt, ph, pw, in)
# patches; that flattening order is the one WanDiT's patchify uses.
CONV3D_TO_PATCH = Transform(
    "conv3d_to_patch",
    lambda s: (s[2] * s[3] * s[4] * s[1], s[0]) if len(s) == 5 else ("bad", s),
    lambda a: a.transpose(2, 3, 4, 1, 0).reshape(-1, a.shape[0]),
    lambda a, c: a.reshape(*c.patch_size, c.in_channels, a.shape[-1]).transpose(4, 3, 0, 1, 2),
)
# The modulation tables are stored as (1, n, dim); the Flax parameter is (n, dim).
SQUEEZE_LEADING = Transform(
    "squeeze_leading", lambda s: s[1:] if len(s) > 1 and s[0] == 1 else ("bad", s), lambda a: a[0],
    lambda a, c: a[None],
)


@dataclasses.dataclass(frozen=True)
class Row:
    diffusers: str
    original: str
    target: str
    transform: Transform = IDENTITY

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.diffusers


def _linear(diffusers: str, original: str, target: str) -> tuple[Row, Row]:
    return (Row(f"{diffusers}.weight", f"{original}.weight", f"{target}/kernel", LINEAR),
            Row(f"{diffusers}.bias", f"{original}.bias", f"{target}/bias"))


def _attention(flax_name: str, original_name: str) -> tuple[Row, ...]:
    rows: list[Row] = []
    for diffusers_proj, original_proj, flax_proj in (("to_q", "q", "to_q"), ("to_k", "k", "to_k"),
                                                      ("to_v", "v", "to_v"), ("to_out.0", "o", "to_out")):
        rows += _linear(f"blocks.{{i}}.{flax_name}.{diffusers_proj}", f"blocks.{{i}}.{original_name}.{original_proj}",
                        f"blocks/{flax_name}/{flax_proj}")
    for norm in ("norm_q", "norm_k"):
        rows.append(Row(f"blocks.{{i}}.{flax_name}.{norm}.weight", f"blocks.{{i}}.{original_name}.{norm}.weight",
                        f"blocks/{flax_name}/{norm}/scale"))
    return tuple(rows)


WAN_TABLE: tuple[Row, ...] = (
    Row("patch_embedding.weight", "patch_embedding.weight", "patch_embedding/kernel", CONV3D_TO_PATCH),
    Row("patch_embedding.bias", "patch_embedding.bias", "patch_embedding/bias"),
    *_linear("condition_embedder.time_embedder.linear_1", "time_embedding.0", "condition_embedder/time_linear_1"),
    *_linear("condition_embedder.time_embedder.linear_2", "time_embedding.2", "condition_embedder/time_linear_2"),
    *_linear("condition_embedder.time_proj", "time_projection.1", "condition_embedder/time_proj"),
    *_linear("condition_embedder.text_embedder.linear_1", "text_embedding.0", "condition_embedder/text_linear_1"),
    *_linear("condition_embedder.text_embedder.linear_2", "text_embedding.2", "condition_embedder/text_linear_2"),
    *_attention("attn1", "self_attn"),
    *_attention("attn2", "cross_attn"),
    # The cross-attention LayerNorm is "norm2" in diffusers and "norm3" in the original code.
    Row("blocks.{i}.norm2.weight", "blocks.{i}.norm3.weight", "blocks/norm2/scale"),
    Row("blocks.{i}.norm2.bias", "blocks.{i}.norm3.bias", "blocks/norm2/bias"),
    *_linear("blocks.{i}.ffn.net.0.proj", "blocks.{i}.ffn.0", "blocks/ffn/fc_in"),
    *_linear("blocks.{i}.ffn.net.2", "blocks.{i}.ffn.2", "blocks/ffn/fc_out"),
    Row("blocks.{i}.scale_shift_table", "blocks.{i}.modulation", "blocks/scale_shift_table", SQUEEZE_LEADING),
    *_linear("proj_out", "head.head", "proj_out"),
    Row("scale_shift_table", "head.modulation", "scale_shift_table", SQUEEZE_LEADING),
)

# Keys that exist in some published checkpoints and carry nothing this model uses.
IGNORED_KEYS = ("norm_added_q",)
ORIGINAL_PREFIXES = ("model.diffusion_model.", "module.")
LAYOUTS = ("auto", "diffusers", "original")


# ---- the plan: every source tensor -> (target array, layer slice, transform) ------------------------------


@dataclasses.dataclass(frozen=True)
class Assignment:
    source: str
    target: str
    layer: int | None
    transform: Transform


def expand_table(layout: str, num_layers: int, targets: set[str]) -> dict[str, Assignment]:
    """Source key -> Assignment for the rows whose target exists in the model (e.g. no norm2 without
    cross_attn_norm: its keys in a checkpoint are then reported as unexpected)."""
    plan = {}
    for row in WAN_TABLE:
        if row.target not in targets:
            continue
        pattern = row.diffusers if layout == "diffusers" else row.original
        layers = range(num_layers) if row.per_layer else [None]
        for i in layers:
            key = pattern.format(i=i) if i is not None else pattern
            plan[key] = Assignment(key, row.target, i, row.transform)
    return plan


def _flatten(tree, prefix="") -> dict:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, path))
        else:
            out[path] = v
    return out


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def detect_layout(model_config: dict, names: set[str]) -> str:
    if "num_attention_heads" in model_config or any(n.startswith("condition_embedder.") for n in names):
        return "diffusers"
    if "num_heads" in model_config or any(".self_attn." in n for n in names):
        return "original"
    raise ConversionError("Cannot tell whether the checkpoint is in diffusers or original Wan layout; pass --layout")


def read_source(src: str, layout: str = "auto"):
    """(layout, DiTConfig kwargs source dict, {key: TensorEntry}) of a Wan checkpoint folder."""
    config_path = os.path.join(src, "config.json")
    if not os.path.exists(config_path):
        raise ConversionError(f"{src} has no config.json")
    with open(config_path) as f:
        model_config = json.load(f)
    entries = st.read_headers(st.find_files(src))
    renamed = {}
    for name, entry in entries.items():
        for prefix in ORIGINAL_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        renamed[name] = entry
    if layout == "auto":
        layout = detect_layout(model_config, set(renamed))
    if layout not in LAYOUTS[1:]:
        raise ConversionError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout, model_config, renamed


def plan_conversion(src: str, layout: str = "auto", **numerics):
    """Check everything that can be checked from headers; return what `convert` needs. Reads no tensor data."""
    layout, model_config, entries = read_source(src, layout)
    build = DiTConfig.from_diffusers if layout == "diffusers" else DiTConfig.from_original_wan
    config = build(model_config, **numerics)
    _, abstract, _ = abstract_dit(config)
    expected = _flatten(abstract)
    plan = expand_table(layout, config.num_layers, set(expected))

    missing = sorted(set(plan) - set(entries))
    unexpected = sorted(k for k in set(entries) - set(plan) if not any(ig in k for ig in IGNORED_KEYS))
    misshaped = []
    for key in sorted(set(plan) & set(entries)):
        a = plan[key]
        want = tuple(expected[a.target].shape)
        want = want[1:] if a.layer is not None else want
        got = a.transform.shape(entries[key].shape)
        if got != want:
            misshaped.append(f"{key}: source shape {entries[key].shape} -> {got} after {a.transform.name}, "
                             f"but {a.target} needs {want}")
    # Every target must be covered completely (all layers of stacked arrays).
    covered = {(a.target, a.layer) for a in plan.values()}
    uncovered = sorted(t for t in expected if (t, None) not in covered and (t, 0) not in covered)
    if missing or unexpected or misshaped or uncovered:
        lines = [f"{src} ({layout} layout) does not match a Wan transformer with {config.num_layers} layers:"]
        lines += [f"  missing: {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  mis-shaped: {k}" for k in misshaped]
        lines += [f"  no table row fills: {t} (conversion table out of date)" for t in uncovered]
        raise ConversionError("\n".join(lines))
    return config, layout, plan, entries, expected


def convert(src: str, dst: str, dtype: str = "float32", layout: str = "auto", overwrite: bool = False) -> dict:
    """Convert the Wan checkpoint folder `src` into the model folder `dst`. Returns a small report.

    `dtype` is the storage dtype of the written parameters ("float32" or "bfloat16"); the model's compute
    dtype can be chosen at load time. Nothing is written unless every key checks out and every tensor is read.
    """
    t0 = time.perf_counter()
    if storage.exists(dst) and not overwrite:
        raise ConversionError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    config, layout, plan, entries, expected = plan_conversion(src, layout, param_dtype=dtype)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)

    arrays = {path: aligned_empty(spec.shape, np_dtype) for path, spec in expected.items()}
    for key, a in plan.items():
        value = a.transform.apply(st.read_tensor(entries[key]))
        if a.layer is None:
            arrays[a.target][...] = value
        else:
            arrays[a.target][a.layer] = value
        del value

    write_model_folder(dst, {"dit": config.to_dict(), "source": {"format": f"wan-{layout}", "path": os.path.abspath(src)},
                             # Wan2.1's parameterisation: flow matching, velocity eps - x0, shift 3 (480p).
                             "diffusion": {"schedule": "flow", "prediction_type": "flow", "flow_shift": 3.0}},
                       _unflatten(arrays))
    n_params = sum(int(np.prod(a.shape)) for a in arrays.values())
    return {"layout": layout, "params": n_params, "tensors": len(plan), "seconds": time.perf_counter() - t0,
            "config": config.to_dict()}
