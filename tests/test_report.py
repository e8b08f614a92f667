"""The report's statistics on constructed inputs: three verdicts for both kinds of claim, the standard error
over prompts and training seeds, and the protocol stated before the numbers. No model is trained here."""


import numpy as np
import pytest

from dollar_jax.config import config_from_file
from dollar_jax.eval.report import (CLAIM_STEPS, OUTCOMES, claims, held_out_section, paired_over_seeds,
                                    protocol_section, verdict)


@pytest.mark.parametrize("kind, margin, cases", [
    # non-inferiority at margin 0.05: the interval diff +- 2 se against -0.05
    ("non_inferior", 0.05, {"reproduced": (-0.01, 0.01), "not reproduced": (-0.12, 0.02),
                            "inconclusive": (-0.04, 0.02)}),
    # superiority (any rise): the interval against 0
    ("superior", 0.0, {"reproduced": (0.05, 0.01), "not reproduced": (-0.05, 0.01), "inconclusive": (0.01, 0.01)}),
])
def test_verdict_returns_each_outcome(kind, margin, cases):
    for outcome, (diff, se) in cases.items():
        assert verdict(diff, se, kind, margin) == outcome, (kind, diff, se)


def test_verdict_edges():
    assert verdict(0.0, 0.01, "non_inferior", 0.05) == "reproduced"  # equal models are non-inferior ...
    assert verdict(0.0, 0.01, "superior") == "inconclusive"  # ... but do not "raise"
    assert verdict(0.5, float("nan"), "superior") == "inconclusive"  # an unknown SE supports nothing
    with pytest.raises(ValueError, match="kind"):
        verdict(0.1, 0.01, "better")
    with pytest.raises(ValueError, match="margin"):
        verdict(0.1, 0.01, "non_inferior", -0.1)


def test_standard_error_over_prompts_and_seeds():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1, 12)), rng.normal(size=(1, 12))
    d, se = paired_over_seeds([(a[0], b[0])])  # one seed: the paired SE over prompts
    assert d == pytest.approx((a - b).mean()) and se == pytest.approx((a - b).std(ddof=1) / np.sqrt(12))
    # Three seeds whose means differ by an offset: the seeds' spread enters the SE.
    base = rng.normal(size=12)
    offsets = np.array([-0.3, 0.0, 0.3])
    pairs = [(base + o, np.zeros(12)) for o in offsets]
    d, se = paired_over_seeds(pairs)
    want = np.sqrt(offsets.var(ddof=1) / 3 + base.var(ddof=1) / 12)
    assert d == pytest.approx(base.mean()) and se == pytest.approx(want)
    assert se > paired_over_seeds([pairs[1]])[1]


def _row(model, steps, adherence, seed=None, held=None, **extra):
    p = len(adherence)
    row = {"name": f"{model} ({steps} steps)", "model": model, "steps": steps,
           "adherence": {"mean": float(np.mean(adherence)), "all": 0.5},
           "per_prompt": {"adherence": list(adherence), "reward": [0.5] * p, "vendi_features": [2.0] * p,
                          "vendi_pixels": [3.0] * p}} | extra
    if seed is not None:
        row["seed"] = seed
    if held is not None:
        row["held_out"] = {"prompts": len(held), "per_prompt": {"adherence": list(held)},
                           "adherence": {f: 0.5 for f in ("colour", "shape", "direction", "size")}
                           | {"mean": float(np.mean(held)), "all": 0.25}}
    return row


def test_claims_over_seeds_with_held_out_prompts():
    rng = np.random.default_rng(1)
    teacher = rng.uniform(0.5, 0.9, 16)
    held_teacher = rng.uniform(0.5, 0.9, 6)
    quality = [{"name": "data", "adherence": {}},
               _row("teacher", 50, teacher, held=held_teacher),
               _row("teacher", 50, teacher - 0.1, held=held_teacher, distillation_target=True)]
    for seed in (0, 1, 2):
        noise = rng.normal(0, 0.01, 16)
        quality.append(_row("VSD+CD", CLAIM_STEPS, teacher + noise, seed, held=held_teacher - 0.3))  # far below
        quality.append(_row("VSD+CD+LRM", CLAIM_STEPS, teacher + noise, seed, held=held_teacher))
        quality.append(_row("VSD", CLAIM_STEPS, teacher, seed))
        quality.append(_row("VSD+CD+LRM", 1, teacher - 0.5, seed))  # other step counts are not judged
    out = {claim: (result, detail) for claim, result, detail in claims({"quality": quality, "reward_name": "r"}, 0.05)}
    seen = {c: r for c, r in out.items() if "matches" in c and "held-out" not in c}
    held = {c: r for c, r in out.items() if "held-out" in c}
    assert [r for r, _ in seen.values()] == ["reproduced", "reproduced"]
    assert all("3 seeds" in d and "distillation target" in d for _, d in seen.values())
    assert {c.split("(")[1].split(")")[0]: r for c, (r, _) in held.items()} == {
        "VSD+CD+LRM": "reproduced", "VSD+CD": "not reproduced"}
    assert out["The latent reward model raises the reward"][0] == "inconclusive"  # equal rewards: no rise


def test_protocol_states_margin_seeds_and_held_out_prompts_first():
    results = {"distill_seeds": [0, 1, 2], "held_out_prompts": ["a large red circle moving up"], "prompts": 16,
               "quality": [_row("teacher", 50, [0.5, 0.6], held=[0.4])]}
    text = "\n".join(protocol_section(results, 0.05))
    assert "margin" in text and "**0.05**" in text and "3 (0, 1, 2)" in text and "a large red circle moving up" in text
    assert "one seed" in "\n".join(protocol_section(results | {"distill_seeds": [0]}, 0.05))
    assert "| teacher (50 steps) | 0.550 |" in "\n".join(held_out_section(results))


def _demo_config(arg):
    return config_from_file("configs/demo.py" + (f":{arg}" if arg else ""))


def test_demo_config_seeds_margin_and_held_out():
    from dollar_jax.config import validate
    from dollar_jax.jobs.demo import student_config, student_runs

    default, paper = _demo_config(None), _demo_config("paper")
    assert tuple(default.demo.distill_seeds) == (0,) and tuple(paper.demo.distill_seeds) == (0, 1, 2)
    assert default.report.non_inferiority_margin > 0 and default.world.held_out_combinations > 0
    with pytest.raises(AttributeError):
        default.report.non_inferiority_margn = 0.1  # the config is locked: a mistyped key is an error
    # One seed keeps the run names a one-seed demo always had (its work directory resumes as it was).
    assert [(n, s) for n, s, _ in student_runs(default)] == [("VSD", 0), ("VSD+CD", 0), ("VSD+CD+LRM", 0)]
    assert student_config(default, "VSD", 0).distill.name == "student_vsd"
    runs = student_runs(paper)
    assert len(runs) == 9 and runs[3][2] == "VSD seed 1"
    c = student_config(paper, "VSD+CD", 2)
    assert (c.distill.name, c.seed, c.data.shuffle_seed) == ("student_vsd_cd_seed2", 2, 2)
    from dollar_jax.eval.reward_baselines import parse_specs

    assert default.demo.reward_baselines == "" and len(parse_specs(paper.demo.reward_baselines)) == 2
    paper.demo.distill_seeds = (0, 0)
    with pytest.raises(ValueError, match="distill_seeds"):
        validate(paper)


def test_flow_variant_is_the_default_with_wans_teacher_and_says_so():
    from dollar_jax.config import validate
    from dollar_jax.jobs.demo import teacher_kind

    default, flow = _demo_config(None), _demo_config("quick,flow")
    validate(flow)
    assert (flow.diffusion.schedule, flow.diffusion.prediction_type, flow.diffusion.flow_shift) == ("flow", "flow", 3.0)
    assert (default.demo.variant, flow.demo.variant) == ("default", "quick,flow")
    assert teacher_kind(flow) == ("rectified flow, flow prediction, timesteps shifted by 3 (Wan2.1's), trained on "
                                  "logit-normal timesteps (mean -1, std 1)")
    assert teacher_kind(default) == "VP (scaled_linear betas), conjugate_v prediction"
    # The teachers' training differs in the timestep density (the flow teacher's uniform draws, shifted, left shape
    # unlearnt) and in the optimiser and steps each kind was measured with (the default: Muon, 1200; flow: AdamW,
    # 2000, run K); the rest of the optimiser section is the same.
    teachers = default.teacher.to_dict(), _demo_config("flow").teacher.to_dict()
    assert {k for k in teachers[0] if teachers[0][k] != teachers[1][k]} == {"timesteps", "logit_mean", "steps", "optim"}
    assert (teachers[0]["steps"], teachers[0]["optim"]["name"], teachers[1]["steps"], teachers[1]["optim"]["name"]) == \
        (1200, "muon", 2000, "adamw")
    assert {k for k in teachers[0]["optim"] if teachers[0]["optim"][k] != teachers[1]["optim"][k]} == {"name"}
    # Everything the two teachers share stays the same: the reports then differ in the parameterisation alone.
    for section in ("sampling", "distill", "reward", "world"):
        assert default[section].to_dict() == _demo_config("flow")[section].to_dict(), section


def test_curves_leave_out_panels_with_nothing_logged(tmp_path, monkeypatch):
    import json

    import matplotlib.pyplot as plt

    from dollar_jax.eval import report

    run = tmp_path / "runs" / "teacher"
    run.mkdir(parents=True)
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 11)]
    rows += [{"step": s, "adherence_shape": 0.3 + 0.01 * s, "adherence_colour": 1.0} for s in (5, 10)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    made = []
    real = plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    png = tmp_path / "teacher.png"
    path = report._plot_curves(str(tmp_path), {"teacher": str(run)}, str(png),
                               ["loss", "val_loss", ("adherence", ("adherence_colour", "adherence_shape",
                                                                   "adherence_direction"))], "t")
    assert path == "teacher.png" and png.exists()
    axes = made[0][1][0]
    assert [ax.get_title() for ax in axes] == ["loss", "adherence"]  # val_loss was never logged: no panel
    assert [line.get_label() for line in axes[1].get_lines()] == ["colour", "shape"]  # one line per factor logged
    assert report._plot_curves(str(tmp_path), {"teacher": str(run)}, str(tmp_path / "none.png"), ["val_loss"],
                               "t") is None


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


@pytest.mark.parametrize("main, variant", [("paper", "flow"), ("paper,quick", "quick,flow")])
def test_paper_variant_runs_the_flow_variant_on_its_data_with_one_seed(tmp_path, main, variant):
    from dollar_jax.config import validate
    from dollar_jax.jobs.demo import flow_config
    from dollar_jax.paths import Paths

    paper, flow = _demo_config(main), _demo_config(variant)
    assert paper.demo.reward_memory.enabled and not flow.demo.reward_memory.enabled and not len(flow.demo.flow_section)
    workdir = str(tmp_path / "run")
    sub = flow_config(paper, workdir)
    validate(sub)
    # The section's demo is the :flow variant's (quick's for a quick run), key for key: one seed, no baselines,
    # no memory curve, the default's speed table, its own teacher ... but on the main run's data, autoencoder
    # and evaluation encoder.
    got, want = _flat(sub.to_dict()), _flat(flow.to_dict())
    assert {k for k in got.keys() | want.keys() if got.get(k) != want.get(k)} == {
        "data.dir", "autoencoder.dir", "world_encoder.dir"}
    main_paths, own = Paths.of(paper, workdir), Paths.of(sub, str(tmp_path / "run" / "flow"))
    assert (own.data, own.autoencoder, own.world_encoder(sub)) == (main_paths.data, main_paths.autoencoder,
                                                                   main_paths.world_encoder(paper))
    assert own.teacher == str(tmp_path / "run" / "flow" / "teacher")
    assert tuple(sub.demo.distill_seeds) == (0,) and not len(sub.demo.flow_section)


def _memory_row(path, frames, peak_gib):
    gib = 2.0**30
    return {"compiler": "XLA:CPU", "path": path, "frames": frames, "latent_frames": 1 + frames // 4,
            "decoded_frames": 1 + frames, "argument_bytes": 0.1 * gib, "output_bytes": 1024.0,
            "temp_bytes": peak_gib * gib - 0.1 * gib - 1024.0, "alias_bytes": 0.0, "peak_bytes": peak_gib * gib,
            "compile_s": 1.0, "height": 480, "width": 832, "dtype": "float32"}


def test_report_holds_the_flow_section_and_the_memory_curve(tmp_path):
    from dollar_jax.eval.report import flow_section, reward_memory_section, write_report

    rng = np.random.default_rng(2)
    teacher = rng.uniform(0.6, 0.9, 8)
    flow = {"quality": [{"name": "data", "adherence": {}}, _row("teacher", 50, teacher, held=teacher[:4])]
            + [_row(m, s, teacher - 0.01 * (s == 1), 0, held=teacher[:4]) for m in ("VSD", "VSD+CD", "VSD+CD+LRM")
               for s in (4, 1)],
            "distill_seeds": [0], "non_inferiority_margin": 0.05, "reward_name": "sharpness",
            "teacher_parameterisation": "rectified flow, flow prediction, timesteps shifted by 3 (Wan2.1's)"}
    memory = [_memory_row("student", f, 0.1 * f / 8) for f in (8, 128)] + [
        _memory_row("lrm", f, 0.1 * f / 8 + 0.004) for f in (8, 128)] + [
        _memory_row("pixel", 8, 113.0), {"compiler": "XLA:CPU", "path": "pixel", "frames": 128, "latent_frames": 33,
                                         "decoded_frames": 129, "error": "over 900 s"}]
    text = "\n".join(flow_section({"flow_section": flow}) + reward_memory_section({"reward_memory": memory}))
    assert "## The flow-matching teacher (Wan2.1's parameterisation)" in text and "shifted by 3" in text
    assert "| teacher (50 steps) |" in text and "| VSD+CD+LRM (4 steps) |" in text  # 1-step rows: its own report
    assert "| VSD+CD+LRM (1 steps) |" not in text and "flow/report/REPORT.md" in text
    judged = [line for line in text.splitlines() if line.startswith("- **")]
    assert len(judged) == 6 and all(line.split(": ")[1].split("**")[0] in OUTCOMES for line in judged), judged
    # The pixel path at 128 frames did not finish: the sentence quotes the largest frame count measured for both.
    assert "At 8 frames the pixel path needs 113.0 GiB at its peak" in text and "4.1 MiB over it" in text
    assert "not measured: over 900 s" in text and "![peak memory vs frames](reward_memory.png)" in text
    assert flow_section({}) == [] and reward_memory_section({}) == []
    results = {"quality": [{"name": "data", "adherence": {}}] + flow["quality"][1:], "speed": [], "prompts": 8,
               "samples_per_prompt": 4, "reward_name": "sharpness", "speed_repeats": 3, "device": "cpu",
               "flow_section": flow, "reward_memory": memory}
    report = open(write_report(str(tmp_path), results, {"teacher": str(tmp_path / "none")}, {})).read()
    assert report.index("## Claims of the paper") < report.index("## Reward fine-tuning memory") < \
        report.index("## The flow-matching teacher") < report.index("## Speed")
