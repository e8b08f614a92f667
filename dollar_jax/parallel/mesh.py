"""Build the one device mesh every job runs on."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

log = logging.getLogger(__name__)

# Outermost to innermost. The innermost axis gets the fastest interconnect from jax.make_mesh, which is
# where tensor parallelism (an all-reduce per layer) belongs.
MESH_AXES: tuple[str, ...] = ("data", "fsdp", "context", "tensor")


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fill the one axis given as -1 so that the product equals `num_devices`; check everything else."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"Unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"At most one mesh axis may be -1 (fill); got {free}")
    bad = [axis for axis, size in sizes.items() if size == 0 or size < -1]
    if bad:
        raise ValueError(f"Mesh axis sizes must be positive or -1; got {sizes}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"Mesh {sizes}: {num_devices} devices are not divisible by the fixed axes ({fixed})")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"Mesh {sizes} needs {math.prod(sizes.values())} devices but {num_devices} are present")
    return sizes


def mesh_devices(shape: Mapping[str, int] | None, num_devices: int) -> tuple[dict[str, int], int]:
    """(resolved shape, devices used): what `make_mesh(shape)` builds on `num_devices`, without building it.

    An explicit mesh smaller than the machine runs on its first devices (a one-device reference run on an
    8-device host, say).
    """
    shape = dict(shape or {"fsdp": -1})
    fixed = math.prod(int(v) for v in shape.values())
    if -1 not in shape.values() and 0 < fixed < num_devices:
        num_devices = fixed
    return resolve_mesh_shape(shape, num_devices), num_devices


def make_mesh(shape: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A mesh over all (or the given) devices with axes data/fsdp/context/tensor.

    `shape` maps axis name to size; one axis may be -1 to take the remaining devices. The default puts every
    device on `fsdp`, the usual choice for diffusion transformers. Axes are `Auto` so that sharding follows
    the logical-axis rules and XLA's partitioner (not explicit-sharding types) inserts the collectives.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes, used = mesh_devices(shape, len(devices))
    if used < len(devices):
        # On a real slice this usually is a mistake: say so.
        log.warning("Mesh %s uses %d of %d devices", dict(shape), used, len(devices))
        devices = devices[:used]
    axis_shapes = tuple(sizes[axis] for axis in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(axis_shapes, MESH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:
        # jax.make_mesh maps each mesh axis onto whole physical torus axes, and on most chips refuses a
        # mesh axis that needs part of one: fsdp=16 x context=4 on a v6e 8x8 torus, say. Splitting a
        # physical axis is what MaxText allows too; the split axis's ring then spans two torus axes.
        log.info("Mesh %s does not map onto whole torus axes; splitting a physical axis", dict(shape or {}))
        grid = mesh_utils.create_device_mesh(axis_shapes, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
