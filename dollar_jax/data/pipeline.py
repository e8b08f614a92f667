"""Input pipelines: grain over ArrayRecord sources, per-host slices, global arrays on the mesh.

Training iterators are grain `DatasetIterator`s: their state (`get_state`/`set_state`, a position) is saved
with every checkpoint, so a resumed run sees exactly the batches the interrupted one would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from dollar_jax.parallel.sharding import logical_to_spec


def host_batch_size(global_batch: int) -> int:
    n = jax.process_count()
    if global_batch % n:
        raise ValueError(f"Global batch {global_batch} is not divisible by the {n} processes")
    return global_batch // n


class _HostRows:
    """This host's contiguous rows of every global batch of an (infinite) shuffled dataset.

    Every host shuffles the whole dataset with the same seed and reads only its block of each global batch,
    so global batch b holds the same examples in the same rows whatever the number of hosts: a run on
    2 hosts sees exactly the batches (and per-row noise) of the same run on one.
    """

    def __init__(self, shuffled, global_batch: int, host_batch: int, process: int):
        self.shuffled, self.global_batch, self.host_batch, self.process = shuffled, global_batch, host_batch, process

    def __len__(self) -> int:
        return len(self.shuffled)

    def __getitem__(self, index: int):
        batch, row = divmod(index, self.host_batch)
        return self.shuffled[batch * self.global_batch + self.process * self.host_batch + row]


def train_dataset(source, global_batch: int, seed: int, map_fn: Callable | None = None,
                  repeat_rows: int = 1) -> grain.IterDataset:
    """Shuffled, repeated forever (reshuffled every epoch), this host's rows of each global batch, batched.

    repeat_rows = K > 1: every example fills K consecutive rows (groups of K rows share latents, text and
    caption; the batch holds global_batch / K distinct examples), for within-prompt statistics.
    """
    if repeat_rows < 1 or global_batch % repeat_rows or host_batch_size(global_batch) % repeat_rows:
        raise ValueError(f"Repeating each example {repeat_rows} times needs a per-host batch divisible by it "
                         f"(global batch {global_batch}, {jax.process_count()} processes)")
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
    host_batch = host_batch_size(global_batch) // repeat_rows
    if jax.process_count() > 1:
        ds = grain.MapDataset.source(_HostRows(ds, global_batch // repeat_rows, host_batch, jax.process_index()))
    if map_fn is not None:
        ds = ds.map(map_fn)
    ds = ds.batch(host_batch, drop_remainder=True)
    if repeat_rows > 1:
        ds = ds.map(lambda batch: {k: np.repeat(v, repeat_rows, axis=0) for k, v in batch.items()})
    return ds.to_iter_dataset()


def eval_batches(source, batch_size: int, limit: int | None = None, map_fn: Callable | None = None):
    """In order, one pass (optionally the first `limit` examples), last batch kept."""
    ds = grain.MapDataset.source(source)
    if limit is not None:
        ds = ds[: min(limit, len(ds))]
    if map_fn is not None:
        ds = ds.map(map_fn)
    return ds.batch(batch_size, drop_remainder=False)


def numeric(batch: Mapping) -> dict:
    """Keep the array fields of a batch (drops captions and other strings)."""
    return {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype.kind in "fiub"}


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("act_batch",) + (None,) * (ndim - 1)))


def to_global(batch: Mapping, mesh: Mesh) -> dict:
    """Host-local NumPy batch -> global jax.Arrays split over the mesh's batch axes."""
    out = {}
    for key, value in numeric(batch).items():
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
    return out
