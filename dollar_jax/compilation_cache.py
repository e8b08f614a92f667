"""A persistent XLA compilation cache in the workdir, so that a restarted run does not recompile.

At Wan sizes the train step takes minutes to compile; after a preemption the restarted job finds the
executables under <workdir>/compilation_cache (or config.compilation_cache) and loads them instead. JAX keys
entries by the program, the devices and the compiler version, so a stale entry is never used. Works with
gs:// paths (JAX writes through etils.epath) and is shared by every host of a slice.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# JAX caches only programs that took at least this long to compile: 0.5 s skips the many tiny jits (each
# would be a file) but keeps every train/eval step, which take seconds to minutes.
MIN_COMPILE_SECONDS = 0.5


def cache_dir(setting: str, workdir: str) -> str:
    """The cache folder for config.compilation_cache: "auto" -> <workdir>/compilation_cache, "" -> none."""
    if setting == "auto":
        return os.path.join(workdir, "compilation_cache")
    return setting


def enable(setting: str, workdir: str) -> str:
    """Point JAX's persistent compilation cache at the folder `setting` names; returns it ("" = disabled)."""
    import jax

    path = cache_dir(setting, workdir)
    if not path:
        return ""
    if "://" not in path:
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)  # cache every size
    log.info("compilation cache: %s", path)
    return path
