"""End-to-end sampling time by stage (text, diffusion, decode) for a student and its 50-step teacher, in one
call of `dollar_jax.sample.generate_folder` (same prompts, same noise, same devices).

    # tiny random Wan-shaped models built here (CPU smoke numbers)
    python benchmarks/sample_stages.py --tiny --out=/tmp/sample_bench
    # real models (the GPU command in BENCHMARKS.md)
    python benchmarks/sample_stages.py --student=/runs/dollar/student --teacher=/ckpt/wan-1.3b \
        --wan=/weights/Wan2.1-T2V-1.3B-Diffusers --frames=81 --height=480 --width=832 --out=/tmp/sample_bench

Prints one table row per model and stage, and the speed-ups (diffusion only and end to end); compile time is
reported apart and counted in neither.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

PROMPTS = ["a red circle moving left", "a blue square moving right"]
TINY_WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "moving", "left", "right", "blurry"]


def build_tiny(root: str, frames: int, height: int, width: int) -> dict:
    """Tiny random umT5 / VAE / Wan teacher + a 4-step student folder (the tests' reference builders)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import wan_reference

    from dollar_jax.convert import convert
    from dollar_jax.sample import wan_latent_shape

    folders = wan_reference.save_tiny_wan_encoders(root, TINY_WORDS, [0.0] * 4, [1.0] * 4, text_dim=16)
    wan_reference.save_diffusers(wan_reference.build_wan(seed=0, text_dim=16), os.path.join(root, "torch"))
    convert(os.path.join(root, "torch"), os.path.join(root, "teacher"))
    shape = wan_latent_shape(folders["vae"], frames, height, width)
    student = wan_reference.make_student_folder(os.path.join(root, "teacher"), os.path.join(root, "student"),
                                                [999.0, 749.0, 499.0, 249.0], shape, (8, 16))
    return {**folders, "teacher": os.path.join(root, "teacher"), "student": student, "max_text_length": 8}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="build tiny random models (CPU smoke run)")
    p.add_argument("--student")
    p.add_argument("--teacher")
    p.add_argument("--wan", help="a Wan2.1 diffusers folder (text_encoder/, tokenizer/, vae/)")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--mesh", default="fsdp=-1")
    p.add_argument("--attention", default="xla", choices=("xla", "cudnn", "splash"))
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from dollar_jax.sample import generate_folder

    if args.tiny:
        models = build_tiny(tempfile.mkdtemp(prefix="sample_bench_"), args.frames, args.height, args.width)
        shape = {}
    else:
        if not (args.student and args.teacher and args.wan):
            p.error("--student, --teacher and --wan are required without --tiny")
        models = {"student": args.student, "teacher": args.teacher, "max_text_length": None,
                  **{k: os.path.join(args.wan, k) for k in ("text_encoder", "tokenizer", "vae")}}
        shape = {"frames": args.frames, "height": args.height, "width": args.width}
    report = generate_folder(models["student"], args.out, PROMPTS, steps=args.steps, seed=0,
                             text_encoder=models["text_encoder"], tokenizer=models["tokenizer"], vae=models["vae"],
                             max_text_length=models["max_text_length"], mesh=args.mesh, dtype=args.dtype, attention=args.attention,
                             torch_dtype=args.dtype, teacher=models["teacher"], **shape)
    print(f"\n{'model':<10}{'NFE':>5}{'text s':>10}{'compile s':>11}{'diffusion s':>13}{'decode s':>10}{'e2e s':>9}")
    for name, r in (("student", report), ("teacher", report["teacher"])):
        s = r["seconds"]
        print(f"{name:<10}{r['network_evaluations']:>5}{s['text']:>10.3f}{s['compile']:>11.2f}{s['diffusion']:>13.3f}"
              f"{s['decode']:>10.3f}{r['end_to_end_seconds']:>9.3f}")
    print(json.dumps({"latent_shape": report["latent_shape"], "videos": report["videos"], **report["speedup"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
