"""The main job: DOLLAR end to end on the embedded world, then the report.

Stages (each skipped when its output is already in the work directory, each resumable):
  videos -> autoencoder -> latents -> evaluation encoder -> teacher -> students (VSD, VSD+CD, VSD+CD+LRM)
  -> evaluation (quality + speed, results.json) -> report (REPORT.md, plots, sample grids)
"""

from __future__ import annotations

import logging
import os
import time

import jax

from dollar_jax import storage
from dollar_jax.checkpoint import model_folder_exists
from dollar_jax.eval.report import write_report
from dollar_jax.jobs import autoencoder, distill, precompute, teacher, world_data, world_encoder
from dollar_jax.paths import Paths

log = logging.getLogger(__name__)

# name -> (distill.name, vsd weight, cd weight, reward on)
STUDENTS = {
    "VSD": ("student_vsd", 1.0, 0.0, False),
    "VSD+CD": ("student_vsd_cd", 1.0, 0.5, False),
    "VSD+CD+LRM": ("student_dollar", 1.0, 0.5, True),
}
RESULTS = "results.json"


def student_config(config, name: str):
    run_name, vsd, cd, reward = STUDENTS[name]
    c = config.copy_and_resolve_references()
    c.distill.update(dict(name=run_name, vsd_weight=vsd, cd_weight=cd))
    c.reward.enabled = reward
    return c


class Stages:
    """Runs named stages in order with a progress line, timing each and noting which were reused."""

    def __init__(self, workdir: str, names: list[str]):
        self.workdir, self.names = workdir, names
        self.path = os.path.join(workdir, "demo_timings.json")
        self.timings = storage.read_json(self.path) if storage.exists(self.path) else {}
        self.t0 = time.perf_counter()

    def run(self, name: str, fn, done: bool):
        i = self.names.index(name) + 1
        elapsed = time.perf_counter() - self.t0
        print(f"[demo] stage {i}/{len(self.names)}: {name}{' (already done)' if done else ''}  "
              f"elapsed {elapsed / 60:.1f} min", flush=True)
        t = time.perf_counter()
        out = fn()
        if not done or name not in self.timings:
            self.timings[name] = {"seconds": time.perf_counter() - t, "reused": done}
            storage.write_json(self.path, self.timings, indent=2)
        return out


def evaluate(config, workdir: str, folders: dict[str, str]) -> dict:
    from dollar_jax.eval.world_benchmark import WorldBenchmark, entries_for

    d = config.demo
    bench = WorldBenchmark(config, workdir, prompts=d.prompts, samples_per_prompt=d.samples_per_prompt,
                           seed=d.seed, reward=config.reward.name)
    out_dir = os.path.join(Paths.of(config, workdir).workdir, "report")
    entries = entries_for(folders["teacher"], "teacher", [config.sampling.steps], config.sampling.guidance_scale,
                          config.sampling.convention)
    for name in STUDENTS:
        entries += entries_for(folders[name], name, list(config.distill.eval_steps)[::-1],
                               config.sampling.guidance_scale, config.sampling.convention)
    quality = [bench.data_row()]
    speed = []
    for e in entries:
        quality.append(bench.evaluate(e, out_dir))
        print(f"[demo] evaluated {e.name}: adherence {quality[-1]['adherence']['mean']:.3f}", flush=True)
    timed = [entries[0]] + [e for e in entries if e.model == "VSD+CD+LRM"]
    for batch in d.speed_batches:  # one video (the paper's setting), and a batch where compute dominates dispatch
        for e in timed:
            speed.append(bench.speed(e, repeats=d.speed_repeats, batch=batch) | {"steps": len(e.spec.timesteps)})
    return {"quality": quality, "speed": speed, "prompts": d.prompts, "samples_per_prompt": d.samples_per_prompt,
            "reward_name": config.reward.name, "speed_repeats": d.speed_repeats,
            "device": f"{jax.devices()[0].device_kind} ({os.cpu_count()} host cores)"}


def run(config, workdir: str) -> str:
    paths = Paths.of(config, workdir)
    names = ["videos", "autoencoder", "latents", "evaluation encoder", "teacher", *STUDENTS, "evaluation", "report"]
    stages = Stages(paths.workdir, names)
    exists = model_folder_exists
    from dollar_jax.data import arrays_dataset

    stages.run("videos", lambda: world_data.build_videos(config, workdir),
               arrays_dataset.exists(paths.data, config.data.videos))
    stages.run("autoencoder", lambda: autoencoder.run(config, workdir), exists(paths.autoencoder))
    stages.run("latents", lambda: precompute.run(config, workdir), arrays_dataset.exists(paths.data, config.data.latents))
    stages.run("evaluation encoder", lambda: world_encoder.run(config, workdir),
               exists(paths.world_encoder(config)))
    folders = {"teacher": stages.run("teacher", lambda: teacher.run(config, workdir), exists(paths.teacher))}
    runs = {"teacher": paths.run("teacher")}
    for name in STUDENTS:
        c = student_config(config, name)
        folders[name] = stages.run(name, lambda c=c: distill.run(c, workdir),
                                   exists(os.path.join(paths.workdir, c.distill.name)))
        runs[name] = paths.run(c.distill.name)
    results_path = os.path.join(paths.workdir, "report", RESULTS)
    results = stages.run("evaluation", lambda: _cached(results_path, lambda: evaluate(config, workdir, folders)),
                         storage.exists(results_path))
    report = stages.run("report", lambda: write_report(paths.workdir, results, runs, stages.timings), False)
    print(f"[demo] report: {report}", flush=True)
    return report


def _cached(path: str, compute):
    if storage.exists(path):
        blob = storage.read_json(path)
        blob.pop("timings", None)
        return blob
    return compute()
