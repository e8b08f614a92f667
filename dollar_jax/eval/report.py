"""REPORT.md for the demo: the paper's ablation and speed tables with measured numbers, the claims checked,
training curves (PNG) and sample grids (GIF/MP4)."""

from __future__ import annotations

import os

import numpy as np

from dollar_jax import storage
from dollar_jax.data.world import FACTORS
from dollar_jax.train.metrics import read_metrics

# The paper's numbers (arXiv 2412.15689), for context next to ours: VBench total and Vendi (Inception).
PAPER_ABLATION = {"teacher": (80.25, 2.34), "VSD": (80.08, 1.91), "VSD+CD": (80.65, 2.14), "VSD+CD+LRM": (82.57, 1.98)}
PAPER_DIFFUSION_SPEEDUP = {1: 278.6, 2: 91.94 / 2.16, 4: 91.94 / 5.88}  # % of teacher diffusion time ratios


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def _plot_curves(workdir: str, runs: dict[str, str], out_png: str, panels: list, title: str) -> str | None:
    """One panel per entry of `panels`: a metric key (a line per run), or (panel title, keys) (a line per run
    and key). Panels with nothing logged are left out, so no figure has an empty panel; None if none is left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {label: read_metrics(run) for label, run in runs.items()}
    lines = []  # (panel title, [(line label, steps, values)])
    for panel in panels:
        name, keys = (panel, (panel,)) if isinstance(panel, str) else panel
        drawn = []
        for label, rows in metrics.items():
            for key in keys:
                kept = [r for r in rows if key in r]
                if kept:
                    line = label if len(keys) == 1 else (key.rsplit("_", 1)[-1] if len(runs) == 1 else f"{label} {key}")
                    drawn.append((line, [r["step"] for r in kept], [r[key] for r in kept]))
        if drawn:
            lines.append((name, drawn))
    if not lines:
        return None
    fig, axes = plt.subplots(1, len(lines), figsize=(4.2 * len(lines), 3.2), squeeze=False)
    for ax, (name, drawn) in zip(axes[0], lines):
        for label, steps, values in drawn:
            ax.plot(steps, values, label=label, marker="o" if len(steps) < 12 else None, markersize=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(drawn) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with storage.local_file(out_png) as local:
        fig.savefig(local, dpi=110, format="png")
    plt.close(fig)
    return os.path.relpath(out_png, workdir)


# The claims compare the paper's 4-step students; Z standard errors make the two-sided ~95% interval.
CLAIM_STEPS = 4
Z = 2.0
OUTCOMES = ("reproduced", "not reproduced", "inconclusive")


def verdict(diff: float, se: float, kind: str, margin: float = 0.0) -> str:
    """Judge a claim from a difference (better - worse direction: higher is the claim's side) and its SE.

    The interval diff +- Z * se is compared with a threshold fixed before the run:
      kind "non_inferior" ("a matches b"): threshold -margin, a may be at most `margin` below b;
      kind "superior" ("a raises the value over b"): threshold +margin, the smallest rise that counts
        (the report uses 0: any rise).
    "reproduced" when the whole interval lies above the threshold, "not reproduced" when it lies wholly below,
    "inconclusive" when it straddles it (or the SE is unknown): the evidence then supports neither.
    """
    if kind not in ("non_inferior", "superior"):
        raise ValueError(f"verdict: kind must be 'non_inferior' or 'superior', got {kind!r}")
    if not margin >= 0:
        raise ValueError(f"verdict: margin must be >= 0, got {margin}")
    threshold = -margin if kind == "non_inferior" else margin
    if diff - Z * se > threshold:
        return "reproduced"
    if diff + Z * se < threshold:
        return "not reproduced"
    return "inconclusive"


def paired_over_seeds(pairs: list[tuple]) -> tuple[float, float]:
    """Mean paired difference over seeds and prompts, and its standard error.

    `pairs` holds one (a, b) per training seed: per-prompt values of two models on the same prompts and noise
    (b may be the same teacher for every seed). With d[s, p] = a - b over S seeds and P prompts:
        diff = mean over s and p of d
        SE^2 = var_s(mean_p d) / S  +  var_p(mean_s d) / P      (sample variances, ddof = 1)
    The first term is the seed-to-seed spread of the per-seed mean differences (absent with one seed: then it
    is not measured), the second the prompt-to-prompt spread of the seed-averaged differences (prompts are
    shared by every seed, so the seeds' spread does not contain it). The within-seed noise enters both terms,
    which makes the SE slightly conservative. One seed gives the paired SE over prompts.
    """
    d = np.asarray([np.asarray(a, np.float64) - np.asarray(b, np.float64) for a, b in pairs])  # [S, P]
    s, p = d.shape
    seeds = d.mean(1).var(ddof=1) / s if s > 1 else 0.0
    prompts = d.mean(0).var(ddof=1) / p if p > 1 else float("nan")
    return float(d.mean()), float(np.sqrt(seeds + prompts))


def _values(row: dict, key: str, held_out: bool = False) -> list[float]:
    return (row["held_out"] if held_out else row)["per_prompt"][key]


def _students(results: dict, model: str) -> dict:
    """seed -> the model's CLAIM_STEPS row (results from before seeds existed hold one row, seed 0)."""
    return {r.get("seed", 0): r for r in results["quality"]
            if r.get("model") == model and r.get("steps") == CLAIM_STEPS}


def _compare(a_rows: dict, b_rows: dict, key: str, held_out: bool = False):
    """(mean a, mean b, difference, SE, seeds) over the seeds both have; b_rows may be {None: teacher row}."""
    seeds = [s for s in a_rows if s in b_rows or None in b_rows]
    pairs = [(_values(a_rows[s], key, held_out), _values(b_rows.get(s, b_rows.get(None)), key, held_out))
             for s in seeds]
    d, se = paired_over_seeds(pairs)
    return float(np.mean([p[0] for p in pairs])), float(np.mean([p[1] for p in pairs])), d, se, len(seeds)


def claims(results: dict, margin: float) -> list[tuple[str, str, str]]:
    """The paper's orderings, judged by `verdict` on paired differences over prompts and training seeds.

    "Matches the teacher" is non-inferiority at `margin` (adherence, fixed before the run); "raises" is
    superiority (any rise, at two standard errors)."""
    teacher = next(r for r in results["quality"] if r.get("model") == "teacher" and not r.get("distillation_target"))
    target = next((r for r in results["quality"] if r.get("distillation_target")), None)
    seeds = lambda n: f"{n} seed{'s' * (n > 1)}"
    out = []
    for held_out in (False, True):
        if held_out and "held_out" not in teacher:
            continue
        where = " on held-out compositions" if held_out else ""
        for model in ("VSD+CD+LRM", "VSD+CD"):
            rows = _students(results, model)
            if not rows:
                continue
            a, b, d, se, n = _compare(rows, {None: teacher}, "adherence", held_out)
            also = (f"; the teacher at the distillation target's guidance: "
                    f"{np.mean(_values(target, 'adherence', held_out)):.3f}" if target else "")
            out.append((f"The {CLAIM_STEPS}-step student ({model}) matches the teacher's caption adherence{where} "
                        f"(non-inferiority, margin {margin:g})", verdict(d, se, "non_inferior", margin),
                        f"{a:.3f} vs teacher {b:.3f} (difference {d:+.3f} +- {se:.3f}, {seeds(n)}){also}"))
    vsd, vsdcd, lrm = (_students(results, m) for m in ("VSD", "VSD+CD", "VSD+CD+LRM"))
    if vsd and vsdcd:
        a, b, d, se, n = _compare(vsdcd, vsd, "vendi_features")
        ap, bp, dp, sep, _ = _compare(vsdcd, vsd, "vendi_pixels")
        out.append(("Adding CD raises diversity over VSD alone (Vendi, features)", verdict(d, se, "superior"),
                    f"{a:.3f} vs {b:.3f} ({d:+.3f} +- {se:.3f}, {seeds(n)}); on pixels {ap:.3f} vs {bp:.3f} "
                    f"({dp:+.3f} +- {sep:.3f})"))
    if lrm and vsdcd:
        a, b, d, se, n = _compare(lrm, vsdcd, "reward")
        out.append(("The latent reward model raises the reward", verdict(d, se, "superior"),
                    f"{results['reward_name']}: {a:.3f} vs VSD+CD {b:.3f} ({d:+.3f} +- {se:.3f}, {seeds(n)})"))
    return out


def protocol_section(results: dict, margin: float) -> list[str]:
    """What the verdicts are judged against, stated before any number of the run."""
    seeds = results.get("distill_seeds", [0])
    held = results.get("held_out_prompts", [])
    return [
        "## Protocol (fixed before the run)", "",
        f"- Non-inferiority margin for \"the student matches the teacher\": **{margin:g}** of caption adherence "
        "(`config.report.non_inferiority_margin`). With d the paired difference (student - teacher) and SE its "
        f"standard error: **reproduced** when d - {Z:g} SE > -margin, **not reproduced** when d + {Z:g} SE < -margin, "
        "**inconclusive** otherwise.",
        f"- \"Raises\": reproduced when d - {Z:g} SE > 0, not reproduced when d + {Z:g} SE < 0, inconclusive "
        "otherwise.",
        f"- Training seeds of every student: {len(seeds)} ({', '.join(map(str, seeds))}). Differences are paired "
        "(same prompts, same noise); SE^2 = var over seeds of the per-seed mean difference / seeds + var over "
        "prompts of the seed-averaged difference / prompts"
        + (" (one seed: the seed-to-seed variation is not measured; `configs/demo.py:paper` trains three)."
           if len(seeds) == 1 else "."),
        f"- Held-out compositions (in no training or validation clip, every single factor value and every pair "
        f"of values still seen): {len(held)}" + (": " + "; ".join(held) if held else "") + ".", ""]


def held_out_section(results: dict) -> list[str]:
    """Markdown: adherence on seen and on held-out prompts, per model (compositional generalisation)."""
    rows = [r for r in results["quality"] if "held_out" in r]
    if not rows:
        return []
    lines = ["## Seen and held-out compositions", "",
             f"Adherence on the {results['prompts']} seen prompts and on the {rows[0]['held_out']['prompts']} "
             "held-out ones (same samples per prompt).", "",
             "| model | seen: mean | seen: all four | held-out: colour | shape | direction | size | "
             "held-out: mean | held-out: all four |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h = r["held_out"]["adherence"]
        lines.append(f"| {r['name']} | {_fmt(r['adherence']['mean'])} | {_fmt(r['adherence']['all'])} | "
                     + " | ".join(_fmt(h[f]) for f in ("colour", "shape", "direction", "size"))
                     + f" | {_fmt(h['mean'])} | {_fmt(h['all'])} |")
    return lines + [""]


def reward_baselines_section(results: dict) -> list[str]:
    """Markdown: the LRM against the pixel path and a policy gradient (the paper's Table 8.5), when run."""
    rows = results.get("reward_baselines")
    if not rows:
        return []
    from dollar_jax.eval.reward_baselines import table

    return ["## The latent reward model against its alternatives", "",
            f"The VSD+CD student fine-tuned on each reward alone for {rows[0]['steps']} steps of batch "
            f"{rows[0]['batch']} by each method, with the same optimiser and prompts "
            "(`dollar_jax/eval/reward_baselines.py`): **lrm** climbs a latent reward model trained on the true "
            "reward of its own samples (DOLLAR); **pixel** backpropagates the reward through the decoder "
            "(differentiable rewards only); **pg** is a DDPO-style policy gradient on the sampling chain. Reward "
            "and adherence on the evaluation prompts before and after; time per step includes decoding and "
            "scoring on the host; memory is the compiler's figure for the method's largest device program.", "",
            *table(rows), ""]


def flow_section(results: dict) -> list[str]:
    """Markdown: the flow-matching teacher's demo (config.demo.flow_section): its teacher and 4-step students on
    the seen and held-out prompts, and the paper's claims judged on them as above."""
    flow = results.get("flow_section")
    if not flow:
        return []
    margin = flow.get("non_inferiority_margin", results.get("non_inferiority_margin", 0.0))
    seeds = flow.get("distill_seeds", [0])
    shown = [r for r in flow["quality"] if r.get("model") == "teacher" or
             (r.get("steps") == CLAIM_STEPS and r.get("seed", seeds[0]) == seeds[0])]
    lines = ["## The flow-matching teacher (Wan2.1's parameterisation)", "",
             f"The same ablation with a second teacher, {flow.get('teacher_parameterisation', 'flow')}, trained on "
             f"this run's data and evaluated with this run's autoencoder and evaluation encoder on the same prompts "
             f"and noise; its students trained as above with {len(seeds)} seed{'s' * (len(seeds) > 1)}. Its whole "
             "report: [flow/report/REPORT.md](../flow/report/REPORT.md).", "",
             "| model | colour | shape | direction | size | all four | held-out: mean | held-out: all four | "
             "reward |", "|---|---|---|---|---|---|---|---|---|"]
    for r in shown:
        a, h = r["adherence"], r.get("held_out", {}).get("adherence", {})
        lines.append(f"| {r['name']} | " + " | ".join(_fmt(a.get(f)) for f in FACTORS) + f" | {_fmt(a.get('all'))} | "
                     f"{_fmt(h.get('mean'))} | {_fmt(h.get('all'))} | {_fmt(r.get('reward'))} |")
    lines += ["", f"Its claims (margin {margin:g}, {Z:g} standard errors):", ""]
    lines += [f"- **{claim}: {result}** - {detail}." for claim, result, detail in claims(flow, margin)]
    return lines + [""]


def reward_memory_section(results: dict) -> list[str]:
    """Markdown: the memory of one reward fine-tuning generator step through the LRM and through the pixel
    path, frames 8..128 (config.demo.reward_memory), with the table and the plot beside REPORT.md."""
    rows = results.get("reward_memory")
    if not rows:
        return []
    from dollar_jax.eval.reward_memory import BASELINE, GIB, markdown

    measured = {(r["path"], r["frames"]): r["peak_bytes"] for r in rows if "peak_bytes" in r}
    both = sorted(f for (p, f) in measured if p == "pixel" and ("lrm", f) in measured and (BASELINE, f) in measured)
    r0 = rows[0]
    networks = ("small stand-ins of Wan2.1's VAE decoder and of a ViT (`tiny`: a smoke run, not the paper's sizes)"
                if r0.get("tiny") else "Wan2.1's VAE decoder and a ViT-B/16 at their real sizes")
    lines = ["## Reward fine-tuning memory: the LRM against the pixel path", "",
             f"One reward fine-tuning generator step (batch 1, {r0['height']} x {r0['width']}, {r0['dtype']}), "
             "compiled ahead of time and read from the compiler's memory analysis "
             "(`dollar_jax/eval/reward_memory.py`): the student alone (a tiny stand-in, the same in every row); the "
             "LRM path (the paper's image LRM on the latents); the pixel path (decode and score every frame with "
             f"{networks}, random and frozen, and backpropagate through both, nothing rematerialised). The paper: "
             "> 90 GB for the pixel path at 128 frames, megabytes for the LRM; it does not say how it decoded "
             "(precision, checkpointing), so the pixel path's figures here, in float32 without rematerialisation "
             "on the compiler named in each row, bound that setting from above rather than repeat it.", ""]
    if both:
        f = both[-1]
        lrm, pixel = (measured[p, f] - measured[BASELINE, f] for p in ("lrm", "pixel"))
        lines += [f"At {f} frames the pixel path needs {measured['pixel', f] / GIB:.1f} GiB at its peak, "
                  f"{pixel / GIB:.1f} GiB over the student alone; the LRM path {lrm / 2**20:.1f} MiB over it.", ""]
    return lines + [markdown(rows), "", "![peak memory vs frames](reward_memory.png)", ""]


def _variant_config(variant: str) -> str:
    return "configs/demo.py" + ("" if variant == "default" else f":{variant}")


def write_report(workdir: str, results: dict, runs: dict[str, str], timings: dict) -> str:
    out_dir = storage.join(workdir, "report")
    storage.makedirs(out_dir)
    lines = ["# DOLLAR on the embedded world: report", "",
             "Everything below was measured in this run (`results.json` beside this file holds the raw numbers). "
             f"Prompts: {results['prompts']} x {results['samples_per_prompt']} samples with fixed noise, the same for "
             "every model. Reward: " + f"`{results['reward_name']}`.",
             "", f"Variant: `{_variant_config(results.get('variant', 'default'))}`. Teacher: "
             f"{results.get('teacher_parameterisation', 'VP, conjugate_v prediction')}.", ""]
    margin = results.get("non_inferiority_margin", 0.0)
    lines += protocol_section(results, margin)

    lines += ["## Ablation (the paper's Table: teacher / VSD / VSD+CD / VSD+CD+LRM)", "",
              "| model | NFE | colour | shape | direction | size | adherence (mean) | all four | Vendi pixels | "
              "Vendi features | reward | Frechet distance | paper VBench / Vendi |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["quality"]:
        a = r["adherence"]
        paper = PAPER_ABLATION.get(r.get("model", ""))
        shown = paper and not r.get("distillation_target") and (r.get("steps") in (4, 50) or r.get("model") == "teacher")
        paper_s = f"{paper[0]} / {paper[1]}" if shown else ""
        lines.append(
            f"| {r['name']} | {r.get('network_evaluations', '-')} | {_fmt(a.get('colour'))} | {_fmt(a.get('shape'))} | "
            f"{_fmt(a.get('direction'))} | {_fmt(a.get('size'))} | {_fmt(a.get('mean'))} | {_fmt(a.get('all'))} | "
            f"{_fmt(r.get('vendi_pixels'))} | {_fmt(r.get('vendi_features'))} | {_fmt(r.get('reward'))} | "
            f"{_fmt(r.get('frechet_distance'), 2)} | {paper_s} |")
    lines += ["", "Adherence: the fraction of clips whose factor, read back from the pixels by the world's oracle, is "
              "the caption's. Vendi: effective number of distinct samples among the samples of one prompt (max "
              f"{results['samples_per_prompt']}), on pixels and on the evaluation encoder's features. Frechet distance:"
              " to the validation clips, on the same features (the data row: between two halves of the data).", ""]

    lines += held_out_section(results)
    lines += ["## Claims of the paper, checked here", ""]
    lines += [f"Judged as the protocol above states (margin {margin:g}, {Z:g} standard errors); differences are "
              "paired over prompts and training seeds.", ""]
    for claim, result, detail in claims(results, margin):
        lines.append(f"- **{claim}: {result}** - {detail}.")
    lines.append("")
    lines += reward_baselines_section(results)
    lines += reward_memory_section(results)
    lines += flow_section(results)

    repeats = {s["batch"]: s.get("repeats", results["speed_repeats"]) for s in results["speed"]}
    runs_per_batch = ", ".join(f"{r} runs of {b} video{'s' * (b > 1)}" for b, r in sorted(repeats.items()))
    lines += [f"## Speed ({results['device']}, median of {runs_per_batch}, compilation excluded)", "",
              "| sampler | videos | NFE | diffusion (s) | speed-up, diffusion | end to end (s) | speed-up, end to end "
              "| paper, diffusion |", "|---|---|---|---|---|---|---|---|"]
    for s in results["speed"]:
        teacher_speed = next(t for t in results["speed"] if "teacher" in t["name"].lower() and t["batch"] == s["batch"])
        n = s.get("steps")
        paper = PAPER_DIFFUSION_SPEEDUP.get(n) if "teacher" not in s["name"].lower() else None
        lines.append(f"| {s['name']} | {s['batch']} | {s['network_evaluations']} | {s['diffusion_s']:.4f} | "
                     f"{teacher_speed['diffusion_s'] / s['diffusion_s']:.1f}x | {s['end_to_end_s']:.4f} | "
                     f"{teacher_speed['end_to_end_s'] / s['end_to_end_s']:.1f}x | "
                     f"{'' if paper is None else f'{paper:.1f}x'} |")
    lines += ["", "End to end = prompt encoding + diffusion + autoencoder decoding. The paper's end-to-end speed-up is "
              "about 13x because umT5 and the VAE stay; in this world both are tiny. With one video the tiny DiT's "
              "forward is so short that fixed per-call costs weigh on the ratio; the batch of 16 shows the ratio of "
              "network evaluations more closely.", ""]

    curves = {
        "teacher": _plot_curves(workdir, {"teacher": runs["teacher"]}, os.path.join(out_dir, "teacher.png"),
                                ["loss", "val_loss", ("adherence by factor (EMA, guided samples)",
                                                      tuple(f"adherence_{f}" for f in (*FACTORS, "all")))],
                                "teacher pre-training"),
        "distill": _plot_curves(workdir, {k: v for k, v in runs.items() if k != "teacher"},
                                os.path.join(out_dir, "distill.png"),
                                ["loss_vsd", "loss_cd", "loss_fake", "sample_diversity"], "distillation"),
        "reward": _plot_curves(workdir, {k: v for k, v in runs.items() if "LRM" in k},
                               os.path.join(out_dir, "reward.png"),
                               ["loss_lrm", "loss_ft", "true_reward_4step", "lrm_true_correlation"], "latent reward"),
    }
    lines += health_section(runs)
    lines += ["## Training curves", ""]
    lines += [f"![{k}]({os.path.relpath(os.path.join(workdir, v), out_dir)})" for k, v in curves.items() if v]
    lines += ["", "## Samples (one per prompt, first frame row to last: open the GIF/MP4)", ""]
    for r in results["quality"]:
        if r.get("grid"):
            lines.append(f"- {r['name']}: [{r['grid']}]({r['grid']})")
    lines += ["", "## Stage times", "", "| stage | seconds | |", "|---|---|---|"]
    for stage, t in timings.items():
        note = ("reused from the work directory" if t["reused"] else
                f"side by side with {', '.join(t['beside'])} (not in the total)" if t.get("beside") else
                "wall time of the stages run side by side" if t.get("side_by_side") else "")
        note = "; ".join(n for n in (t.get("note"), note) if n)
        lines.append(f"| {stage} | {t['seconds']:.1f} | {note} |")
    lines.append(f"| total | {sum(t['seconds'] for t in timings.values() if not t.get('beside')):.1f} | |")
    path = storage.join(out_dir, "REPORT.md")
    storage.write_text(path, "\n".join(lines) + "\n")
    storage.write_json(storage.join(out_dir, "results.json"), results | {"timings": timings}, indent=2)
    return path


def health_section(runs: dict[str, str]) -> list[str]:
    """Markdown: per distillation run, the share of steps each health alarm was raised on (whole run / last
    quarter) and the last logged sample-to-data ratios (dollar_jax/train/health.py)."""
    from dollar_jax.train.health import ALARMS

    lines = ["## Training health (share of steps alarmed: whole run / last quarter)", "",
             "| run | " + " | ".join(a.removeprefix("alarm_") for a in ALARMS)
             + " | diversity / data's | motion / data's |", "|---|" + "---|" * (len(ALARMS) + 2)]
    found = False
    for name, run in runs.items():
        rows = [r for r in read_metrics(run) if "alarm_collapse" in r]
        if not rows:
            continue
        found = True
        tail = rows[len(rows) - max(1, len(rows) // 4):]
        shares = [f"{np.mean([r[a] for r in rows]):.2f} / {np.mean([r[a] for r in tail]):.2f}" for a in ALARMS]
        last = rows[-1]
        ratio = lambda k: last[f"sample_{k}"] / max(last[f"data_{k}"], 1e-12)
        lines.append(f"| {name} | " + " | ".join(shares) + f" | {ratio('diversity'):.2f} | {ratio('motion'):.2f} |")
    return lines + [""] if found else []


__all__ = ["claims", "health_section", "paired_over_seeds", "verdict", "write_report"]
