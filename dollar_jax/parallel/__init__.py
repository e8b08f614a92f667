"""Device mesh, the one table of logical-axis rules, and sharding helpers."""

from dollar_jax.parallel.mesh import MESH_AXES, make_mesh
from dollar_jax.parallel.rules import DEFAULT_RULES, axis_rules, current_rules
from dollar_jax.parallel.sharding import (
    constrain,
    logical_to_spec,
    named_sharding,
    replicated,
    tree_shardings,
)

__all__ = [
    "MESH_AXES",
    "make_mesh",
    "DEFAULT_RULES",
    "axis_rules",
    "current_rules",
    "constrain",
    "logical_to_spec",
    "named_sharding",
    "replicated",
    "tree_shardings",
]
