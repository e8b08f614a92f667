"""The main job's quick variant, on top of the session's trained world (its first stages are reused)."""

import json
import math
import os

import pytest

from dollar_jax.config import config_from_file
from dollar_jax.jobs import demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(world_run):

    config, workdir = world_run
    c = config_from_file("configs/demo.py:quick")
    # Reuse the session's world (videos, autoencoder, latents, teacher); the demo builds the rest.
    c.data.dir, c.autoencoder.dir, c.teacher.dir = config.data.dir, config.autoencoder.dir, config.teacher.dir
    c.world.update(dict(num_train=config.world.num_train, num_val=config.world.num_val,
                        held_out_combinations=config.world.held_out_combinations))
    # Students long enough for the latent reward to show (120 steps, not :quick's 12: about 15 s more here, most of
    # the stage is compiling) on a reward with headroom on the tests' world (its 4-step students: vividness 0.885
    # without the LRM; the default demo's sharper ones saturate it, configs/demo.py): VSD+CD and VSD+CD+LRM are then
    # the plain and the reward-tuned student of test_the_latent_reward_raises_the_true_reward_and_keeps_adherence.
    c.distill.steps = 120
    c.reward.update(dict(name="vividness", lrm_batch_size=16))
    # Stages one after another in this process, without TensorBoard files: the same numbers for less CPU. Side by
    # side, every stage's process imports JAX and TensorFlow and compiles the samplers the other students compile
    # too; in one process they are compiled once. On 2 cores with nothing else running (2026-11-25, the stages
    # after the teacher): 463 CPU-s side by side with TensorBoard, 425 without it, 352 in one process (BENCHMARKS.md,
    # "Test suite"). The side-by-side path has its own tests (test_side_by_side.py and the last test here).
    c.demo.side_by_side = 1
    c.tensorboard = False
    report = demo.run(c, workdir)
    return c, workdir, report


def test_report_structure_and_sane_numbers(demo_run):
    c, workdir, report = demo_run
    text = open(report).read()
    assert f"median of {c.demo.speed_repeats} runs of 1 video" in text
    for heading in ("## Protocol", "## Ablation", "## Seen and held-out", "## Claims of the paper", "## Speed",
                    "## Training curves", "## Samples", "## Stage times"):
        assert heading in text
    assert "Variant: `configs/demo.py:quick`. Teacher: VP (scaled_linear betas), conjugate_v prediction." in text
    # The margin is stated before any number; every claim ends in one of the three verdicts.
    assert text.index("Non-inferiority margin") < text.index("## Ablation")
    claims = [line for line in text.splitlines() if line.startswith("- **") and ": " in line]
    assert len(claims) >= 5 and all(any(f": {v}**" in line for v in ("reproduced", "not reproduced", "inconclusive"))
                                    for line in claims), claims
    results = json.load(open(os.path.join(os.path.dirname(report), "results.json")))
    names = [r["name"] for r in results["quality"]]
    assert names[0].startswith("data") and names[1].startswith("teacher")
    assert results["quality"][2].get("distillation_target") and "CFG 3.5" in names[2]  # the VSD real score's
    assert len(results["held_out_prompts"]) == 4 and results["distill_seeds"] == [0]
    for row in results["quality"][1:]:
        assert row["held_out"]["prompts"] == 4 and 0.0 <= row["held_out"]["adherence"]["all"] <= 1.0
    for model in ("VSD", "VSD+CD", "VSD+CD+LRM"):
        assert {r["steps"] for r in results["quality"] if r.get("model") == model} == {1, 2, 4}
    for row in results["quality"][1:]:
        assert all(0.0 <= v <= 1.0 for v in row["adherence"].values())
        assert 1.0 - 1e-6 <= row["vendi_pixels"] <= results["samples_per_prompt"] + 1e-6
        assert 1.0 - 1e-6 <= row["vendi_features"] <= results["samples_per_prompt"] + 1e-6
        assert math.isfinite(row["reward"]) and math.isfinite(row["frechet_distance"])
        assert os.path.exists(os.path.join(os.path.dirname(report), row["grid"]))
    teacher_nfe = results["quality"][1]["network_evaluations"]
    for s in results["speed"]:
        assert s["diffusion_s"] > 0 and s["end_to_end_s"] >= s["diffusion_s"] * 0.5
        assert s["repeats"] == demo.speed_repeats(c.demo.speed_repeats, s["batch"])
    assert teacher_nfe == 2 * results["quality"][1]["steps"]  # guided: two evaluations per step
    for png in ("teacher.png", "distill.png", "reward.png"):
        assert os.path.exists(os.path.join(os.path.dirname(report), png))


def test_the_latent_reward_raises_the_true_reward_and_keeps_adherence(demo_run):
    """The paper's claim end to end: fine-tuning through the LRM (labels from decoded samples, never a gradient
    through the decoder) raises the true reward of the 4-step samples over the same student without it, and costs
    little caption adherence; the report's verdict says so at its own standard error."""
    _, _, report = demo_run
    results = json.load(open(os.path.join(os.path.dirname(report), "results.json")))
    rows = {r["model"]: r for r in results["quality"] if r.get("steps") == 4 and r.get("seed") == 0}
    plain, tuned = rows["VSD+CD"], rows["VSD+CD+LRM"]
    assert results["reward_name"] == "vividness"
    assert tuned["reward"] - plain["reward"] > 0.02, (plain, tuned)
    assert tuned["adherence"]["mean"] >= plain["adherence"]["mean"] - 0.1, (plain, tuned)
    assert "- **The latent reward model raises the reward: reproduced**" in open(report).read()


def test_sample_cli_writes_videos_from_a_demo_student(demo_run, tmp_path):
    """`python -m dollar_jax.sample`'s folder mode on a student the demo exported (no training of its own)."""
    from dollar_jax.sample import generate_folder

    _, workdir, _ = demo_run
    out = os.path.join(workdir, demo.STUDENTS["VSD+CD"][0])
    blob = json.load(open(os.path.join(out, "config.json")))
    assert blob["student"]["timesteps"] == [999.0, 749.0, 499.0, 249.0]
    report = generate_folder(out, str(tmp_path / "videos"), prompts=["a large red circle moving left"], steps=1)
    assert report["network_evaluations"] == 1
    assert any(f.endswith(".mp4") for f in report["files"]) and any(f.endswith(".gif") for f in report["files"])
    with pytest.raises(ValueError, match="divisor"):
        generate_folder(out, str(tmp_path / "v3"), prompts=["a large red circle moving left"], steps=3)


def test_batched_speed_runs_time_about_as_many_videos_as_single_ones():
    assert [demo.speed_repeats(21, b) for b in (1, 2, 4, 16)] == [21, 10, 5, 3]
    assert demo.speed_repeats(3, 1) == 3 and demo.speed_repeats(2, 1) == 3  # never fewer than 3 runs for a median


def test_rerun_skips_finished_stages_and_reproduces_the_numbers(demo_run, capsys):
    c, workdir, report = demo_run
    results_path = os.path.join(os.path.dirname(report), "results.json")
    before = json.load(open(results_path))["quality"]
    os.remove(results_path)  # force the evaluation to run again; every training stage must be reused
    demo.run(c, workdir)
    out = capsys.readouterr().out
    for stage in ("autoencoder", "teacher", "VSD+CD+LRM"):
        assert f"{stage} (already done)" in out
    after = json.load(open(results_path))["quality"]
    assert after == before


def _first_stages_build_nothing(monkeypatch):
    """The videos, autoencoder and latents stages do nothing (a done stage still calls its job, which returns)."""
    for job in (demo.world_data, demo.autoencoder, demo.precompute):
        monkeypatch.setattr(job, "build_videos" if job is demo.world_data else "run", lambda *args: None)


def test_paper_extras_run_after_the_evaluation_resume_and_reach_the_report(tmp_path, monkeypatch, capsys):
    """`:paper`'s last stages on a finished run (every model folder and dataset there; the evaluation, the memory
    rows and the flow section's demo stand-ins): the evaluation is stored before them, so a run stopped in the flow
    section resumes without evaluating or measuring again; a changed memory setting measures again."""
    import numpy as np
    from test_report import _memory_row, _row

    from dollar_jax.data import arrays_dataset
    from dollar_jax.eval import reward_memory

    c = config_from_file("configs/demo.py:paper,quick")
    c.demo.reward_baselines = ""  # its stage is exercised by tests/test_reward_baselines.py
    workdir, teacher = str(tmp_path), np.linspace(0.6, 0.9, 8)
    quality = [{"name": "data", "adherence": {}}, _row("teacher", 50, teacher, held=teacher[:4])] + [
        _row(m, 4, teacher, s, held=teacher[:4]) for s in (0, 1, 2) for m in ("VSD", "VSD+CD", "VSD+CD+LRM")]
    results = {"quality": quality, "speed": [], "prompts": 8, "samples_per_prompt": 4, "reward_name": "sharpness",
               "speed_repeats": 3, "device": "cpu", "distill_seeds": [0, 1, 2], "held_out_prompts": []}
    calls = {"evaluate": 0, "memory": [], "flow": 0}
    monkeypatch.setattr(demo, "model_folder_exists", lambda path: True)
    monkeypatch.setattr(arrays_dataset, "exists", lambda *args: True)
    monkeypatch.setattr(demo, "evaluate_rows", lambda *args: {})
    _first_stages_build_nothing(monkeypatch)

    def evaluate(*args):
        calls["evaluate"] += 1
        return json.loads(json.dumps(results))

    def measure_rows(paths, frames, **kwargs):
        calls["memory"].append(list(frames))
        return [_memory_row(p, f, 0.1 * f + (p == "lrm") * 0.01 + (p == "pixel") * 100) | {"tiny": kwargs["tiny"]}
                for f in frames for p in paths]

    def flow_section(config, main_workdir, flow_dir):
        calls["flow"] += 1
        assert flow_dir == os.path.join(workdir, "flow") and config.demo.variant == "paper,quick"
        if calls["flow"] == 1:
            raise RuntimeError("stopped in the flow section")
        os.makedirs(os.path.join(flow_dir, "report"))
        with open(os.path.join(flow_dir, "report", "results.json"), "w") as f:
            json.dump(results | {"distill_seeds": [0], "teacher_parameterisation": "rectified flow"}, f)

    monkeypatch.setattr(demo, "evaluate", evaluate)
    monkeypatch.setattr(reward_memory, "measure_rows", measure_rows)
    monkeypatch.setattr(demo, "_run_flow_section", flow_section)
    with pytest.raises(RuntimeError, match="flow section"):
        demo.run(c, workdir)
    assert os.path.exists(os.path.join(workdir, "report", "results.json"))  # the evaluation, kept before the extras
    assert os.path.exists(os.path.join(workdir, "report", "reward_memory.png"))
    report = open(demo.run(c, workdir)).read()
    out = capsys.readouterr().out
    assert calls == {"evaluate": 1, "memory": [[8]], "flow": 2}
    assert "stage 17/19: reward memory (already done)" in out and "stage 18/19: flow teacher  " in out
    assert report.index("## Reward fine-tuning memory") < report.index("## The flow-matching teacher")
    assert "small stand-ins" in report  # :quick measures tiny networks, and the section says so
    c.demo.reward_memory.frames = (8, 16)  # other settings than the stored rows': measured again
    demo.run(c, workdir)
    assert calls["memory"] == [[8], [8, 16]] and calls["evaluate"] == 1 and calls["flow"] == 2


def test_side_by_side_the_demo_hands_its_own_stages_to_processes(tmp_path, monkeypatch):
    """With config.demo.side_by_side > 1 (every shipped demo config; demo_run above runs its stages in one process),
    the demo gives side_by_side.run the evaluation encoder with the teacher, then each student's training and
    evaluation with the teacher's rows; every stage survives the pickling that carries it into its process."""
    import pickle

    from dollar_jax.data import arrays_dataset
    from dollar_jax.jobs import side_by_side

    class Stop(Exception):
        pass

    c = config_from_file("configs/demo.py:quick")
    assert c.demo.side_by_side > 1
    groups = []

    def run_in_processes(stages, max_running, compilation_cache):
        assert max_running == c.demo.side_by_side
        for stage in stages:
            back = pickle.loads(pickle.dumps(stage))
            assert back.fn is stage.fn and back.args[0].to_dict() == stage.args[0].to_dict()
        groups.append({stage.name: stage.fn for stage in stages})
        return {stage.name: ({}, 0.0) for stage in stages}

    def stop(*args):
        raise Stop

    monkeypatch.setattr(arrays_dataset, "exists", lambda *args: True)  # videos and latents: done
    monkeypatch.setattr(demo, "model_folder_exists", lambda path: False)  # no model trained yet
    _first_stages_build_nothing(monkeypatch)
    monkeypatch.setattr(side_by_side, "run", run_in_processes)
    monkeypatch.setattr(demo, "evaluate", stop)  # the stage after the students
    with pytest.raises(Stop):
        demo.run(c, str(tmp_path))
    assert groups == [{"evaluation encoder": demo.world_encoder.run, "teacher": demo.teacher.run},
                      {"VSD": demo.train_and_evaluate, "VSD+CD": demo.train_and_evaluate,
                       "VSD+CD+LRM": demo.train_and_evaluate, "teacher evaluation": demo.evaluate_rows}]
