"""Orbax checkpoints of model weights: save, inspect, restore sharded, and load a ready DiT.

A model folder (what tools/convert_weights.py writes) holds:
    config.json   the DiTConfig (architecture + numerics) and where the weights came from
    params/       an Orbax (OCDBT) checkpoint of the model's parameters as a pure nested dict
Training runs use `dollar_jax.train.checkpointing` (CheckpointManager) on top of the same primitives.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from dollar_jax import storage
from dollar_jax.diffusion.schedules import make_schedule
from dollar_jax.models.autoencoder import Autoencoder, AutoencoderConfig
from dollar_jax.models.dit import WanDiT
from dollar_jax.models.dit_config import DiTConfig
from dollar_jax.models.layers import abstract, logical_axes
from dollar_jax.parallel.mesh import make_mesh
from dollar_jax.models.wan_vae import WanVAE, WanVAEConfig
from dollar_jax.models.world_encoder import WorldEncoder
from dollar_jax.parallel.sharding import current_mesh, tree_shardings

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
    """A checkpoint is missing, partial, corrupt, or does not fit the model it is loaded into."""


def save_pytree(path: str, tree) -> None:
    """Write `tree` (NumPy or JAX arrays) to a new Orbax checkpoint at `path` and wait for it.

    Built to cost almost no memory beyond the tree itself (the converter's peak-RSS budget):
    NumPy leaves allocated with `aligned_empty` are adopted by JAX without a copy; arrays are written
    uncompressed, whole-array chunks, one at a time, so TensorStore writes straight from their buffers.
    """
    leaves = jax.tree.leaves(tree)
    largest_gb = max((leaf.nbytes for leaf in leaves), default=0) / 1e9
    tree = jax.tree.map(lambda x: jax.device_put(x, may_alias=True) if isinstance(x, np.ndarray) else x, tree)
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=1.01 * largest_gb + 0.01, use_compression=False)
    ocp.Checkpointer(handler).save(storage.resolve(path), args=ocp.args.PyTreeSave(tree))


def aligned_empty(shape, dtype, alignment: int = 64) -> np.ndarray:
    """An uninitialised NumPy array whose buffer JAX's CPU backend can adopt without copying."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    offset = (-raw.ctypes.data) % alignment
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def stored_shapes(path: str) -> dict:
    """{flat key: (shape, dtype)} of an Orbax checkpoint, from its metadata only."""
    path = storage.resolve(path)
    if not storage.exists(path):
        raise CheckpointError(f"No checkpoint at {path}")
    if not storage.exists(storage.join(path, "commit_success.txt")) and not storage.exists(
        storage.join(path, "_CHECKPOINT_METADATA")
    ):
        raise CheckpointError(f"{path} is not a finished Orbax checkpoint (no commit marker): partial write?")
    try:
        tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    except Exception as e:  # noqa: BLE001 - orbax raises many types for corrupt metadata
        raise CheckpointError(f"Cannot read the checkpoint metadata at {path}: {e}") from e
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {_flat_key(p): (tuple(m.shape), m.dtype) for p, m in flat}


def _flat_key(path) -> str:
    """'a/b/0/c' for a key path of dict keys, attribute names (dataclasses) and sequence indices."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def check_compatible(path: str, target) -> None:
    """Raise a CheckpointError that lists every missing, unexpected or mis-shaped array."""
    stored = stored_shapes(path)
    flat = jax.tree_util.tree_flatten_with_path(target)[0]
    wanted = {_flat_key(p): tuple(leaf.shape) for p, leaf in flat}
    missing = sorted(set(wanted) - set(stored))
    unexpected = sorted(set(stored) - set(wanted))
    misshaped = sorted(
        f"{k}: stored {stored[k][0]}, expected {wanted[k]}" for k in set(wanted) & set(stored) if stored[k][0] != wanted[k]
    )
    if missing or unexpected or misshaped:
        raise CheckpointError(mismatch_report(f"Checkpoint {path} does not fit the model:", missing, unexpected,
                                              misshaped))


def mismatch_report(header: str, missing, unexpected, misshaped) -> str:
    """One error message listing every missing, unexpected and mis-shaped array under `header`."""
    lines = [header]
    lines += [f"  missing: {k}" for k in missing]
    lines += [f"  unexpected: {k}" for k in unexpected]
    lines += [f"  mis-shaped: {k}" for k in misshaped]
    return "\n".join(lines)


def restore_pytree(path: str, target):
    """Restore into `target` (a pytree of jax.ShapeDtypeStruct); dtypes are cast to the target's.

    Leaves without a sharding are placed on the first local device.
    """
    check_compatible(path, target)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda a: a if getattr(a, "sharding", None) is not None else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        target)
    try:
        return ocp.StandardCheckpointer().restore(storage.resolve(path), target)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"Reading the arrays of {path} failed (corrupt or truncated?): {e}") from e


# ---- model folders --------------------------------------------------------------------------------------
# A model folder is config.json ({section: config, "source": provenance}) + params/ (Orbax). The converter,
# the teacher job and the autoencoder job all write one; `load_dit` and the jobs read them.


def write_model_folder(folder: str, sections: dict[str, Any], params) -> str:
    """Write a complete model folder; config.json is what marks it complete (readers check for it).

    Locally the folder is built as a `.<name>.partial` sibling and renamed into place when complete, so an
    existing folder is replaced at once. On object stores (gs://, no directory rename) the folder is
    written in place: an older one is removed first, then params/ (Orbax commits it with its own marker),
    then config.json last; an interrupted export leaves a folder without config.json, which counts as
    absent and is rewritten by the next export.
    `sections` become config.json, e.g. {"dit": DiTConfig dict, "diffusion": {...}, "source": {...}}.
    `params` may be global arrays sharded over several hosts: every process calls this, each writes its own
    shards (Orbax), and process 0 alone writes config.json and renames; barriers keep them in step.
    """
    import shutil

    from jax.experimental import multihost_utils

    folder = storage.resolve(folder)
    remote = storage.is_remote(folder)
    config_text = json.dumps(sections, indent=2, sort_keys=True, default=list)
    tmp = folder if remote else os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.partial")
    leader = jax.process_index() == 0
    try:
        if leader:
            storage.rmtree(tmp)  # a crashed earlier export (or, on a store, the folder being replaced)
            storage.makedirs(tmp)
            if not remote:
                storage.write_text(os.path.join(tmp, CONFIG_FILE), config_text)
        multihost_utils.sync_global_devices(f"model folder {folder}: started")
        save_pytree(storage.join(tmp, PARAMS_DIR), params)
        multihost_utils.sync_global_devices(f"model folder {folder}: written")
        if leader:
            if remote:
                storage.write_text(storage.join(folder, CONFIG_FILE), config_text)  # the completion marker
            else:
                if os.path.exists(folder):
                    shutil.rmtree(folder)
                os.rename(tmp, folder)
        multihost_utils.sync_global_devices(f"model folder {folder}: done")
    except BaseException:
        if leader and not remote:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def model_folder_exists(folder: str) -> bool:
    """True when `folder` holds a complete model folder (its config.json, written last, exists)."""
    return storage.exists(storage.join(folder, CONFIG_FILE))


def read_model_folder_config(folder: str, section: str) -> tuple[dict, dict]:
    """(config.json[section], the whole config.json) of a model folder."""
    path = storage.join(folder, CONFIG_FILE)
    if not storage.is_remote(folder) and not os.path.isdir(folder):
        raise CheckpointError(f"No model folder at {folder}: the path does not exist (check the flag or config key "
                              f"that names it)")
    if not storage.exists(path):
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}: not a dollar-jax model folder")
    blob = storage.read_json(path)
    if section not in blob:
        raise CheckpointError(f"{path} has no {section!r} section (has {sorted(blob)})")
    return blob[section], blob


def read_model_config(folder: str) -> tuple[DiTConfig, dict]:
    d, blob = read_model_folder_config(folder, "dit")
    return DiTConfig.from_dict(d), blob


def abstract_dit(config: DiTConfig):
    """(graphdef, abstract pure-dict params, logical-axes tree) of a DiT, without allocating weights."""
    model = abstract(lambda: WanDiT(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state), logical_axes(state)


def load_dit(folder: str, mesh: jax.sharding.Mesh | None = None, **numerics) -> WanDiT:
    """Load a converted model folder as a ready `WanDiT`, its parameters sharded onto a mesh.

    Args:
      folder: what `tools/convert_weights.py` wrote (config.json + params/).
      mesh: the mesh to shard onto; defaults to the mesh set with `jax.set_mesh`, else all local devices
        on the fsdp axis. Placement follows the logical-axis rules in force (dollar_jax/parallel/rules.py).
      **numerics: DiTConfig overrides that do not change the weights' shapes, e.g. dtype="bfloat16",
        param_dtype="bfloat16", remat_policy="full", attention="cudnn".

    Example:
      >>> with jax.set_mesh(make_mesh({"fsdp": -1})):
      ...     teacher = load_dit("/ckpt/wan2.1-1.3b-flax", dtype="bfloat16")
      ...     video_pred = teacher(latents, timesteps, text_embeddings)
    """
    config, _ = read_model_config(folder)
    config = config.replace(**numerics)
    mesh = mesh or current_mesh() or make_mesh({"fsdp": -1})
    graphdef, abstract, axes = abstract_dit(config)
    shardings = tree_shardings(mesh, abstract, axes)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    params = restore_pytree(storage.join(folder, PARAMS_DIR), target)
    return nnx.merge(graphdef, params)


def teacher_parameterisation(folder: str):
    """(schedule, prediction_type, diffusion section) a DiT folder was trained with (students inherit the
    teacher's)."""
    d, _ = read_model_folder_config(folder, "diffusion")
    if d["schedule"] == "vp":
        schedule = make_schedule("vp", beta_schedule=d["beta_schedule"], beta_start=d["beta_start"],
                                 beta_end=d["beta_end"])
    else:
        schedule = make_schedule("flow", shift=d["flow_shift"])
    return schedule, d["prediction_type"], d


def _load_small(folder: str, section: str, build):
    """A small replicated model (autoencoder, evaluation encoder) from its folder: `build(section dict)`."""
    d, _ = read_model_folder_config(folder, section)
    graphdef, state = nnx.split(abstract(lambda: build(d)))
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.to_pure_dict(state))
    return nnx.merge(graphdef, restore_pytree(storage.join(folder, PARAMS_DIR), target))


def load_autoencoder(folder: str) -> Autoencoder:
    """The embedded world's exported video autoencoder (with its latent statistics)."""
    return _load_small(folder, "autoencoder",
                       lambda d: Autoencoder(AutoencoderConfig.from_config(d), rngs=nnx.Rngs(0)))


def load_world_encoder(folder: str) -> WorldEncoder:
    """The embedded world's evaluation encoder (factor classifier; features for Vendi and Frechet distance)."""
    return _load_small(folder, "world_encoder",
                       lambda d: WorldEncoder(d["classes"], d["width"], d["features"], rngs=nnx.Rngs(0)))


def load_wan_vae(folder: str, **numerics) -> WanVAE:
    """Wan2.1's VAE in Flax, from a converted model folder (config.json with a "wan_vae" section + params/,
    what `tools/convert_weights.py --kind=vae` writes) or straight from a diffusers AutoencoderKLWan folder.

    `numerics`: WanVAEConfig fields that leave the weights' shapes alone (dtype, param_dtype, encode_chunk,
    decode_chunk). Parameters land on the first local device (the VAE is small: replicate it if needed).
    """
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}: neither a model folder nor a diffusers VAE folder")
    with open(path) as f:
        blob = json.load(f)
    if "wan_vae" not in blob:
        if "_class_name" not in blob:
            raise CheckpointError(f"{path} has neither a 'wan_vae' section (a converted model folder) nor "
                                  "diffusers' '_class_name' (an AutoencoderKLWan folder)")
        from dollar_jax.convert.wan_vae import load_diffusers_vae  # convert/ builds on this module

        return load_diffusers_vae(folder, **numerics)
    config = WanVAEConfig.from_dict(blob["wan_vae"]).replace(**numerics)
    graphdef, state = nnx.split(abstract(lambda: WanVAE(config, rngs=nnx.Rngs(0))))
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.to_pure_dict(state))
    return nnx.merge(graphdef, restore_pytree(os.path.join(folder, PARAMS_DIR), target))


def dit_params(model: WanDiT) -> dict:
    """The pure-dict parameters of a model (what training states and checkpoints hold)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


__all__ = [
    "CheckpointError",
    "abstract_dit",
    "check_compatible",
    "dit_params",
    "load_autoencoder",
    "load_dit",
    "load_wan_vae",
    "load_world_encoder",
    "model_folder_exists",
    "read_model_config",
    "read_model_folder_config",
    "write_model_folder",
    "restore_pytree",
    "save_pytree",
    "stored_shapes",
    "teacher_parameterisation",
]
