"""Prompts to videos from any model folder: the 50-step guided teacher or a 1/2/4-step student.

Real (Wan) models: prompts -> umT5 (torch, as tools/precompute_latents.py encoded the training captions)
-> the DiT sampler (JAX, batch sharded over the mesh's data x fsdp axes) -> the Wan VAE -> one MP4 per video
and a grid:

    python -m dollar_jax.sample --model=/runs/dollar/student --prompts=prompts.txt \\
        --text_encoder=/weights/Wan2.1-T2V-1.3B-Diffusers/text_encoder \\
        --tokenizer=/weights/Wan2.1-T2V-1.3B-Diffusers/tokenizer --vae=/weights/Wan2.1-T2V-1.3B-Diffusers/vae \\
        --steps=4 --seed=0 --out=/tmp/videos [--teacher=/ckpt/wan-1.3b]

Embedded-world models encode prompts with their own word encoder and decode with their autoencoder:

    python -m dollar_jax.sample --model=/tmp/world/student --prompts="a large red circle moving left" --out=DIR

`--prompts` is a text file (one prompt a line), a CSV (column `prompt` or `caption`) or prompts separated by
';'. A teacher is sampled with classifier-free guidance (Wan's default 5.0, uncond + w (cond - uncond)) and
the embedding of `--negative_prompt` as its unconditional text; a student is unguided. Every stage is timed
(text, compile, diffusion, decode) and printed; `--teacher=DIR` samples that teacher on the same prompts
and noise in the same call, so the end-to-end speed-up is measured on equal terms. Without a VAE
(`--text_embeddings=emb.npy`, no `--vae`) the latents are written as latents.npy.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import time

from absl import app, flags

from dollar_jax import storage
from dollar_jax.cli_errors import define_verbose_flag

_MODEL = flags.DEFINE_string("model", None, "Model folder (teacher or student).")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_PROMPTS = flags.DEFINE_string("prompts", None, "A .txt/.csv file of prompts, or prompts separated by ';'.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file with one prompt per line (same as --prompts=FILE).")
_TEXT = flags.DEFINE_string("text_embeddings", None, "[N, L, D] .npy of text embeddings instead of prompts.")
_NULL = flags.DEFINE_string("null_embedding", None, "[L, D] .npy unconditional embedding (instead of "
                            "--negative_prompt).")
_TEXT_ENCODER = flags.DEFINE_string("text_encoder", None, "Local transformers UMT5EncoderModel folder (Wan).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Local tokenizer folder (default: --text_encoder).")
_VAE = flags.DEFINE_string("vae", None, "Local diffusers AutoencoderKLWan folder (Wan) to decode with.")
_VAE_BACKEND = flags.DEFINE_enum("vae_backend", "torch", ["torch", "flax"], "Which Wan VAE decodes.")
_NEGATIVE = flags.DEFINE_string("negative_prompt", "", "The teacher's unconditional prompt (guidance).")
_MAX_TEXT = flags.DEFINE_integer("max_text_length", None, "umT5 tokens per prompt (default: the length the "
                                 "model was trained with, else Wan's 512).")
_FRAMES = flags.DEFINE_integer("frames", None, "Pixel frames (1 + 4k); with --height/--width overrides the "
                               "model folder's latent shape (needs --vae).")
_HEIGHT = flags.DEFINE_integer("height", None, "Pixel height (multiple of the VAE's factor).")
_WIDTH = flags.DEFINE_integer("width", None, "Pixel width (multiple of the VAE's factor).")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (teacher default 50; student default its largest).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Teacher CFG scale (default: 5.0 for Wan, 4.5 for the embedded "
                               "world; students are unguided).")
_CONVENTION = flags.DEFINE_enum("convention", "uncond_anchor", ["uncond_anchor", "cond_anchor"], "CFG convention.")
_NUM = flags.DEFINE_integer("num_per_prompt", 1, "Videos per prompt.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Videos per diffusion batch (0: all at once); rounded up to a "
                              "multiple of the mesh's data x fsdp size.")
_MESH = flags.DEFINE_string("mesh", "fsdp=-1", "Mesh axes, e.g. data=2,fsdp=4 (one may be -1).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "DiT compute dtype.")
_ATTENTION = flags.DEFINE_enum("attention", "xla", ["xla", "cudnn", "splash"], "DiT attention kernel (xla "
                               "materialises the scores: use cudnn on GPUs, splash on TPUs for 480p clips).")
_TORCH_DTYPE = flags.DEFINE_enum("torch_dtype", "float32", ["float32", "bfloat16"], "umT5 and torch VAE dtype.")
_TORCH_DEVICE = flags.DEFINE_string("torch_device", "auto", "Device of umT5 / the torch VAE (auto: cuda if any).")
_TEACHER = flags.DEFINE_string("teacher", None, "Also sample this teacher folder (same prompts and noise) and "
                               "report the speed-up.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_FPS = flags.DEFINE_integer("fps", None, "Frames per second of the written videos (default: Wan 16, world 8).")
_SAVE_FRAMES = flags.DEFINE_bool("save_frames", False, "Also write videos.npy: the exact uint8 frames (MP4 is lossy; "
                                  "about 100 MB per 81-frame 480p clip).")
_VERBOSE = define_verbose_flag()
flags.mark_flags_as_required(["model", "out"])

WAN_GUIDANCE, WORLD_GUIDANCE = 5.0, 4.5


# ---- inputs ----------------------------------------------------------------------------------------------


def read_prompts(value: str) -> list[str]:
    """Prompts from a .txt file (one a line), a .csv (column `prompt` or `caption`, else the first), or text
    with prompts separated by ';'."""
    if os.path.isfile(value):
        with open(value, newline="", encoding="utf-8") as f:
            if value.lower().endswith(".csv"):
                rows = list(csv.reader(f))
                if not rows:
                    raise ValueError(f"--prompts {value}: empty CSV")
                header = [h.strip().lower() for h in rows[0]]
                column = next((header.index(k) for k in ("prompt", "caption") if k in header), None)
                body = rows[1:] if column is not None else rows
                prompts = [r[column or 0].strip() for r in body if r and r[column or 0].strip()]
            else:
                prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts {value}: no prompts in the file")
        return prompts
    if os.sep in value and value.endswith((".txt", ".csv")):
        raise ValueError(f"--prompts {value}: no such file")
    prompts = [p.strip() for p in value.split(";") if p.strip()]
    if not prompts:
        raise ValueError("--prompts is empty")
    return prompts


def sampler_for(blob: dict, schedule, steps: int | None, guidance: float, convention: str):
    """(SamplerSpec, description) for a teacher or student folder's config.json."""
    from dollar_jax.eval.generate import student_sampler, teacher_spec

    if "student" in blob:  # the grid and consistency scalings the student was trained with
        spec = student_sampler(blob["student"], steps)
        return spec, f"student, {len(spec.timesteps)} step(s)"
    n = steps or 50
    return teacher_spec(schedule, n, guidance, convention), f"teacher, {n} steps, CFG {guidance} ({convention})"


def wan_latent_shape(vae_path: str, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """[F', H', W', C] the Wan VAE at `vae_path` gives for frames x height x width pixels."""
    with open(os.path.join(vae_path, "config.json")) as f:
        cfg = json.load(f)
    t = 2 ** sum(bool(d) for d in cfg.get("temperal_downsample", []))
    s = 2 ** (len(cfg["dim_mult"]) - 1) * (cfg.get("patch_size") or 1)
    if (frames - 1) % t or height % s or width % s:
        raise ValueError(f"--frames {frames} must be 1 + {t}k and --height {height} / --width {width} multiples "
                         f"of {s} for the VAE at {vae_path}")
    return 1 + (frames - 1) // t, height // s, width // s, int(cfg["z_dim"])


class Stages:
    """Wall-clock seconds of each named stage, printed as they finish."""

    def __init__(self, label: str = ""):
        self.seconds: dict[str, float] = {}
        self.label = label

    def run(self, name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        print(f"[sample{self.label}] {name}: {self.seconds[name]:.3f} s", flush=True)
        return out


# ---- the sampler -----------------------------------------------------------------------------------------


def _mesh(spec: str | None):
    from dollar_jax.parallel import make_mesh

    shape = {}
    for part in (spec or "fsdp=-1").split(","):
        axis, _, size = part.partition("=")
        try:
            shape[axis.strip()] = int(size)
        except ValueError:
            raise ValueError(f"--mesh: {part!r} is not axis=size (e.g. data=2,fsdp=4)") from None
    return make_mesh(shape)


def diffuse(model_dir: str, blob: dict, spec, text, null, latent_shape, seed: int, mesh, batch_size: int,
            stages: Stages, dtype: str = "float32", attention: str = "xla"):
    """Sample len(text) latents with the DiT of `model_dir` (batch over data x fsdp). Video i's noise depends on
    (seed, i) only; re-noising on (seed, its batch)."""
    import jax
    from flax import nnx

    from dollar_jax.checkpoint import load_dit, teacher_parameterisation
    from dollar_jax.eval.generate import make_generate

    schedule, prediction_type, _ = teacher_parameterisation(model_dir)
    with jax.set_mesh(mesh):
        model = stages.run("load model", load_dit, model_dir, mesh=mesh, dtype=dtype, attention=attention)
    if model.config.text_dim != text.shape[-1]:
        raise ValueError(f"Text embeddings are {text.shape[-1]}-wide but {model_dir} expects text_dim "
                         f"{model.config.text_dim}: wrong --text_encoder?")
    if model.config.in_channels != latent_shape[-1]:
        raise ValueError(f"Latents have {latent_shape[-1]} channels but {model_dir} takes {model.config.in_channels}")
    graphdef, params = nnx.split(model)
    generate = make_generate(lambda p: nnx.merge(graphdef, p), schedule, prediction_type, spec)
    with jax.set_mesh(mesh):  # the model's activation-sharding constraints refer to this mesh
        return _sample_batches(generate, params, text, null, latent_shape, seed, mesh, batch_size, stages)


def _sample_batches(generate, params, text, null, latent_shape, seed, mesh, batch_size, stages):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dollar_jax.data.pipeline import batch_sharding

    n = len(text)
    per_step = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = -(-(batch_size or n) // per_step) * per_step
    key = jax.random.key(seed)
    noise_of = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), latent_shape)))
    out, compiled = [], False
    for b, start in enumerate(range(0, n, batch)):
        rows = np.arange(start, start + batch)
        rows = np.where(rows < n, rows, start)  # pad the last batch with copies of its first row
        args = [noise_of(jnp.asarray(rows)), np.asarray(text[rows], np.float32),
                np.broadcast_to(null, (batch, *null.shape[-2:])).astype(np.float32)]
        args = [jax.device_put(a, batch_sharding(mesh, a.ndim)) for a in args]
        rng = jax.random.fold_in(jax.random.key(seed + 1), b)
        if not compiled:
            stages.run("compile", lambda: jax.block_until_ready(generate(params, *args, rng)))
            compiled = True
        latents = stages.run("diffusion", lambda: np.asarray(jax.block_until_ready(generate(params, *args, rng))))
        out.append(latents[: min(batch, n - start)])
    return np.concatenate(out)


def _names(prompts, num_per_prompt):
    return [re.sub(r"[^a-z0-9]+", "_", prompts[i // num_per_prompt].lower()).strip("_")[:60]
            for i in range(len(prompts) * num_per_prompt)]


def generate_folder(model_dir: str, out: str, prompts=None, text=None, null=None, steps=None, guidance=None,
                    convention="uncond_anchor", num_per_prompt=1, seed=0, fps=None, *, text_encoder=None,
                    tokenizer=None, vae=None, vae_backend="torch", negative_prompt="", max_text_length=None,
                    frames=None, height=None, width=None, mesh=None, batch_size=0, dtype="float32",
                    attention="xla", torch_dtype="float32", torch_device="auto", teacher=None,
                    save_frames=False) -> dict:
    """Sample `model_dir` (and `teacher`, for the speed-up) into `out`; returns the report written to
    out/sample.json. See the module docstring for the inputs of each kind of model."""
    # Folders first, before anything heavy is imported or loaded: a misspelled path fails in a second.
    for flag, folder in (("--model", model_dir), ("--teacher", teacher), ("--text_encoder", text_encoder),
                         ("--tokenizer", tokenizer), ("--vae", vae)):
        if folder and not os.path.isdir(folder):
            raise ValueError(f"{flag} {folder}: no such folder (weights are only read from local folders)")
    import numpy as np

    from dollar_jax.checkpoint import read_model_folder_config, teacher_parameterisation
    from dollar_jax.eval import video_io

    stages = Stages()
    _, blob = read_model_folder_config(model_dir, "dit")
    world = "world" in blob
    guided = "student" not in blob or (teacher is not None)
    latents_section = blob.get("latents", {})
    fps = fps or (8 if world else 16)  # the world's clips are short; Wan renders at 16 fps

    # Text.
    if prompts is not None and world:
        from dollar_jax.data.text import WordEncoder

        t = blob["text"]
        encoder = WordEncoder(t["max_length"], t["dim"], t["seed"])
        text = stages.run("text", lambda: encoder.encode(prompts))
        null = encoder.null()
    elif prompts is not None:
        if not text_encoder:
            raise ValueError("Prompts for a Wan model need --text_encoder (and --tokenizer): the umT5 folder the "
                             "training captions were encoded with; or pass --text_embeddings")
        from dollar_jax.data.real_videos import WanEncoders

        length = max_text_length or (latents_section.get("text_shape") or [512])[0]
        encoders = stages.run("load text encoder", WanEncoders, None, text_encoder, tokenizer, dtype=torch_dtype,
                              device=torch_device, max_text_length=length)
        text = stages.run("text", encoders.encode_text, prompts)
        if null is None and guided:
            null = encoders.encode_text([negative_prompt])[0]
        del encoders
    if text is None:
        raise ValueError("Give --prompts (with --text_encoder for Wan models) or --text_embeddings")
    text = np.repeat(np.asarray(text, np.float32), num_per_prompt, axis=0)
    if text.ndim != 3:
        raise ValueError(f"Text embeddings must be [N, L, D], got {text.shape}")
    if null is None and guided:
        raise ValueError("Teacher sampling with guidance needs --negative_prompt (with --text_encoder) or "
                         "--null_embedding")
    null = np.zeros(text.shape[1:], np.float32) if null is None else np.asarray(null, np.float32).reshape(text.shape[1:])

    # Latent shape: the folder's (what it was trained on) unless pixel sizes are given.
    if frames or height or width:
        if not (frames and height and width and vae):
            raise ValueError("--frames, --height and --width go together, with --vae (to know its factors)")
        latent_shape = wan_latent_shape(vae, frames, height, width)
    elif "shape" in latents_section:
        latent_shape = tuple(latents_section["shape"])
    else:
        raise ValueError(f"{model_dir} does not record its latent shape (a converted teacher): pass --frames, "
                         f"--height and --width with --vae")

    decode = None
    if world:
        from dollar_jax.checkpoint import load_autoencoder
        from dollar_jax.eval import world_eval

        ae = load_autoencoder(blob["world"]["autoencoder"])
        decode = lambda z: world_eval.decode(ae, z)  # noqa: E731
    elif vae:
        from dollar_jax.rewards.decoders import wan_vae_decoder

        decode = stages.run("load vae", wan_vae_decoder, vae, device=torch_device, backend=vae_backend,
                            dtype=torch_dtype)

    mesh_ = _mesh(mesh)
    os.makedirs(out, exist_ok=True)
    names = _names(prompts, num_per_prompt) if prompts is not None else [f"video{i}" for i in range(len(text))]

    def one(folder_dir, folder_blob, sub_out, label):
        schedule, _, diffusion = teacher_parameterisation(folder_dir)
        default = WAN_GUIDANCE if diffusion["schedule"] == "flow" else WORLD_GUIDANCE
        spec, what = sampler_for(folder_blob, schedule, steps if folder_dir == model_dir else None,
                                 guidance if guidance is not None else default, convention)
        st = Stages(label)
        st.seconds.update({k: v for k, v in stages.seconds.items() if k == "text"})
        latents = diffuse(folder_dir, folder_blob, spec, text, null, latent_shape, seed, mesh_, batch_size, st, dtype,
                          attention)
        files = []
        if decode is not None:
            videos = st.run("decode", decode, latents)
            for i, v in enumerate(videos):
                files += ([video_io.write_mp4(os.path.join(sub_out, f"{i:03d}_{names[i]}.mp4"), v, fps)] if not world
                          else video_io.write_video(os.path.join(sub_out, f"{i:03d}_{names[i]}"), v, fps))
            grid = video_io.grid(videos, upscale=2 if world else 1)
            files.append(video_io.write_gif(os.path.join(sub_out, "grid.gif"), grid, fps) if world
                         else video_io.write_mp4(os.path.join(sub_out, "grid.mp4"), grid, fps))
            if save_frames and not world:  # the exact frames, for checks that MP4 compression would blur
                np.save(os.path.join(sub_out, "videos.npy"), videos)
                files.append(os.path.join(sub_out, "videos.npy"))
        os.makedirs(sub_out, exist_ok=True)
        np.save(os.path.join(sub_out, "latents.npy"), latents)
        files.append(os.path.join(sub_out, "latents.npy"))
        seconds = {k: round(v, 4) for k, v in st.seconds.items()}
        end_to_end = sum(seconds.get(k, 0.0) for k in ("text", "diffusion", "decode"))
        return {"model": folder_dir, "sampler": what, "network_evaluations": spec.network_evaluations,
                "seconds": seconds, "diffusion_seconds": seconds["diffusion"], "end_to_end_seconds": end_to_end,
                "videos": len(latents), "latent_shape": list(latent_shape), "files": files}

    report = one(model_dir, blob, out, "")
    if teacher:
        _, teacher_blob = read_model_folder_config(teacher, "dit")
        if "student" in teacher_blob:
            raise ValueError(f"--teacher {teacher} is a student folder")
        report["teacher"] = one(teacher, teacher_blob, os.path.join(out, "teacher"), " teacher")
        t, s = report["teacher"], report
        report["speedup"] = {"diffusion": t["diffusion_seconds"] / s["diffusion_seconds"],
                             "end_to_end": t["end_to_end_seconds"] / s["end_to_end_seconds"]}
        print(f"[sample] speed-up over the teacher: diffusion {report['speedup']['diffusion']:.1f}x, "
              f"end to end (text + diffusion + decode) {report['speedup']['end_to_end']:.1f}x", flush=True)
    with open(os.path.join(out, "sample.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import numpy as np

    prompts = None
    if _PROMPTS.value:
        prompts = read_prompts(_PROMPTS.value)
    elif _PROMPTS_FILE.value:
        prompts = read_prompts(_PROMPTS_FILE.value)
    for flag in (_TEXT, _NULL):
        if flag.value and not os.path.isfile(flag.value):
            raise ValueError(f"--{flag.name} {flag.value}: no such file")
    text = np.load(_TEXT.value) if _TEXT.value else None
    null = np.load(_NULL.value) if _NULL.value else None
    report = generate_folder(
        _MODEL.value, _OUT.value, prompts, text, null, _STEPS.value, _GUIDANCE.value, _CONVENTION.value,
        _NUM.value, _SEED.value, _FPS.value, text_encoder=_TEXT_ENCODER.value, tokenizer=_TOKENIZER.value,
        vae=_VAE.value, vae_backend=_VAE_BACKEND.value, negative_prompt=_NEGATIVE.value,
        max_text_length=_MAX_TEXT.value, frames=_FRAMES.value, height=_HEIGHT.value, width=_WIDTH.value,
        mesh=_MESH.value, batch_size=_BATCH.value, dtype=_DTYPE.value, attention=_ATTENTION.value,
        torch_dtype=_TORCH_DTYPE.value, save_frames=_SAVE_FRAMES.value,
        torch_device=_TORCH_DEVICE.value, teacher=_TEACHER.value)
    summary = {k: v for k, v in report.items() if k not in ("files", "teacher")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    from dollar_jax.cli_errors import run_absl
    from dollar_jax.host_allocator import reexec_with_huge_pages

    reexec_with_huge_pages()  # XLA:CPU's per-step buffers on huge pages (host_allocator.py says why)

    sys.exit(run_absl(main))
