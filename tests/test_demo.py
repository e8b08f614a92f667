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
