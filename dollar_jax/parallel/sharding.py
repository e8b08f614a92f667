"""Logical axis names -> PartitionSpecs -> NamedShardings, for arrays and whole state pytrees."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dollar_jax.parallel.rules import Rule, current_rules

LogicalAxes = Sequence[str | None]
log = logging.getLogger(__name__)


def logical_to_spec(axes: LogicalAxes | None, rules: Sequence[Rule] | None = None) -> PartitionSpec:
    """Map logical names to mesh axes. A mesh axis is used at most once per array (first come first served)."""
    if axes is None:
        return PartitionSpec()
    table = dict(current_rules() if rules is None else rules)
    used: set[str] = set()
    out = []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"Logical axis {name!r} has no sharding rule; add it to dollar_jax/parallel/rules.py")
        target = table[name]
        targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        out.append(None if not targets else (targets[0] if len(targets) == 1 else targets))
    return PartitionSpec(*out)


def _mesh_axis_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes if hasattr(mesh, "axis_sizes") else mesh.devices.shape))


def check_divisible(spec: PartitionSpec, shape: Sequence[int], mesh, what: str) -> None:
    """A sharded dimension must divide evenly; say which array and dimension does not."""
    sizes = _mesh_axis_sizes(mesh)
    for dim, entry in enumerate(spec):
        if entry is None:
            continue
        axes = (entry,) if isinstance(entry, str) else tuple(entry)
        n = 1
        for axis in axes:
            n *= sizes[axis]
        if shape[dim] % n:
            raise ValueError(
                f"{what}: dimension {dim} of shape {tuple(shape)} is not divisible by mesh axes {axes} "
                f"(size {n}). Change the mesh or the sharding rules."
            )


def mesh_spec(axes: LogicalAxes | None, mesh) -> PartitionSpec:
    """`logical_to_spec` on `mesh`, leaving out mesh axes of size 1 (they split nothing): on a mesh without a
    context axis, "embed" -> ("fsdp", "context") reads as plain "fsdp"."""
    sizes = _mesh_axis_sizes(mesh)
    entries = []
    for entry in logical_to_spec(axes):
        kept = tuple(a for a in (() if entry is None else (entry,) if isinstance(entry, str) else entry)
                     if sizes[a] > 1)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*entries)


def named_sharding(mesh: Mesh, axes: LogicalAxes | None, shape: Sequence[int] | None = None, what: str = "array"):
    spec = mesh_spec(axes, mesh)
    if shape is not None:
        check_divisible(spec, shape, mesh, what)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def tree_shardings(mesh: Mesh, abstract_tree, logical_tree):
    """NamedShardings for a pytree of arrays given a same-structured pytree of logical-axis tuples.

    Leaves of `logical_tree` are tuples of logical names (or None for replicated).
    """
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    treedef = jax.tree_util.tree_structure(abstract_tree)
    logical_leaves = treedef.flatten_up_to(logical_tree)
    out = []
    for (path, leaf), axes in zip(paths_and_leaves, logical_leaves, strict=True):
        name = jax.tree_util.keystr(path)
        if axes is not None and len(axes) != len(leaf.shape):
            raise ValueError(f"{name}: logical axes {axes} do not match shape {leaf.shape}")
        out.append(named_sharding(mesh, axes, leaf.shape, what=name))
    return jax.tree_util.tree_unflatten(treedef, out)


# config's names for where an array lives -> JAX's memory kinds. "host" is pinned host memory, which the
# accelerator reads and writes by DMA; the device computes on a copy, the host itself under compute_on.
MEMORY_KINDS = {"device": "device", "host": "pinned_host"}


def in_memory(shardings, memory: str):
    """The same shardings, placed in `memory` ("device" or "host")."""
    return jax.tree.map(lambda s: s.with_memory_kind(MEMORY_KINDS[memory]), shardings)


def on_device(tree):
    """Outside jit: `tree` with every array that lives in host memory copied to device memory (an EMA kept with
    ema_memory="host" before a sampler or an export reads it); device arrays are returned as they are."""
    def one(a):
        if getattr(a, "sharding", None) is None or a.sharding.memory_kind in (None, "device"):
            return a
        return jax.device_put(a, a.sharding.with_memory_kind("device"))
    return jax.tree.map(one, tree)


def to_memory(tree, logical_tree, memory: str):
    """Inside a jitted function: `tree` (sharded by `logical_tree`) copied into `memory`, so that the device
    can compute on an input that lives in host memory (or write an output there). Uses the mesh of
    `jax.set_mesh`; without one, the first device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), tree)
    else:
        shardings = tree_shardings(mesh, tree, logical_tree)
    return jax.device_put(tree, in_memory(shardings, memory))


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context (single device, unit tests).

    A mesh axis that does not divide the activation's dimension (batch 4 on 8 devices) is left out of the
    constraint for that dimension, with a warning that names the dimension and the cost (`fitted_spec`).
    Parameters are checked strictly instead (`tree_shardings`).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, fitted_spec(x.shape, axes, mesh))


_warned: set = set()


def fitted_spec(shape: Sequence[int], axes: LogicalAxes, mesh) -> PartitionSpec:
    """The PartitionSpec of logical `axes`, keeping per dimension only the mesh axes that divide it.

    Dropping an axis means every device along it holds (and computes) the whole dimension. That is never
    silent: it is logged once per logical name, size and mesh (`logging` warning) with the replication
    factor, e.g. "act_length 32760 not divisible by context=16: replicated 16x".
    """
    sizes = _mesh_axis_sizes(mesh)
    entries = []
    for name, dim, entry in zip(axes, shape, logical_to_spec(axes)):
        axes_here = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        kept, dropped, n = [], [], 1
        for axis in axes_here:
            if sizes[axis] == 1:
                continue
            if dim % (n * sizes[axis]) == 0:
                kept.append(axis)
                n *= sizes[axis]
            else:
                dropped.append(axis)
        if dropped:
            _warn_replicated(name, dim, axes_here, dropped, sizes)
        entries.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return PartitionSpec(*entries)


def _warn_replicated(name, dim: int, wanted, dropped, sizes) -> None:
    key = (name, dim, tuple((a, sizes[a]) for a in wanted))
    if key in _warned:
        return
    _warned.add(key)
    factor = math.prod(sizes[a] for a in dropped)
    wanted_str = "x".join(f"{a}={sizes[a]}" for a in wanted if sizes[a] > 1)
    log.warning("%s %d not divisible by %s: replicated %dx over %s (each of those devices holds and computes "
                "the whole dimension)", name, dim, wanted_str, factor, "x".join(dropped))


def shard_count(name: str, mesh=None) -> int:
    """How many ways the current rules split logical axis `name` on `mesh` (default: the current mesh)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty:
        return 1
    sizes = _mesh_axis_sizes(mesh)
    entry = logical_to_spec((name,))[0]
    axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    return math.prod(sizes[a] for a in axes)


def current_mesh() -> Mesh | None:
    """The mesh set with `jax.set_mesh`, or None."""
    mesh = jax.sharding.get_mesh()
    return None if mesh.empty else mesh
