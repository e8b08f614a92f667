"""REPORT.md for the demo: the paper's ablation and speed tables with measured numbers, the claims checked,
training curves (PNG) and sample grids (GIF/MP4)."""

from __future__ import annotations

import os

import numpy as np

from dollar_jax import storage
from dollar_jax.train.metrics import read_metrics

# The paper's numbers (arXiv 2412.15689), for context next to ours: VBench total and Vendi (Inception).
PAPER_ABLATION = {"teacher": (80.25, 2.34), "VSD": (80.08, 1.91), "VSD+CD": (80.65, 2.14), "VSD+CD+LRM": (82.57, 1.98)}
PAPER_DIFFUSION_SPEEDUP = {1: 278.6, 2: 91.94 / 2.16, 4: 91.94 / 5.88}  # % of teacher diffusion time ratios


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def _plot_curves(workdir: str, runs: dict[str, str], out_png: str, keys: list[str], title: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    drew = False
    for ax, key in zip(axes[0], keys):
        for label, run in runs.items():
            rows = [r for r in read_metrics(run) if key in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=label)
                drew = True
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if drew:
        with storage.local_file(out_png) as local:
            fig.savefig(local, dpi=110, format="png")
    plt.close(fig)
    return os.path.relpath(out_png, workdir) if drew else None


def paired(a: dict, b: dict, key: str) -> tuple[float, float]:
    """Mean over prompts of a[key] - b[key] and its standard error (same prompts and noise in both)."""
    d = np.asarray(a["per_prompt"][key]) - np.asarray(b["per_prompt"][key])
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def verdict(diff: float, se: float, at_least: bool) -> str:
    """"matches or beats" (at_least) or "raises", judged against two standard errors."""
    if at_least:
        return "reproduced" if diff > -2 * se else "NOT reproduced"
    if diff > 2 * se:
        return "reproduced"
    return "NOT reproduced" if diff < -2 * se else "inconclusive (within two standard errors)"


def claims(results: dict) -> list[tuple[str, str, str]]:
    """The paper's three orderings, checked on the measured numbers with standard errors over prompts."""
    by = lambda model, steps: next((r for r in results["quality"] if r.get("model") == model and r.get("steps") == steps), None)
    teacher = next(r for r in results["quality"] if r.get("model") == "teacher")
    out = []
    for model in ("VSD+CD+LRM", "VSD+CD"):
        s4 = by(model, 4)
        if s4:
            d, se = paired(s4, teacher, "adherence")
            out.append((f"The 4-step student ({model}) matches or beats the teacher's caption adherence",
                        verdict(d, se, True), f"{s4['adherence']['mean']:.3f} vs teacher {teacher['adherence']['mean']:.3f}"
                        f" (difference {d:+.3f} +- {se:.3f})"))
    vsd, vsdcd = by("VSD", 4), by("VSD+CD", 4)
    if vsd and vsdcd:
        d, se = paired(vsdcd, vsd, "vendi_features")
        dp, sep = paired(vsdcd, vsd, "vendi_pixels")
        out.append(("Adding CD raises diversity over VSD alone (Vendi, features)", verdict(d, se, False),
                    f"{vsdcd['vendi_features']:.3f} vs {vsd['vendi_features']:.3f} ({d:+.3f} +- {se:.3f}); on pixels "
                    f"{vsdcd['vendi_pixels']:.3f} vs {vsd['vendi_pixels']:.3f} ({dp:+.3f} +- {sep:.3f})"))
    lrm = by("VSD+CD+LRM", 4)
    if lrm and vsdcd:
        d, se = paired(lrm, vsdcd, "reward")
        out.append(("The latent reward model raises the reward", verdict(d, se, False),
                    f"{results['reward_name']}: {lrm['reward']:.3f} vs VSD+CD {vsdcd['reward']:.3f} ({d:+.3f} +- {se:.3f})"))
    return out


def write_report(workdir: str, results: dict, runs: dict[str, str], timings: dict) -> str:
    out_dir = storage.join(workdir, "report")
    storage.makedirs(out_dir)
    lines = ["# DOLLAR on the embedded world: report", "",
             "Everything below was measured in this run (`results.json` beside this file holds the raw numbers). "
             f"Prompts: {results['prompts']} x {results['samples_per_prompt']} samples with fixed noise, the same for "
             "every model. Reward: " + f"`{results['reward_name']}`.", ""]

    lines += ["## Ablation (the paper's Table: teacher / VSD / VSD+CD / VSD+CD+LRM)", "",
              "| model | NFE | colour | shape | direction | size | adherence (mean) | all four | Vendi pixels | "
              "Vendi features | reward | Frechet distance | paper VBench / Vendi |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["quality"]:
        a = r["adherence"]
        paper = PAPER_ABLATION.get(r.get("model", ""))
        paper_s = f"{paper[0]} / {paper[1]}" if paper and (r.get("steps") in (4, 50) or r.get("model") == "teacher") else ""
        lines.append(
            f"| {r['name']} | {r.get('network_evaluations', '-')} | {_fmt(a.get('colour'))} | {_fmt(a.get('shape'))} | "
            f"{_fmt(a.get('direction'))} | {_fmt(a.get('size'))} | {_fmt(a.get('mean'))} | {_fmt(a.get('all'))} | "
            f"{_fmt(r.get('vendi_pixels'))} | {_fmt(r.get('vendi_features'))} | {_fmt(r.get('reward'))} | "
            f"{_fmt(r.get('frechet_distance'), 2)} | {paper_s} |")
    lines += ["", "Adherence: the fraction of clips whose factor, read back from the pixels by the world's oracle, is "
              "the caption's. Vendi: effective number of distinct samples among the samples of one prompt (max "
              f"{results['samples_per_prompt']}), on pixels and on the evaluation encoder's features. Frechet distance:"
              " to the validation clips, on the same features (the data row: between two halves of the data).", ""]

    lines += ["## Claims of the paper, checked here", ""]
    lines += ["Differences are paired (same prompts, same noise) with their standard error over prompts.", ""]
    for claim, result, detail in claims(results):
        lines.append(f"- **{claim}: {result}** - {detail}.")
    lines.append("")

    lines += [f"## Speed ({results['device']}, median of {results['speed_repeats']} runs, compilation excluded)", "",
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
                                ["loss", "val_loss", "adherence_all"], "teacher pre-training"),
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
        lines.append(f"| {stage} | {t['seconds']:.1f} | {'reused from the work directory' if t['reused'] else ''} |")
    lines.append(f"| total | {sum(t['seconds'] for t in timings.values()):.1f} | |")
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


__all__ = ["claims", "health_section", "write_report"]
