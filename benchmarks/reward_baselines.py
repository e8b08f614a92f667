"""The latent reward model against its alternatives (the paper's Table 8.5), on a demo work directory:
reward fine-tuning of one trained student by DOLLAR's LRM, the differentiable pixel path and a policy gradient
(DDPO-style), at equal steps (dollar_jax/eval/reward_baselines.py says what each method does).

    python benchmarks/reward_baselines.py --workdir=/tmp/dollar_demo --reward=sharpness --methods=lrm,pixel,pg
    python benchmarks/reward_baselines.py --workdir=/tmp/dollar_demo --reward=jpeg_compressibility --methods=lrm,pg

Per method it prints and writes (benchmarks/results/reward_baselines_<reward>.{json,md}): the true reward before,
after and its gain, caption adherence before and after, the median seconds per step (host labelling included)
and the compiled memory of the method's device programs (XLA's memory analysis, this machine's compiler).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dollar_jax.config import config_from_file  # noqa: E402
from dollar_jax.eval.reward_baselines import Setup, markdown, run_method  # noqa: E402


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/dollar_demo", help="a demo work directory (data, autoencoder, students)")
    p.add_argument("--variant", default="", help="the configs/demo.py variant that built it (e.g. quick)")
    p.add_argument("--student", default="student_vsd_cd", help="the model folder every method starts from")
    p.add_argument("--reward", default="sharpness")
    p.add_argument("--methods", default="lrm,pixel,pg")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval_prompts", type=int, default=16)
    p.add_argument("--eval_samples", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    config = config_from_file("configs/demo.py" + (f":{args.variant}" if args.variant else ""))
    setup = Setup(config, args.workdir, args.student, args.batch, args.eval_prompts, args.eval_samples)
    rows = []
    for method in args.methods.split(","):
        rows.append(run_method(method, setup, args.reward, args.steps, args.seed))
        r = rows[-1]
        print(f"{method}: reward {r['before']['reward']:.4f} -> {r['after']['reward']:.4f} ({r['reward_gain']:+.4f}), "
              f"adherence {r['before']['adherence']:.3f} -> {r['after']['adherence']:.3f}, "
              f"{r['seconds_per_step']:.3f} s/step", flush=True)
    command = "python benchmarks/reward_baselines.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(rows, command)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"reward_baselines_{args.reward}")
        with open(stem + ".json", "w") as f:
            json.dump({"command": command, "rows": rows}, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(table)
    return rows


if __name__ == "__main__":
    main()
