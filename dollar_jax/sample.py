"""Generate videos from any model folder: the 50-step guided teacher or a 1/2/4-step student.

    python -m dollar_jax.sample --model=/tmp/world/student --prompts="a large red circle moving left" --steps=4 --out=/tmp/videos
    python -m dollar_jax.sample --model=/tmp/world/teacher --prompts_file=prompts.txt --steps=50 --guidance=4.5 --out=/tmp/videos
    python -m dollar_jax.sample --model=/ckpt/student --text_embeddings=emb.npy --null_embedding=null.npy --out=/tmp/latents

Embedded-world models encode the prompts themselves and decode with their autoencoder (GIF + MP4 per
prompt, and a grid). Models of real videos take precomputed text embeddings ([N, L, D] .npy, e.g. umT5
from tools/precompute_latents.py) and write latents (.npy) for the Wan VAE to decode.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

from absl import app, flags

from dollar_jax import storage

_MODEL = flags.DEFINE_string("model", None, "Model folder (teacher or student).")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_PROMPTS = flags.DEFINE_string("prompts", None, "Prompts separated by ';' (embedded-world models).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
_TEXT = flags.DEFINE_string("text_embeddings", None, "[N, L, D] .npy of text embeddings (real-video models).")
_NULL = flags.DEFINE_string("null_embedding", None, "[L, D] .npy unconditional embedding (for guidance).")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (teacher default 50; student default its largest).")
_GUIDANCE = flags.DEFINE_float("guidance", 4.5, "Teacher CFG scale (students are unguided).")
_CONVENTION = flags.DEFINE_enum("convention", "uncond_anchor", ["uncond_anchor", "cond_anchor"], "CFG convention.")
_NUM = flags.DEFINE_integer("num_per_prompt", 1, "Videos per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_FPS = flags.DEFINE_integer("fps", 8, "Frames per second of the written videos.")
flags.mark_flags_as_required(["model", "out"])


def sampler_for(blob: dict, schedule, steps: int | None, guidance: float, convention: str):
    """(SamplerSpec, description) for a teacher or student folder's config.json."""
    from dollar_jax.eval.generate import student_spec, teacher_spec

    if "student" in blob:
        trained = [float(t) for t in blob["student"]["timesteps"]]
        n = steps or len(trained)
        if n > len(trained) or len(trained) % n:
            raise ValueError(f"This student was trained on {trained}; it samples in a divisor of "
                             f"{len(trained)} steps, not {n}")
        return student_spec(trained[:: len(trained) // n]), f"student, {n} step(s)"
    n = steps or 50
    return teacher_spec(schedule, n, guidance, convention), f"teacher, {n} steps, CFG {guidance} ({convention})"


def generate_folder(model_dir: str, out: str, prompts=None, text=None, null=None, steps=None, guidance=4.5,
                    convention="uncond_anchor", num_per_prompt=1, seed=0, fps=8) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dollar_jax.checkpoint import load_dit, read_model_folder_config, teacher_parameterisation
    from dollar_jax.eval import video_io
    from dollar_jax.eval.generate import make_generate

    _, blob = read_model_folder_config(model_dir, "dit")
    schedule, prediction_type, _ = teacher_parameterisation(model_dir)
    spec, what = sampler_for(blob, schedule, steps, guidance, convention)
    model = load_dit(model_dir)
    graphdef, params = nnx.split(model)
    world = "world" in blob
    if prompts is not None:
        if not world:
            raise ValueError("This model was not trained in the embedded world: pass --text_embeddings instead")
        from dollar_jax.data.text import WordEncoder

        t = blob["text"]
        encoder = WordEncoder(t["max_length"], t["dim"], t["seed"])
        text, null = encoder.encode(prompts), encoder.null()
    if text is None:
        raise ValueError("Give prompts (embedded world) or text embeddings")
    text = np.repeat(np.asarray(text, np.float32), num_per_prompt, axis=0)
    if null is None and spec.guidance_scale is not None:
        raise ValueError("Teacher sampling with guidance needs --null_embedding")
    null = np.broadcast_to(np.zeros(text.shape[1:], np.float32) if null is None else null, text.shape)
    shape = tuple(blob["latents"]["shape"])
    noise = jax.random.normal(jax.random.key(seed), (len(text), *shape))
    generate = make_generate(lambda p: nnx.merge(graphdef, p), schedule, prediction_type, spec)
    args = (params, noise, jnp.asarray(text), jnp.asarray(null), jax.random.key(seed + 1))
    jax.block_until_ready(generate(*args))  # compile
    t0 = time.perf_counter()
    latents = np.asarray(jax.block_until_ready(generate(*args)))
    seconds = time.perf_counter() - t0
    storage.makedirs(out)  # a local folder, or gs://bucket/... as is
    files = []
    if world:
        from dollar_jax.eval import world_eval
        from dollar_jax.checkpoint import load_autoencoder

        videos = world_eval.decode(load_autoencoder(blob["world"]["autoencoder"]), latents)
        for i, v in enumerate(videos):
            name = re.sub(r"[^a-z0-9]+", "_", (prompts[i // num_per_prompt]).lower()).strip("_")
            files += video_io.write_video(os.path.join(out, f"{i:03d}_{name}"), v, fps)
        files.append(video_io.write_gif(os.path.join(out, "grid.gif"), video_io.grid(videos, upscale=2), fps))
    else:
        files.append(os.path.join(out, "latents.npy"))
        with storage.local_file(files[-1]) as local:
            np.save(local, latents)
    report = {"model": model_dir, "sampler": what, "network_evaluations": spec.network_evaluations,
              "diffusion_seconds": seconds, "videos": len(latents), "files": files}
    storage.write_json(os.path.join(out, "sample.json"), report, indent=2)
    return report


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import numpy as np

    prompts = None
    if _PROMPTS.value:
        prompts = [p.strip() for p in _PROMPTS.value.split(";") if p.strip()]
    elif _PROMPTS_FILE.value:
        with open(_PROMPTS_FILE.value) as f:
            prompts = [line.strip() for line in f if line.strip()]
    text = np.load(_TEXT.value) if _TEXT.value else None
    null = np.load(_NULL.value) if _NULL.value else None
    report = generate_folder(_MODEL.value, _OUT.value, prompts, text, null, _STEPS.value, _GUIDANCE.value,
                             _CONVENTION.value, _NUM.value, _SEED.value, _FPS.value)
    print(json.dumps({k: v for k, v in report.items() if k != "files"}))


if __name__ == "__main__":
    sys.exit(app.run(main))
