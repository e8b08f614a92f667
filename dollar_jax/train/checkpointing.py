"""Orbax checkpoints of a whole run: train state, input-pipeline position, config.

Layout: <workdir>/checkpoints/<step>/{state, data, config, host}. Saves are asynchronous (training continues
while arrays are written). Locally Orbax writes into a temporary folder and renames it when complete; on
object stores (gs://), which cannot rename folders, it writes in place and commits with a
commit_success.txt marker written last. Either way a process killed mid-save leaves no checkpoint that
counts. On restore the newest step is tried first; one that cannot be read (truncated or corrupt files) is
moved aside to <step>.corrupt-<time> - never deleted - with a warning, and the next older one is used (on
object stores the move is a copy of each object, then the original is deleted).

Host state (NumPy trees a job keeps beside the device state, e.g. the reward labeller's window) differs per
host: each host saves its tree as its row of arrays with a leading process axis, sharded over the processes,
so every host writes and later reads only its own row (Orbax would otherwise save host 0's NumPy for all).
Every host's tree must have the same structure and shapes.
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dollar_jax import storage
from dollar_jax.checkpoint import CheckpointError, check_compatible

log = logging.getLogger(__name__)


class RunCheckpointer:
    def __init__(self, directory: str, keep: int = 3, asynchronous: bool = True):
        self.directory = storage.resolve(directory)
        self.keep, self.asynchronous = keep, asynchronous
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, enable_async_checkpointing=self.asynchronous,
                                               create=True, cleanup_tmp_directories=True)
        return ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config", "host"))

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, data_state: dict, config: dict, host: dict | None = None) -> None:
        """Start saving; `data_state` is the input iterator's position *now* (captured before returning).

        `host`: host-side state of the job (NumPy arrays, e.g. the labeller's labelled latents), if any.
        """
        items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                     config=ocp.args.JsonSave(config))
        if host is not None:
            items["host"] = ocp.args.StandardSave(host_to_global(host))
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore_latest(self, abstract_state, with_host: bool = False):
        """(state, data_state, host_state, step) of the newest readable checkpoint, or None when there is none.

        `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings: arrays are restored straight
        into that placement. A checkpoint from another model size fails with the list of mismatches.
        """
        while True:
            steps = self.steps()
            if not steps:
                return None
            step = steps[-1]
            path = storage.join(self.directory, str(step), "state")
            try:
                check_compatible(path, abstract_state)
            except CheckpointError as e:
                if "does not fit the model" in str(e):
                    raise  # a real mismatch (another config), not corruption: stop and say so
                self._quarantine(step, e)
                continue
            try:
                items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
                if with_host:
                    items["host"] = ocp.args.StandardRestore(host_target(storage.join(self.directory, str(step), "host")))
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
                jax.block_until_ready(restored.state)
                host = own_row(restored.host) if with_host else None
                return restored.state, dict(restored.data), host, step
            except CheckpointError:
                raise  # readable, but not for this run (e.g. another number of hosts): stop, keep it
            except Exception as e:  # noqa: BLE001 - tensorstore/orbax raise many types on corrupt data
                self._quarantine(step, e)

    def _quarantine(self, step: int, error: Exception) -> None:
        src = storage.join(self.directory, str(step))
        dst = f"{src}.corrupt-{int(time.time())}"
        log.warning("Checkpoint %s cannot be restored (%s); moving it to %s and trying the previous one",
                    src, str(error).splitlines()[0][:300], dst)
        if jax.process_index() == 0:
            storage.move_tree(src, dst)
        if jax.process_count() > 1:  # on a store the move is a copy: no host reopens before it is done
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantined {src}")
        self._manager.close()
        self._manager = self._open()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


# ---- per-host state ---------------------------------------------------------------------------------------
def _process_sharding() -> NamedSharding:
    """Axis 0 over the processes (each process's devices hold its row, replicated among them)."""
    rows = [[d for d in jax.devices() if d.process_index == p] for p in range(jax.process_count())]
    return NamedSharding(Mesh(np.array(rows), ("process", "local")), PartitionSpec("process"))


def host_to_global(host: dict) -> dict:
    """This host's NumPy tree -> arrays [process_count, ...] whose row process_index() is this tree."""
    sharding = _process_sharding()
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(
        sharding, np.asarray(a)[None], (jax.process_count(), *np.shape(a))), host)


def host_target(path: str) -> dict:
    """Restore targets for a saved host item: the saved shapes, this run's process sharding."""
    saved = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    sharding = _process_sharding()
    leaves = jax.tree.leaves(saved)
    if leaves and leaves[0].shape[0] != jax.process_count():
        raise CheckpointError(f"{path} holds host state of {leaves[0].shape[0]} processes; this run has "
                              f"{jax.process_count()} (resume host-side state, e.g. the reward labeller, on "
                              "as many hosts as saved it)")
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved)


def own_row(tree: dict) -> dict:
    """This host's row of host_to_global's arrays, as (writable) NumPy. The row is cut on the host: indexing the
    device array would be a jitted op on one device, which the trainer's mesh context refuses."""
    return jax.tree.map(lambda a: np.array(np.asarray(a.addressable_shards[0].data)[0]), tree)
