"""Datasets of fixed-shape arrays (+ text), written with tensorflow-datasets as ArrayRecord, read with grain.

Every dataset in the project has this form: the shapes world's videos, the world's (latents, text
embeddings), and the precomputed Wan latents of real runs. A dataset lives at <data_dir>/<name>/1.0.0 and
is described by its `features.json`, so readers need no builder class: `open_split` reads any of them and
`check_features` turns a dataset of the wrong shape into an error that names the field.

`data_dir` may be on an object store (gs://bucket/...). ArrayRecord reads and writes local files only
(its reader and writer open paths with the OS, not through epath), and tfds finishes a build by renaming
a folder, which object stores cannot do. So on a store a dataset is built in a local temporary folder and
uploaded file by file with dataset_info.json last (the file `exists` looks for), and `open_split` reads a
local copy staged once under $DOLLAR_JAX_CACHE (default ~/.cache/dollar_jax; it needs room for the whole
dataset, and is refreshed when the stored files change). A dataset too large for local disk can instead be
read through a read-only gcsfuse mount (a local path): reads are fine there, only renames are not.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from dollar_jax import storage

VERSION = "1.0.0"
INFO_FILE = "dataset_info.json"  # written last: a dataset folder with it is complete

# A feature is ("tensor", shape, dtype) | ("text",) | ("int",)
Feature = tuple


class DatasetError(ValueError):
    """A dataset is missing, incomplete, or not of the shape a job expects."""


def _tfds():
    import tensorflow_datasets as tfds

    tfds.display_progress_bar(False)
    return tfds


def _features(spec: Mapping[str, Feature]):
    tfds = _tfds()
    out = {}
    for name, f in spec.items():
        if f[0] == "tensor":
            out[name] = tfds.features.Tensor(shape=tuple(f[1]), dtype=np.dtype(f[2]))
        elif f[0] == "text":
            out[name] = tfds.features.Text()
        elif f[0] == "int":
            out[name] = tfds.features.Scalar(dtype=np.int64)
        else:
            raise ValueError(f"Unknown feature kind {f!r} for {name!r}")
    return tfds.features.FeaturesDict(out)


def dataset_path(data_dir: str, name: str) -> str:
    return os.path.join(data_dir, name, VERSION)


def exists(data_dir: str, name: str) -> bool:
    return storage.exists(os.path.join(dataset_path(data_dir, name), INFO_FILE))


def write(data_dir: str, name: str, spec: Mapping[str, Feature],
          splits: Mapping[str, Callable[[], Iterable[dict[str, Any]]]], description: str = "") -> str:
    """Build the dataset `name` under `data_dir` (atomically: tfds writes to an incomplete.* folder first).

    `splits` maps a split name to a function returning an iterable of examples (dicts matching `spec`).
    On an object store the dataset is built locally, then uploaded with dataset_info.json last.
    """
    if storage.is_remote(data_dir):
        local_dir = tempfile.mkdtemp(prefix=f"dollar_dataset_{name}_")
        try:
            local = write(local_dir, name, spec, splits, description)
            storage.copy_tree(local, dataset_path(data_dir, name), last=INFO_FILE)
        finally:
            shutil.rmtree(local_dir, ignore_errors=True)
        return dataset_path(data_dir, name)
    tfds = _tfds()

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, description=description, features=_features(spec))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in splits}

    def _generate_examples(self, split):
        for i, example in enumerate(splits[split]()):
            yield i, example

    builder_cls = type(
        f"ArrayDataset_{name}",
        (tfds.core.GeneratorBasedBuilder,),
        {"name": name, "VERSION": tfds.core.Version(VERSION), "_info": _info,
         "_split_generators": _split_generators, "_generate_examples": _generate_examples},
        skip_registration=True,
    )
    builder = builder_cls(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.path.join(data_dir, "manual")))
    return dataset_path(data_dir, name)


def _builder(data_dir: str, name: str, local: bool = False):
    """The dataset's tfds builder; `local=True` for reading records (a staged copy of a remote dataset)."""
    path = dataset_path(data_dir, name)
    if not exists(data_dir, name):
        raise DatasetError(f"No dataset {name!r} at {path} (build it first, or set config.data.dir)")
    return _tfds().builder_from_directory(storage.stage_local(path, INFO_FILE) if local else path)


def feature_shapes(data_dir: str, name: str) -> dict[str, Feature]:
    """The stored spec of a dataset (from its features.json), in the `Feature` form used by `write`."""
    out = {}
    for key, feature in _builder(data_dir, name).info.features.items():
        kind = type(feature).__name__
        if kind == "Text":
            out[key] = ("text",)
        elif kind == "Scalar":
            out[key] = ("int",)
        else:
            out[key] = ("tensor", tuple(feature.shape), np.dtype(feature.np_dtype).name)
    return out


def description(data_dir: str, name: str) -> str:
    """The free-text description a dataset was written with (jobs record what built it there)."""
    return _builder(data_dir, name).info.description


def check_features(data_dir: str, name: str, expect: Mapping[str, Feature]) -> None:
    """Raise DatasetError naming every field that is missing or of another shape/dtype than `expect`."""
    stored = feature_shapes(data_dir, name)
    problems = []
    for key, want in expect.items():
        want = (want[0], tuple(want[1]), np.dtype(want[2]).name) if want[0] == "tensor" else want
        if key not in stored:
            problems.append(f"field {key!r} is missing (has {sorted(stored)})")
        elif stored[key] != want:
            problems.append(f"field {key!r} is {stored[key]}, expected {want}")
    if problems:
        raise DatasetError(f"Dataset {dataset_path(data_dir, name)} does not fit this job: " + "; ".join(problems))


def open_split(data_dir: str, name: str, split: str):
    """A random-access source (len, __getitem__ -> dict of NumPy values) for grain."""
    builder = _builder(data_dir, name, local=True)
    if split not in builder.info.splits:
        raise DatasetError(f"Dataset {name!r} has no split {split!r} (has {sorted(builder.info.splits)})")
    return builder.as_data_source(split=split)
