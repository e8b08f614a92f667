"""A persistent XLA compilation cache in the workdir, so that a restarted run does not recompile.

At Wan sizes the train step takes minutes to compile; after a preemption the restarted job finds the
executables under <workdir>/compilation_cache (or config.compilation_cache) and loads them instead. JAX keys
entries by the program, the devices and the compiler version, so a stale entry is never used. Works with
gs:// paths (JAX writes through etils.epath) and is shared by every host of a slice.

Several processes on CPU: JAX writes entries from process 0 alone (its rule against many hosts writing one
key to a shared store), but XLA:CPU's key differs per process (the same program got different keys in
processes 0 and 1, 2026-11-24), so process 1 never found one and compiled again on every restart, while
process 0 loaded and then waited for it at the first collective. `enable` lets every CPU process write its own
entries; other backends keep JAX's rule.
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
    _every_cpu_process_writes()
    log.info("compilation cache: %s", path)
    return path


def _every_cpu_process_writes() -> None:
    """Wrap JAX's cache writer (once) so that a CPU process other than 0 writes its entries too. JAX's writer is
    private: if its parameters ever change, JAX's own rule stays (logged), and nothing else does."""
    import inspect

    import jax
    from jax._src import compilation_cache as jax_cache
    from jax._src import compiler, distributed

    original = compiler._cache_write
    if getattr(original, "dollar_every_cpu_process", False):
        return
    signature = inspect.signature(original)
    if list(signature.parameters) != ["cache_key", "compile_time_secs", "module_name", "backend", "executable",
                                      "host_callbacks"]:
        log.info("compilation cache: JAX's writer changed; CPU processes other than 0 do not write entries")
        return

    def cache_write(*args, **kwargs):
        a = signature.bind(*args, **kwargs).arguments
        if (distributed.global_state.process_id == 0 or a["backend"].platform != "cpu" or a["host_callbacks"]
                or a["compile_time_secs"] < jax.config.jax_persistent_cache_min_compile_time_secs):
            return original(*args, **kwargs)
        try:  # this process's own key: no other process writes this file
            jax_cache.put_executable_and_time(a["cache_key"], a["module_name"], a["executable"], a["backend"],
                                              int(a["compile_time_secs"]))
        except Exception as e:  # as JAX does: a cache that cannot be written costs a compile, not the run
            log.warning("compilation cache: could not write %s: %s: %s", a["module_name"], type(e).__name__, e)

    cache_write.dollar_every_cpu_process = True
    compiler._cache_write = cache_write
