"""Which process writes compilation-cache entries: every CPU process its own, elsewhere process 0 alone (JAX's rule).

The end-to-end check (two processes, restarts that load their step in both) is tests/test_multiprocess.py; this
one drives the writer directly with stand-ins, so it compiles nothing."""

import types

import pytest
from jax._src import compilation_cache as jax_cache
from jax._src import compiler, distributed

from dollar_jax import compilation_cache


@pytest.fixture
def writes(monkeypatch):
    """The writer `enable` installs, around recorders for JAX's own writer and its store: (JAX-writer calls,
    stored keys). The wrapping alone: `enable` would also move this test process's cache folder."""
    original, stored = [], []
    monkeypatch.setattr(compiler, "_cache_write",
                        lambda cache_key, compile_time_secs, module_name, backend, executable, host_callbacks:
                        original.append(cache_key))
    monkeypatch.setattr(jax_cache, "put_executable_and_time", lambda key, *a: stored.append(key))
    compilation_cache._every_cpu_process_writes()
    wrapped = compiler._cache_write
    compilation_cache._every_cpu_process_writes()  # again (a second job in one process): not wrapped twice
    assert compiler._cache_write is wrapped
    return original, stored


@pytest.mark.parametrize("process,platform,seconds,callbacks,writer", [
    (1, "cpu", 2.0, [], "ours"),  # the case JAX skips: its key is this process's own
    (0, "cpu", 2.0, [], "jax"),
    (1, "tpu", 2.0, [], "jax"),  # one key for every host there: JAX's rule (process 0 writes) stands
    (1, "cpu", 0.1, [], "jax"),  # under the minimum compile time: JAX's writer decides (and skips it)
    (1, "cpu", 2.0, [object()], "jax"),  # host callbacks are baked into the program: never cached
])
def test_writer(writes, monkeypatch, process, platform, seconds, callbacks, writer):
    original, stored = writes
    monkeypatch.setattr(distributed.global_state, "process_id", process)
    compiler._cache_write("key", seconds, "jit_step", types.SimpleNamespace(platform=platform), None, callbacks)
    assert (original, stored) == (([], ["key"]) if writer == "ours" else (["key"], []))
