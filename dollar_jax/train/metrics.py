"""Metric writers: clu's default writer (TensorBoard + log) plus a JSONL record that reports and tests read."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from clu import metric_writers

METRICS_FILE = "metrics.jsonl"


class JsonlWriter(metric_writers.MetricWriter):
    """Appends {"step": s, name: value, ...} lines; scalars only."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

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


def make_writer(workdir: str) -> metric_writers.MetricWriter:
    """Host 0 writes TensorBoard events, the log and metrics.jsonl; other hosts only log."""
    if jax.process_index() != 0:
        return metric_writers.create_default_writer(workdir, just_logging=True)
    return metric_writers.MultiWriter([
        metric_writers.create_default_writer(workdir, asynchronous=False),
        JsonlWriter(os.path.join(workdir, METRICS_FILE)),
    ])


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(workdir: str, last_step: int) -> None:
    """Drop records after `last_step` (a resumed run rewrites them; a killed run may have left some)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path) or jax.process_index() != 0:
        return
    rows = [r for r in read_metrics(workdir) if r["step"] <= last_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)
