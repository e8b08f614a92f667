"""Input pipelines: grain over ArrayRecord sources, per-host slices, global arrays on the mesh.

Training iterators are grain `DatasetIterator`s: their state (`get_state`/`set_state`, a position) is saved
with every checkpoint, so a resumed run sees exactly the batches the interrupted one would have seen.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from dollar_jax.parallel.rules import axis_rules
from dollar_jax.parallel.sharding import logical_to_spec


def batch_shards(mesh_sizes: Mapping[str, int], rules=None) -> tuple[int, tuple[str, ...]]:
    """How many ways the batch is split (the mesh axes "act_batch" maps to: data x fsdp by default)."""
    with axis_rules(rules):
        entry = logical_to_spec(("act_batch",))[0]
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh_sizes[a] for a in axes), axes


def resolve_global_batch(batch_size: int, batch_per_shard: int, mesh_sizes: Mapping[str, int], rules=None,
                         what: str = "distill") -> int:
    """The global batch for this mesh: `batch_size`, or (when it is -1) `batch_per_shard` clips on every
    batch shard. A batch the shards do not divide is an error that says which values work.

    Fewer clips than devices is fine as long as the batch shards divide it: the other devices go on the
    context axis and split each clip's tokens (8 devices, batch 2: fsdp=2 x context=4).
    """
    shards, axes = batch_shards(mesh_sizes, rules)
    if batch_size == -1:
        if batch_per_shard < 1:
            raise ValueError(f"config.{what}.batch_per_shard must be >= 1 when batch_size=-1, got {batch_per_shard}")
        return batch_per_shard * shards
    if batch_size < 1:
        raise ValueError(f"config.{what}.batch_size must be positive or -1 (batch_per_shard clips per batch "
                         f"shard), got {batch_size}")
    if batch_size % shards:
        mesh = ",".join(f"{k}={v}" for k, v in mesh_sizes.items())
        split = "x".join(f"{a}={mesh_sizes[a]}" for a in axes)
        devices = math.prod(mesh_sizes.values()) // mesh_sizes.get("tensor", 1)
        fsdp = max(d for d in range(1, batch_size + 1) if batch_size % d == 0 and devices % d == 0)
        raise ValueError(
            f"config.{what}.batch_size={batch_size} does not split over the {shards} batch shards ({split}) of "
            f"mesh {mesh}: use a multiple of {shards}, or batch_size=-1 ({what}.batch_per_shard clips per shard), "
            f"or keep batch {batch_size} and split each clip's tokens over the context axis: "
            f"--config.mesh.data=1 --config.mesh.fsdp={fsdp} --config.mesh.context={devices // fsdp}")
    return batch_size


def with_global_batch(config, section: str, mesh_sizes: Mapping[str, int]):
    """A copy of `config` whose config[section].batch_size is the resolved global batch for the mesh."""
    out = copy.deepcopy(config)
    rules = list(config.sharding_rules) if config.sharding_rules else None
    out[section].batch_size = resolve_global_batch(int(config[section].batch_size),
                                                   int(config[section].get("batch_per_shard", 1)),
                                                   mesh_sizes, rules, section)
    return out


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
