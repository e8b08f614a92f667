#!/usr/bin/env python
"""What distill.fake_samples costs: "fresh" (a new student sample per fake-score update) vs "reuse", on the
embedded world (configs/world_distill.py:quick by default).

    python benchmarks/fake_samples.py --bench_dir=/tmp/fake_samples --steps=40
    python benchmarks/fake_samples.py --bench_config=configs/demo.py --bench_dir=DEMO_WORKDIR --steps=40

Builds the config's world and its teacher in --bench_dir once (reused on a second call, and taken from a main
job's workdir when --bench_dir is one: its students are left alone), then distils the same
student twice, once per mode, with the same seed and data. Prints one JSON line per mode: seconds per
iteration in the steady state (median gap between consecutive steps' metrics being fetched, after the first
3 steps, so compilation is excluded), and the fake-score loss mean / std over every step of the run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's dollar_jax

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("bench_dir", "/tmp/fake_samples", "Work directory (world, teacher, runs).")
_STEPS = flags.DEFINE_integer("steps", 40, "Distillation steps per mode.")
_MODES = flags.DEFINE_list("modes", ["reuse", "fresh"], "fake_samples modes to run.")
_CONFIG = flags.DEFINE_string("bench_config", "configs/world_distill.py:quick",
                              "Config file[:variant] whose distill section is timed.")


def main(_):
    from dollar_jax.config import config_from_file
    from dollar_jax.jobs import distill as distill_job
    from dollar_jax.main import run_job
    from dollar_jax.paths import Paths
    from dollar_jax.train.loop import train
    from dollar_jax.train.metrics import read_metrics

    workdir = _WORKDIR.value
    base = config_from_file(_CONFIG.value)
    base.job = "teacher"
    run_job(base, workdir)  # videos, autoencoder, latents, teacher (skipped when present)
    for mode in _MODES.value:
        c = config_from_file(_CONFIG.value)
        c.job = "distill"
        c.distill.update(dict(steps=_STEPS.value, fake_samples=mode, name=f"bench_{mode}"))
        c.sampling.every_steps, c.checkpoint.every_steps, c.log_every_steps = 0, _STEPS.value, 1
        run_dir = Paths.of(c, workdir).run(c.distill.name)
        shutil.rmtree(run_dir, ignore_errors=True)  # time a whole run, never a resume
        job = distill_job.make_job(c, workdir)
        stamps = []
        job.after_step = lambda done, outputs, raw: stamps.append((done, time.perf_counter()))
        t0 = time.perf_counter()
        train(job, c, run_dir)
        total = time.perf_counter() - t0
        gaps = np.diff([t for s, t in stamps if s >= 3])
        loss = np.asarray([r["loss_fake"] for r in read_metrics(run_dir) if "loss_fake" in r])
        print(json.dumps({"fake_samples": mode, "steps": _STEPS.value, "batch": c.distill.batch_size,
                          "fake_updates": c.distill.fake_updates, "s_per_iter": round(float(np.median(gaps)), 4),
                          "run_s_incl_compile": round(total, 1), "loss_fake_mean": round(float(loss.mean()), 4),
                          "loss_fake_std": round(float(loss.std()), 4), "loss_fake_last10": round(float(loss[-10:].mean()), 4),
                          "load_avg_1min": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
    app.run(main)
