"""The main job: DOLLAR end to end on the embedded world, then the report.

Stages (each skipped when its output is already in the work directory, each resumable):
  videos -> autoencoder -> latents -> evaluation encoder -> teacher -> students (VSD, VSD+CD, VSD+CD+LRM)
  x config.demo.distill_seeds -> evaluation (quality + speed, results.json) -> [reward baselines: the LRM against
  the pixel path and a policy gradient, config.demo.reward_baselines] -> [reward memory: one reward fine-tuning
  step through the LRM against the pixel path, compiled at 8..128 frames, config.demo.reward_memory] -> [flow
  teacher: this whole demo again in <workdir>/flow with a teacher in Wan2.1's parameterisation on the same data,
  config.demo.flow_section] -> report (REPORT.md, plots, grids)

The seed equal to config.seed trains the runs `student_vsd`, ... as a one-seed demo always did; every other seed
trains `<name>_seed<seed>` (stage "<model> seed <seed>") and is evaluated at the claims' step count only.

With config.demo.side_by_side > 1 the evaluation encoder trains beside the teacher and the students beside each
other, each in a process of its own (jobs/side_by_side.py): the same numbers, sooner on a few CPU cores. Each
student then samples its own rows of the ablation in its process, and the teacher's rows are one more stage
beside them; the evaluation stage computes any row still missing (a student trained in an earlier run) and
times the speed table with nothing else running.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import ml_collections

from dollar_jax import storage
from dollar_jax.checkpoint import model_folder_exists
from dollar_jax.eval import reward_baselines, reward_memory
from dollar_jax.eval.report import write_report
from dollar_jax.jobs import autoencoder, distill, precompute, side_by_side, teacher, world_data, world_encoder
from dollar_jax.paths import Paths

log = logging.getLogger(__name__)

# name -> (distill.name, vsd weight, cd weight, reward on)
STUDENTS = {
    "VSD": ("student_vsd", 1.0, 0.0, False),
    "VSD+CD": ("student_vsd_cd", 1.0, 0.5, False),
    "VSD+CD+LRM": ("student_dollar", 1.0, 0.5, True),
}
RESULTS = "results.json"


def student_config(config, name: str, seed: int | None = None):
    """The distillation config of one ablation row, trained with `seed` (default config.seed)."""
    run_name, vsd, cd, reward = STUDENTS[name]
    c = config.copy_and_resolve_references()
    if seed is not None and seed != config.seed:  # another training seed: its own run, init, noise and data order
        run_name = f"{run_name}_seed{seed}"
        c.seed = seed
        c.data.shuffle_seed = (config.data.shuffle_seed + seed - config.seed) % 2**31
    c.distill.update(dict(name=run_name, vsd_weight=vsd, cd_weight=cd))
    c.reward.enabled = reward
    return c


def student_runs(config) -> list[tuple[str, int, str]]:
    """(ablation row, seed, stage name) of every student training; the first seed's stages keep the plain names."""
    seeds = list(config.demo.distill_seeds)
    seeds.sort(key=lambda s: s != config.seed)  # config.seed's runs first: the primary seed
    return [(name, seed, name if seed == seeds[0] else f"{name} seed {seed}") for seed in seeds for name in STUDENTS]


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

    def note(self, name: str, text: str):
        """A remark on what a stage's time covers, printed beside it in the report's stage-times table."""
        self.timings[name]["note"] = text
        storage.write_json(self.path, self.timings, indent=2)

    def run_side_by_side(self, stages: list[tuple[str, side_by_side.Stage | None]], max_running: int,
                         compilation_cache: tuple[str, str]) -> dict:
        """(name, stage or None when already done) -> {name: the stage's result (None when done)}. With
        max_running 1 each runs here, one after another; else in processes side by side (side_by_side.py)."""
        if max_running <= 1 or sum(s is not None for _, s in stages) <= 1 or jax.process_count() > 1:
            return {name: self.run(name, lambda s=s: s.fn(*s.args) if s else None, s is None) for name, s in stages}
        todo = [s for _, s in stages if s is not None]
        for name, s in stages:
            i = self.names.index(name) + 1
            print(f"[demo] stage {i}/{len(self.names)}: {name}{' (already done)' if s is None else ' (side by side)'}"
                  f"  elapsed {(time.perf_counter() - self.t0) / 60:.1f} min", flush=True)
        t = time.perf_counter()
        done = side_by_side.run(todo, max_running, compilation_cache)
        together = [s.name for s in todo]
        for name, (_, seconds) in done.items():
            self.timings[name] = {"seconds": seconds, "reused": False, "beside": [n for n in together if n != name]}
        self.timings[" + ".join(together)] = {"seconds": time.perf_counter() - t, "reused": False,
                                               "side_by_side": together}
        storage.write_json(self.path, self.timings, indent=2)
        return {name: done[name][0] if s is not None else None for name, s in stages}


def _benchmark(config, workdir: str):
    """The demo's WorldBenchmark and the folder its rows' sample grids go to."""
    from dollar_jax.eval.world_benchmark import WorldBenchmark

    d = config.demo
    bench = WorldBenchmark(config, workdir, prompts=d.prompts, samples_per_prompt=d.samples_per_prompt,
                           seed=d.seed, reward=config.reward.name)
    return bench, os.path.join(Paths.of(config, workdir).workdir, "report")


def _evaluate_row(bench, out_dir: str, entry, extra: dict) -> dict:
    row = bench.evaluate(entry, out_dir) | extra
    print(f"[demo] evaluated {entry.name}: adherence {row['adherence']['mean']:.3f}", flush=True)
    return row


def _entries(config, folders: dict[str, str], stage: str | None = None) -> list[tuple]:
    """(entry, extra fields of its row, the stage whose model it samples) of every row of the ablation, in order;
    with `stage`, only that stage's rows (the other models' folders may not exist yet)."""
    from dollar_jax.eval.report import CLAIM_STEPS
    from dollar_jax.eval.world_benchmark import entries_for

    s, dc = config.sampling, config.distill
    entries = []
    if stage in (None, "teacher"):
        entries += [(e, {}, "teacher")
                    for e in entries_for(folders["teacher"], "teacher", [s.steps], s.guidance_scale, s.convention)]
        if (dc.real_guidance, dc.real_convention) != (s.guidance_scale, s.convention):
            # The teacher as the students' VSD real score sees it: the guidance they are distilled toward.
            e = entries_for(folders["teacher"], "teacher", [s.steps], dc.real_guidance, dc.real_convention)[0]
            entries.append((dataclasses.replace(e, name=f"{e.name[:-1]}, {dc.real_convention}: distillation target)"),
                            {"distillation_target": True}, "teacher"))
    runs = student_runs(config)
    primary = runs[0][1]
    for name, seed, owner in runs:
        if stage not in (None, owner):
            continue
        steps = list(dc.eval_steps)[::-1] if seed == primary else [CLAIM_STEPS]
        for e in entries_for(folders[owner], name, steps, s.guidance_scale, s.convention):
            entries.append((e if seed == primary else dataclasses.replace(e, name=f"{e.name} seed {seed}"),
                            {"seed": seed}, owner))
    return entries


def evaluate_rows(config, workdir: str, folders: dict[str, str], stage: str) -> dict[str, dict]:
    """The ablation rows of one stage's model (the teacher's, or one student's): {entry name: row}. Run beside
    the students' training (evaluate() computes the rows it is not given, with the same programs and noise)."""
    bench, out_dir = _benchmark(config, workdir)
    return {e.name: _evaluate_row(bench, out_dir, e, extra) for e, extra, _ in _entries(config, folders, stage)}


def train_and_evaluate(c, workdir: str, config, folders: dict[str, str], stage: str) -> dict[str, dict]:
    """One student's stage: distil it (config `c`), then evaluate its rows in the same process."""
    distill.run(c, workdir)
    return evaluate_rows(config, workdir, folders, stage)


def evaluate(config, workdir: str, folders: dict[str, str], rows: dict[str, dict] | None = None) -> dict:
    """`folders`: "teacher" and every student stage name of `student_runs` -> its model folder. `rows`: ablation
    rows already evaluated (by evaluate_rows, beside the students), by entry name; the others are evaluated here,
    and the speed table is always timed here, with nothing else running."""
    from dollar_jax.data import world

    d, rows = config.demo, dict(rows or {})
    bench, out_dir = _benchmark(config, workdir)
    entries = _entries(config, folders)
    quality = [bench.data_row()]
    speed = []
    for e, extra, _ in entries:
        if e.name not in rows:
            rows[e.name] = _evaluate_row(bench, out_dir, e, extra)
        quality.append(rows[e.name])
    runs = student_runs(config)
    primary = runs[0][1]
    timed = [entries[0][0]] + [e for e, extra, _ in entries
                               if e.model == "VSD+CD+LRM" and extra.get("seed") == primary]
    for batch in d.speed_batches:  # one video (the paper's setting), and a batch where compute dominates dispatch
        for e in timed:
            repeats = speed_repeats(d.speed_repeats, batch)
            speed.append(bench.speed(e, repeats=repeats, batch=batch) | {"steps": len(e.spec.timesteps),
                                                                         "repeats": repeats})
    return {"quality": quality, "speed": speed, "prompts": d.prompts, "samples_per_prompt": d.samples_per_prompt,
            "held_out_prompts": [world.caption(p, bench.wcfg) for p in world.held_out_prompts(bench.wcfg)],
            "distill_seeds": list(dict.fromkeys(seed for _, seed, _ in runs)),
            # Recorded with the numbers: the report judges them at the margin fixed before they were measured.
            "non_inferiority_margin": config.report.non_inferiority_margin,
            "reward_name": config.reward.name, "speed_repeats": d.speed_repeats, "variant": d.variant,
            "teacher_parameterisation": teacher_kind(config),
            "device": f"{jax.devices()[0].device_kind} ({os.cpu_count()} host cores)"}


def speed_repeats(repeats_at_one: int, batch: int) -> int:
    """Timed runs for a batch of `batch` videos: about the same number of videos as `repeats_at_one` single-video
    runs, and at least 3. A batch's run is compute-bound and steady (its spread is small), while the 50-step teacher
    at batch 16 costs 1.8 s a run on 2 cores (run E, BENCHMARKS.md): 21 runs of it, diffusion and end to end, were
    over a minute of the main job."""
    return max(3, min(repeats_at_one, round(repeats_at_one / batch)))


def teacher_kind(config) -> str:
    """The teacher's parameterisation in words, for the report: what a VP and a flow (Wan) teacher differ in.
    (checkpoint.teacher_parameterisation reads the same from a model folder as objects.)"""
    d, t = config.diffusion, config.teacher
    kind = (f"rectified flow, {d.prediction_type} prediction, timesteps shifted by {d.flow_shift:g} (Wan2.1's)"
            if d.schedule == "flow" else f"VP ({d.beta_schedule} betas), {d.prediction_type} prediction")
    if t.timesteps == "logit_normal":
        kind += f", trained on logit-normal timesteps (mean {t.logit_mean:g}, std {t.logit_std:g})"
    return kind


def flow_config(config, workdir: str):
    """The demo of the flow-teacher section: `config` with config.demo.flow_section's overrides (the teacher's
    parameterisation and training), trained with one seed on this run's data, autoencoder and evaluation encoder,
    in <workdir>/flow, and without the extended variant's extras (baselines, memory curve, a section of its own)."""
    paths = Paths.of(config, workdir)
    c = config.copy_and_resolve_references()
    c.update(config.demo.flow_section)
    c.data.dir, c.autoencoder.dir, c.world_encoder.dir = paths.data, paths.autoencoder, paths.world_encoder(config)
    c.teacher.dir = c.distill.teacher = ""  # its own teacher, in <workdir>/flow/teacher
    variant = [v for v in config.demo.variant.split(",") if v not in ("default", "paper")] + ["flow"]
    c.demo.update(dict(distill_seeds=(config.seed,), reward_baselines="", variant=",".join(variant)))
    c.demo.flow_section = ml_collections.ConfigDict()
    c.demo.reward_memory.enabled = False
    return c


def _stored_memory_rows(config, out: str) -> list[dict] | None:
    """The memory curve's rows stored in <out>.json when they were measured with config.demo.reward_memory's
    frames, size and networks, else None (rows over the timeout stay "not measured": delete <out>.json to measure
    them again)."""
    if not storage.exists(out + ".json"):
        return None
    m, stored = config.demo.reward_memory, storage.read_json(out + ".json")
    rows = stored["rows"]
    if (sorted(m.frames), m.height, m.width, m.tiny) == (sorted({r["frames"] for r in rows}), stored["height"],
                                                         stored["width"], bool(rows[0].get("tiny", False))):
        return rows
    print(f"[demo] {out}.json was measured with other settings than config.demo.reward_memory: measuring again",
          flush=True)
    return None


def _measure_memory_rows(config, out: str) -> list[dict]:
    """The memory curve's rows (eval/reward_memory.py: the student alone, the LRM path, the pixel path at each
    frame count), written to <out>.md, .png and .json."""
    m = config.demo.reward_memory
    rows = reward_memory.measure_rows((reward_memory.BASELINE, *reward_memory.PATHS), list(m.frames), height=m.height,
                                      width=m.width, tiny=m.tiny, timeout=m.timeout, run_max_gib=m.run_max_gib)
    reward_memory.write(rows, out, m.height, m.width)
    return rows


def _run_flow_section(config, workdir: str, flow_dir: str) -> None:
    """The flow-teacher section's demo (flow_config) in `flow_dir`: its REPORT.md and results.json in
    <flow_dir>/report."""
    run(flow_config(config, workdir), flow_dir)


def run(config, workdir: str) -> str:
    paths = Paths.of(config, workdir)
    students = student_runs(config)
    names = ["videos", "autoencoder", "latents", "evaluation encoder", "teacher", *(r[2] for r in students),
             "teacher evaluation", "evaluation", "report"]
    baselines = reward_baselines.parse_specs(config.demo.reward_baselines)  # a bad entry fails before any work
    extras = [name for name, on in (("reward baselines", baselines),
                                    ("reward memory", config.demo.reward_memory.enabled),
                                    ("flow teacher", len(config.demo.flow_section))) if on]
    names[names.index("report"):names.index("report")] = extras
    stages = Stages(paths.workdir, names)
    exists = model_folder_exists
    from dollar_jax.data import arrays_dataset

    stages.run("videos", lambda: world_data.build_videos(config, workdir),
               arrays_dataset.exists(paths.data, config.data.videos))
    stages.run("autoencoder", lambda: autoencoder.run(config, workdir), exists(paths.autoencoder))
    stages.run("latents", lambda: precompute.run(config, workdir), arrays_dataset.exists(paths.data, config.data.latents))
    # The evaluation encoder trains beside the teacher, the students beside each other (config.demo.side_by_side),
    # their processes with this one's compilation cache (main.py's config.compilation_cache, a test's own).
    cache, width = (jax.config.jax_compilation_cache_dir or "", workdir), config.demo.side_by_side

    def stage(name, fn, c, done):
        return name, None if done else side_by_side.Stage(name, fn, (c, workdir))

    # The teacher samples while it trains, so that the report shows when it learned each factor.
    teacher_config = config.copy_and_resolve_references()
    teacher_config.sampling.every_steps = config.demo.teacher_eval_every
    stages.run_side_by_side([
        stage("evaluation encoder", world_encoder.run, config, exists(paths.world_encoder(config))),
        stage("teacher", teacher.run, teacher_config, exists(paths.teacher))], width, cache)
    folders, runs = {"teacher": paths.teacher}, {"teacher": paths.run("teacher")}
    configs = {}
    for name, seed, stage_name in students:
        configs[stage_name] = c = student_config(config, name, seed)
        folders[stage_name] = os.path.join(paths.workdir, c.distill.name)
        runs[stage_name] = paths.run(c.distill.name)
    results_path = os.path.join(paths.workdir, "report", RESULTS)
    cached = _cached(results_path, list(dict.fromkeys(seed for _, seed, _ in students)), config.seed)
    # Each student is evaluated in its own process right after its training, and the teacher's rows beside them:
    # the evaluation stage is then left with the speed table (and any row not evaluated yet).
    todo = []
    for stage_name, c in configs.items():
        done = exists(folders[stage_name])
        todo.append((stage_name, None if done else side_by_side.Stage(
            stage_name, *((distill.run, (c, workdir)) if cached else
                          (train_and_evaluate, (c, workdir, config, folders, stage_name))))))
    todo.append(("teacher evaluation", None if cached else side_by_side.Stage(
        "teacher evaluation", evaluate_rows, (config, workdir, folders, "teacher"))))
    rows = {}
    for out in stages.run_side_by_side(todo, width, cache).values():
        rows.update(out if isinstance(out, dict) else {})
    for name, st in todo:
        if st is not None and st.fn is train_and_evaluate:
            stages.note(name, "training, then sampling its rows of the ablation")
    results = stages.run("evaluation", lambda: cached or evaluate(config, workdir, folders, rows), cached is not None)
    if cached is None:  # kept now, so that a run stopped in a later stage resumes without evaluating again
        storage.write_json(results_path, results | {"timings": stages.timings}, indent=2)
    margin = results.setdefault("non_inferiority_margin", config.report.non_inferiority_margin)
    if margin != config.report.non_inferiority_margin:
        print(f"[demo] WARNING: results.json recorded non_inferiority_margin={margin} with its numbers; "
              f"config.report.non_inferiority_margin is now {config.report.non_inferiority_margin}. The report "
              f"keeps the recorded margin (a margin is fixed before the run; delete results.json to re-evaluate)",
              flush=True)
    if baselines:
        # The VSD+CD student (the primary seed's) fine-tuned on each reward by the LRM and its alternatives.
        path = os.path.join(paths.workdir, "report", reward_baselines.RESULTS)
        done = storage.exists(path)
        results["reward_baselines"] = stages.run(
            "reward baselines", lambda: storage.read_json(path) if done else reward_baselines.run_for_demo(
                config, workdir, student_config(config, "VSD+CD").distill.name, path), done)
    if config.demo.reward_memory.enabled:
        out = storage.join(paths.workdir, "report", "reward_memory")
        stored = _stored_memory_rows(config, out)  # one check: the stage is done when these rows serve
        results["reward_memory"] = stages.run(
            "reward memory", lambda: stored if stored is not None else _measure_memory_rows(config, out),
            stored is not None)
    if len(config.demo.flow_section):
        flow_dir = storage.join(paths.workdir, "flow")
        flow_results = storage.join(flow_dir, "report", RESULTS)
        done = storage.exists(flow_results)

        def flow_section():  # the section reads the sub-demo's results.json
            if not done:
                _run_flow_section(config, workdir, flow_dir)
            return storage.read_json(flow_results)

        results["flow_section"] = stages.run("flow teacher", flow_section, done)
    report = stages.run("report", lambda: write_report(paths.workdir, results, runs, stages.timings), False)
    print(f"[demo] report: {report}", flush=True)
    return report


def _cached(path: str, seeds: list[int], config_seed: int) -> dict | None:
    """The stored results, unless absent or evaluated over other training seeds (results from before the seed
    list hold config.seed's students alone)."""
    if not storage.exists(path):
        return None
    blob = storage.read_json(path)
    blob.pop("timings", None)
    return blob if blob.get("distill_seeds", [config_seed]) == seeds else None
