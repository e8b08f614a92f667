"""Metric writers: clu's default writer (TensorBoard + log) plus a JSONL record that reports and tests read.

clu is imported only when TensorBoard is written: every clu writer imports TensorFlow, about 7 s of start-up
on 2 cores, which a process that only needs metrics.jsonl (config.tensorboard = False) does not pay.

Workdirs may be on object stores (gs://), where files cannot be appended to: there metrics.jsonl is
rewritten whole at each write (one object upload; it holds one row per logged step), and TensorBoard event
files are written to a local folder and uploaded after each write.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from dollar_jax import storage

METRICS_FILE = "metrics.jsonl"


class NullWriter:
    """clu's MetricWriter interface, writing nothing (by duck typing: subclassing clu's would import TensorFlow).
    As is: a host other than 0 when TensorBoard is off; the base of the JSONL writer."""

    def write_scalars(self, step, scalars):
        pass

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class JsonlWriter(NullWriter):
    """Appends {"step": s, name: value, ...} lines; scalars only."""

    def __init__(self, path: str):
        self.path = path
        self.remote = storage.is_remote(path)
        storage.makedirs(os.path.dirname(path) or ".")
        # On a store the whole file is rewritten each time: keep what it holds (a resumed run's rows).
        self._lines = _read_lines(path) if self.remote else None

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
        if self.remote:
            self._lines.append(json.dumps(row) + "\n")
            storage.write_text(self.path, "".join(self._lines))
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class UploadingWriter:
    """A writer of local files (TensorBoard events) whose folder is copied to an object store after each write."""

    def __init__(self, remote_dir: str, make_inner):
        self.remote_dir = remote_dir
        self._local = tempfile.TemporaryDirectory(prefix="dollar_tb_")
        self.inner = make_inner(self._local.name)

    def _upload(self):
        self.inner.flush()
        storage.copy_tree(self._local.name, self.remote_dir)

    def write_scalars(self, step, scalars):
        self.inner.write_scalars(step, scalars)
        self._upload()

    def write_summaries(self, step, values, metadata=None):
        self.inner.write_summaries(step, values, metadata)

    def write_images(self, step, images):
        self.inner.write_images(step, images)

    def write_videos(self, step, videos):
        self.inner.write_videos(step, videos)

    def write_audios(self, step, audios, *, sample_rate):
        self.inner.write_audios(step, audios, sample_rate=sample_rate)

    def write_texts(self, step, texts):
        self.inner.write_texts(step, texts)

    def write_histograms(self, step, arrays, num_buckets=None):
        self.inner.write_histograms(step, arrays, num_buckets)

    def write_hparams(self, hparams):
        self.inner.write_hparams(hparams)

    def flush(self):
        self._upload()

    def close(self):
        self._upload()
        self.inner.close()
        self._local.cleanup()


def make_writer(workdir: str, tensorboard: bool = True):
    """Host 0 writes metrics.jsonl and, with `tensorboard`, TensorBoard events and the log; other hosts log only
    with `tensorboard` (the loop's own progress lines are printed by host 0 either way)."""
    if not tensorboard:
        return JsonlWriter(storage.join(workdir, METRICS_FILE)) if jax.process_index() == 0 else NullWriter()
    from clu import metric_writers

    if jax.process_index() != 0:
        return metric_writers.create_default_writer(workdir, just_logging=True)
    if storage.is_remote(workdir):  # TensorBoard's own gs:// client is not epath's: write locally, upload
        tensorboard = UploadingWriter(workdir, lambda d: metric_writers.create_default_writer(d, asynchronous=False))
    else:
        tensorboard = metric_writers.create_default_writer(workdir, asynchronous=False)
    return metric_writers.MultiWriter([tensorboard, JsonlWriter(storage.join(workdir, METRICS_FILE))])


def _read_lines(path: str) -> list[str]:
    if not storage.exists(path):
        return []
    return [line + "\n" for line in storage.read_text(path).splitlines() if line.strip()]


def read_metrics(workdir: str) -> list[dict]:
    return [json.loads(line) for line in _read_lines(storage.join(workdir, METRICS_FILE))]


def truncate_metrics(workdir: str, last_step: int) -> None:
    """Drop records after `last_step` (a resumed run rewrites them; a killed run may have left some)."""
    path = storage.join(workdir, METRICS_FILE)
    if not storage.exists(path) or jax.process_index() != 0:
        return
    rows = [r for r in read_metrics(workdir) if r["step"] <= last_step]
    storage.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
