"""dollar-jax model folder -> diffusers: a `WanTransformer3DModel` folder plus the scheduler that samples it.

The tensors come from the converter's own table (`wan.WAN_TABLE`) read backwards: every row's diffusers
key receives `transform.invert` of its Flax array (one layer slice for stacked blocks), so import and
export cannot drift apart. Each exported tensor is checked by running the forward shape rule on it: it must
land exactly on the Flax parameter it came from, or the export stops naming the key.

Written layout (a diffusers pipeline folder without the text encoder and VAE, which are unchanged):
    DST/transformer/   config.json + diffusion_pytorch_model[-0000k-of-0000n].safetensors (+ index)
    DST/scheduler/     scheduler_config.json (FlowMatchLCMScheduler for a student, FlowMatchEuler for a teacher)
    DST/dollar_sampler.json   the exact grid (sigmas), guidance and the recipe (README "Export to diffusers")
Everything is written into `.DST.partial` and renamed into place when complete: an error leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np

from dollar_jax.convert import safetensors_io as st
from dollar_jax.convert.wan import ConversionError, _flatten, expand_table
from dollar_jax.models.dit_config import DiTConfig

INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_FILE = "diffusion_pytorch_model.safetensors"
SAMPLER_FILE = "dollar_sampler.json"
DTYPES = ("keep", "float32", "bfloat16")


def parse_size(text: str) -> int:
    """'5GB' / '200MB' / '1024' -> bytes (decimal units, as diffusers' max_shard_size)."""
    text = str(text).strip().upper()
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def diffusers_config(config: DiTConfig) -> dict:
    """The WanTransformer3DModel config.json of a DiTConfig (the inverse of `DiTConfig.from_diffusers`)."""
    if config.rope_theta != 10000.0:
        raise ConversionError(f"rope_theta={config.rope_theta}: diffusers' WanTransformer3DModel fixes it at 10000")
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(config.patch_size), "num_attention_heads": config.num_attention_heads,
        "attention_head_dim": config.attention_head_dim, "in_channels": config.in_channels,
        "out_channels": config.out_channels, "text_dim": config.text_dim, "freq_dim": config.freq_dim,
        "ffn_dim": config.ffn_dim, "num_layers": config.num_layers, "cross_attn_norm": config.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads", "eps": config.eps, "image_dim": None, "added_kv_proj_dim": None,
        "rope_max_seq_len": config.rope_max_seq_len, "pos_embed_seq_len": None,
    }


def diffusers_tensors(config: DiTConfig, flat_params: dict[str, np.ndarray]):
    """Yield (diffusers key, torch-layout array) for every parameter, in table order. `flat_params` maps
    'a/b/c' Flax paths to arrays. Checked first, against the parameter shapes `config` implies, and reported
    together: every missing, unexpected or mis-shaped parameter, and any the table cannot export."""
    from dollar_jax.checkpoint import abstract_dit

    expected = {k: tuple(v.shape) for k, v in _flatten(abstract_dit(config)[1]).items()}
    plan = expand_table("diffusers", config.num_layers, set(expected))
    covered = {a.target for a in plan.values()}
    lines = [f"  missing: {k} (diffusers {', '.join(sorted(n for n, a in plan.items() if a.target == k)[:1])})"
             for k in sorted(set(expected) - set(flat_params))]
    lines += [f"  unexpected: {k}" for k in sorted(set(flat_params) - set(expected))]
    lines += [f"  mis-shaped: {k}: {tuple(flat_params[k].shape)}, the config needs {expected[k]}"
              for k in sorted(set(expected) & set(flat_params)) if tuple(flat_params[k].shape) != expected[k]]
    lines += [f"  no table row exports: {k} (dollar_jax/convert/wan.py is out of date)"
              for k in sorted(set(expected) - covered)]
    if lines:
        raise ConversionError("\n".join([f"The parameters do not match a Wan transformer with {config.num_layers} "
                                          f"layers; nothing was written:", *lines]))
    for key, a in plan.items():
        array = flat_params[a.target]
        source = array if a.layer is None else array[a.layer]
        out = a.transform.invert(np.asarray(source), config)
        # The forward rule must bring the exported tensor back onto its Flax parameter: the two directions agree.
        if tuple(a.transform.shape(tuple(out.shape))) != tuple(source.shape):
            raise ConversionError(f"{key}: exported shape {tuple(out.shape)} does not map back to {a.target} "
                                  f"{tuple(source.shape)} through {a.transform.name} (conversion table bug)")
        yield key, out


def write_sharded(folder: str, tensors, max_shard_bytes: int, dtype: np.dtype | None) -> dict:
    """Write (key, array) pairs as diffusers safetensors shards (+ index when more than one)."""
    os.makedirs(folder, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    total = 0
    for key, array in tensors:
        array = np.ascontiguousarray(array if dtype is None else array.astype(dtype))
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = array
        size += array.nbytes
        total += array.nbytes
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for name, shard in zip(names, shards):
        st.write_file(os.path.join(folder, name), shard, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    if n > 1:
        with open(os.path.join(folder, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return {"files": names, "tensors": len(weight_map), "bytes": total}


def scheduler_for(blob: dict) -> tuple[dict | None, dict]:
    """(scheduler_config.json or None, dollar_sampler.json) reproducing the folder's own sampler in diffusers.

    Student (consistency multistep): FlowMatchLCMScheduler with shift 1 and the trained grid passed as
    `sigmas`: it predicts x0 = x_t - sigma v and re-noises to the next sigma with fresh noise, as
    `dollar_jax.diffusion.samplers.sample(renoise="fresh")`. LCM's boundary scaling is left out: at the
    student's timesteps (t >= 19) c_skip < 1e-5 and 1 - c_out < 1e-5, below bfloat16 resolution.
    Teacher: FlowMatchEulerDiscreteScheduler with Wan's shift (Euler == our DDIM on the flow schedule).
    """
    diffusion = blob.get("diffusion", {})
    sampler: dict = {"schedule": diffusion.get("schedule"), "prediction_type": diffusion.get("prediction_type")}
    if diffusion.get("schedule") != "flow" or diffusion.get("prediction_type") != "flow":
        sampler["scheduler"] = None
        sampler["why_no_scheduler"] = (f"diffusers has no scheduler for schedule {diffusion.get('schedule')!r} with "
                                       f"prediction type {diffusion.get('prediction_type')!r}; only Wan's flow "
                                       f"parameterisation is exported with one")
        return None, sampler
    if "student" in blob:
        timesteps = [float(t) for t in blob["student"]["timesteps"]]
        sampler.update(scheduler="FlowMatchLCMScheduler", kind="student (consistency multistep)",
                       timesteps=timesteps, sigmas=[t / 1000.0 for t in timesteps], guidance_scale=None,
                       steps_available=[n for n in range(1, len(timesteps) + 1) if len(timesteps) % n == 0])
        return {"_class_name": "FlowMatchLCMScheduler", "num_train_timesteps": 1000, "shift": 1.0}, sampler
    shift = float(diffusion.get("flow_shift", 3.0))
    sampler.update(scheduler="FlowMatchEulerDiscreteScheduler", kind="teacher (Euler = DDIM on the flow schedule)",
                   sigmas_for_50_steps=np.linspace(1.0, 0.0, 51)[:-1].tolist(), guidance_scale=5.0,
                   guidance_convention="uncond + w (cond - uncond)")
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": shift}, sampler


def export(model_dir: str, dst: str, dtype: str = "keep", max_shard_size: str = "5GB", overwrite: bool = False) -> dict:
    """Export the model folder `model_dir` to the diffusers folder `dst` (layout in the module docstring)."""
    import jax

    from dollar_jax.checkpoint import PARAMS_DIR, abstract_dit, read_model_config, restore_pytree

    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise ConversionError(f"{dst} already exists; pass --overwrite to replace it")
    config, blob = read_model_config(model_dir)
    hf_config = diffusers_config(config)
    # Restore onto the host CPU whatever the default backend: the arrays only pass through to files.
    _, abstract, _ = abstract_dit(config)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), abstract)
    params = restore_pytree(os.path.join(model_dir, PARAMS_DIR), target)
    flat = {k: np.asarray(v) for k, v in _flatten(params).items()}
    np_dtype = None if dtype == "keep" else np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    scheduler, sampler = scheduler_for(blob)

    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        written = write_sharded(os.path.join(tmp, "transformer"), diffusers_tensors(config, flat),
                                parse_size(max_shard_size), np_dtype)
        with open(os.path.join(tmp, "transformer", "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        if scheduler is not None:
            os.makedirs(os.path.join(tmp, "scheduler"))
            with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
                json.dump(scheduler, f, indent=2)
        with open(os.path.join(tmp, SAMPLER_FILE), "w") as f:
            json.dump({**sampler, "source": os.path.abspath(model_dir)}, f, indent=2)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"dst": dst, **written, "scheduler": sampler.get("scheduler"),
            **({"warning": sampler["why_no_scheduler"]} if scheduler is None else {})}
