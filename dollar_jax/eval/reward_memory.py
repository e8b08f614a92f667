"""Memory of one reward fine-tuning generator step: through the latent reward model vs through pixels.

    python benchmarks/reward_memory.py                          # XLA:CPU, 8..128 frames at 480x832
    python benchmarks/reward_memory.py --topology v5p:2x2x1     # XLA:TPU, compile only (needs libtpu)
    python benchmarks/reward_memory.py --frames 8 --height 32 --width 32 --tiny --run_max_gib 4

(`configs/demo.py:paper` runs the same rows for its REPORT.md: jobs/demo.py, stage "reward memory".)

The paper (DOLLAR, arXiv 2412.15689) argues for its latent reward model (LRM) from memory: backpropagating a
pixel reward through the VAE decoder needs > 90 GB at 128 frames, the LRM megabytes. This benchmark compiles
both generator steps ahead of time (`jax.jit(step).lower(...).compile()`) and reports the compiler's memory
analysis: arguments, outputs, temporaries, and peak = arguments + temporaries + outputs - aliased.

The step is the gradient, w.r.t. the student's parameters, of -reward(student(noise)):
- student: a tiny stand-in (per-frame 3x3 conv 16 -> 64, SiLU, 3x3 conv 64 -> 16, residual; 18,512
  parameters), so that the reward path's memory is what is measured; a real DiT adds the same activations to
  both paths;
- LRM path: the paper's image LRM on the student's latents (`reward.lrm_kind=paper_image`, 189,441 parameters;
  the loss is the trainer's own `reward_finetune_loss`);
- pixel path: un-normalise, decode with Wan2.1's VAE decoder (dollar_jax/models/wan_vae.py at its real sizes,
  about 73 M parameters, random weights, lax.scan over latent frames as in the repo's decode), resize every
  frame to 224 x 224 and score it with a ViT-B/16 (12 layers, width 768, 86 M parameters, random weights), mean
  over frames; nothing rematerialised (the plain baseline the paper measures).
The LRM, VAE and ViT are frozen: their parameters are arguments (resident), never differentiated.

Frames: `--frames F` gives 1 + F // 4 latent frames, which Wan's decoder turns into F + 1 video frames (the VAE
decodes 1 + 4k frames; 128 -> 33 latent frames -> 129 frames). Batch 1. Each (path, frames) row is compiled
in a child process (`--timeout` seconds, then recorded as not measured with its command); rows whose compiled
peak is under `--run_max_gib` are also run (`--iters` timed steps after one warm-up) on the CPU.
Writes `<out>.json`, `<out>.md` (the table) and `<out>.png` (log-scale peak memory vs frames).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from dollar_jax.losses.reward import reward_finetune_loss
from dollar_jax.models.layers import Conv, Dense, LayerNorm, abstract
from dollar_jax.models.reward_models import LRMConfig, make_lrm
from dollar_jax.models.wan_vae import Decoder, WanVAE, WanVAEConfig, _conv
from dollar_jax.train.planner import GIB, memory_summary, topology_devices

PATHS = ("lrm", "pixel")
# XLA:CPU without LLVM's expensive passes: 3x faster to compile at tiny sizes, but fusion (and so memory) differs
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
BASELINE = "student"  # the student alone (reward = mean of its latents): what both paths share
FRAMES = (8, 16, 32, 64, 128)
PAPER_PIXEL_GB_AT_128 = 90  # "> 90 GB" for the pixel path at 128 frames (the paper's memory argument)


# ---- the networks ----------------------------------------------------------------------------------------


class StudentStandIn(nnx.Module):
    """A tiny generator on latents [B, F, h, w, C]: x + conv(silu(conv(x))) per frame."""

    def __init__(self, channels: int = 16, width: int = 64, *, rngs: nnx.Rngs):
        self.conv1 = Conv(channels, width, (3, 3), rngs=rngs)
        self.conv2 = Conv(width, channels, (3, 3), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, f = x.shape[:2]
        h = x.reshape(b * f, *x.shape[2:])
        return x + self.conv2(jax.nn.silu(self.conv1(h))).reshape(x.shape)


class WanDecoder(nnx.Module):
    """The decoding half of WanVAE (post-quant conv + decoder) with WanVAE's own decode/denormalize."""

    def __init__(self, config: WanVAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        numerics = {"dtype": jnp.dtype(config.dtype), "param_dtype": jnp.dtype(config.param_dtype)}
        self.post_quant_conv = _conv(config.z_dim, config.z_dim, (1, 1, 1), rngs, numerics)
        self.decoder = Decoder(config, rngs=rngs, numerics=numerics)

    decode = WanVAE.decode
    denormalize = WanVAE.denormalize
    _stats = WanVAE._stats


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image: int = 224
    patch: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp: int = 3072
    dtype: str = "float32"


class ViTBlock(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        d, dt = cfg.dim, jnp.dtype(cfg.dtype)
        kw = {"rngs": rngs, "dtype": dt, "param_dtype": dt}
        self.heads = cfg.heads
        self.norm1, self.norm2 = LayerNorm(d, 1e-6, rngs=rngs), LayerNorm(d, 1e-6, rngs=rngs)
        self.qkv = Dense(d, 3 * d, (None, None), **kw)
        self.proj = Dense(d, d, (None, None), **kw)
        self.fc1 = Dense(d, cfg.mlp, (None, None), **kw)
        self.fc2 = Dense(cfg.mlp, d, (None, None), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, d = x.shape
        q, k, v = jnp.split(self.qkv(self.norm1(x).astype(x.dtype)).reshape(n, t, self.heads, 3 * d // self.heads),
                            3, axis=-1)
        x = x + self.proj(jax.nn.dot_product_attention(q, k, v).reshape(n, t, d))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x).astype(x.dtype))))


class ViTReward(nnx.Module):
    """A per-frame ViT image reward (ViT-B/16 at its defaults): video [B, T, H, W, 3] -> mean frame score [B]."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        self.cfg = cfg
        self.patch_embed = Conv(3, cfg.dim, (cfg.patch, cfg.patch), strides=(cfg.patch, cfg.patch), padding="VALID",
                                rngs=rngs, dtype=dt, param_dtype=dt)
        tokens = (cfg.image // cfg.patch) ** 2 + 1
        init = jax.nn.initializers.normal(0.02)
        self.cls = nnx.Param(init(rngs.params(), (1, 1, cfg.dim), dt))
        self.pos = nnx.Param(init(rngs.params(), (1, tokens, cfg.dim), dt))
        self.blocks = nnx.List([ViTBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = LayerNorm(cfg.dim, 1e-6, rngs=rngs)
        self.head = Dense(cfg.dim, 1, (None, None), rngs=rngs)

    def __call__(self, video: jax.Array) -> jax.Array:
        b, t = video.shape[:2]
        dt, s = jnp.dtype(self.cfg.dtype), self.cfg.image
        frames = jax.image.resize(video.reshape(b * t, *video.shape[2:]), (b * t, s, s, 3), "bilinear")
        x = self.patch_embed(frames.astype(dt))
        x = x.reshape(b * t, -1, x.shape[-1])
        x = jnp.concatenate([jnp.broadcast_to(self.cls[...], (b * t, 1, x.shape[-1])), x], axis=1) + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))[:, 0].reshape(b, t).mean(axis=1)


def parameter_count(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


# ---- the two generator steps -----------------------------------------------------------------------------


def sizes(tiny: bool, dtype: str):
    """(VAE config, ViT config, LRM config) at Wan2.1 / ViT-B/16 / paper sizes, or tiny ones for tests (whose
    decoder upsamples 2x, not 8x / 4x: the latents are then height / 2 x width / 2)."""
    if tiny:
        # two levels (2x up in space and time) instead of four: a few seconds to compile
        vae = WanVAEConfig(base_dim=8, dim_mult=(1, 2), temperal_downsample=(True,), num_res_blocks=1, dtype=dtype,
                           param_dtype=dtype)
        vit = ViTConfig(image=32, patch=8, dim=32, depth=1, heads=2, mlp=64, dtype=dtype)
    else:
        vae = WanVAEConfig(dtype=dtype, param_dtype=dtype)
        vit = ViTConfig(dtype=dtype)
    return vae, vit, LRMConfig(kind="paper_image", latent_channels=vae.z_dim, width=128, first_stride=4)


def latent_frames(frames: int) -> int:
    return 1 + frames // 4


def decoded_frames(frames: int, tiny: bool = False) -> int:
    return sizes(tiny, "float32")[0].num_frames(latent_frames(frames))


def build(path: str, frames: int, height: int, width: int, *, tiny: bool = False, dtype: str = "float32",
          device=None):
    """(step, abstract args, makers): step(student, frozen, noise) -> (loss, grads w.r.t. student); the args are
    ShapeDtypeStructs (on `device` when given); makers() builds concrete (student, frozen) for running."""
    vae_cfg, vit_cfg, lrm_cfg = sizes(tiny, dtype)
    make_student = lambda: StudentStandIn(vae_cfg.z_dim, 16 if tiny else 64, rngs=nnx.Rngs(0))
    if path == BASELINE:
        make_frozen = lambda: nnx.List([])
    elif path == "lrm":
        make_frozen = lambda: make_lrm(lrm_cfg, rngs=nnx.Rngs(1))
    elif path == "pixel":
        make_frozen = lambda: nnx.List([WanDecoder(vae_cfg, rngs=nnx.Rngs(1)), ViTReward(vit_cfg, rngs=nnx.Rngs(2))])
    else:
        raise ValueError(f"path must be one of {PATHS + (BASELINE,)}, got {path!r}")
    student_graph, student = nnx.split(abstract(make_student))
    frozen_graph, frozen = nnx.split(abstract(make_frozen))
    student, frozen = nnx.to_pure_dict(student), nnx.to_pure_dict(frozen)

    def reward(frozen_params, x0):
        net = nnx.merge(frozen_graph, frozen_params)
        if path == BASELINE:
            return jnp.mean(x0)
        if path == "lrm":
            return -reward_finetune_loss(net, x0, None)
        decoder, vit = net
        return jnp.mean(vit(decoder.decode(decoder.denormalize(x0))))

    def step(student_params, frozen_params, noise):
        loss = lambda p: -reward(frozen_params, nnx.merge(student_graph, p)(noise))
        return jax.value_and_grad(loss)(student_params)

    f = vae_cfg.spatial_factor
    noise = jax.ShapeDtypeStruct((1, latent_frames(frames), height // f, width // f, vae_cfg.z_dim), jnp.float32)
    args = (student, frozen, noise)
    if device is not None:
        sharding = jax.sharding.SingleDeviceSharding(device)
        args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)

    def makers():
        init = lambda: (nnx.to_pure_dict(nnx.split(make_student())[1]), nnx.to_pure_dict(nnx.split(make_frozen())[1]))
        return jax.jit(init)()

    return step, args, makers


def measure(path: str, frames: int, height: int, width: int, *, tiny: bool = False, dtype: str = "float32",
            topology: str | None = None, run_max_gib: float = 0.0, iters: int = 1,
            compiler_options: dict | None = None) -> dict:
    """Compile one row and read its memory analysis; run it too when its peak is under run_max_gib.
    `compiler_options` (tests: FAST_COMPILE) change the compiler's choices, so the benchmark passes none."""
    device = topology_devices(topology)[0] if topology else None
    step, args, makers = build(path, frames, height, width, tiny=tiny, dtype=dtype, device=device)
    jitted = jax.jit(step)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile(compiler_options)
    row = {"path": path, "frames": frames, "latent_frames": latent_frames(frames),
           "decoded_frames": decoded_frames(frames, tiny), "compile_s": round(time.perf_counter() - t0, 1),
           "compiler": compiler_name(topology), "tiny": tiny,
           "student_params": parameter_count(args[0]), "frozen_params": parameter_count(args[1]),
           **memory_summary(compiled.memory_analysis())}
    if not topology and row["peak_bytes"] / GIB <= run_max_gib:
        student, frozen = makers()
        noise = jax.random.normal(jax.random.key(0), args[2].shape, args[2].dtype)
        jax.block_until_ready(compiled(student, frozen, noise))
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(student, frozen, noise))
            times.append(time.perf_counter() - t0)
        row["step_s"] = round(sum(times) / len(times), 3)
    return row


# ---- the table, the plot, the driver ----------------------------------------------------------------------


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}" if unit == "GiB" else f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


# XLA:TPU's refusal of a program that cannot fit, with its own figures (binary units: XLA prints "283.27G" for GiB).
_REFUSAL = re.compile(r"RESOURCE_EXHAUSTED.*?HLO temporaries \(([\d.]+)([KMGT])\) "
                      r"exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNIT = {"K": 2.0**10, "M": 2.0**20, "G": 2.0**30, "T": 2.0**40}


def _refused_figures(row: dict) -> tuple[str, str, str, str] | None:
    """(temporaries, unit, HBM, unit) as the compiler printed them when it refused the row's program for memory.
    Only this wording is read (libtpu 0.0.42's): any other failure, out-of-memory ones included, stays an error
    row, "not measured"."""
    match = _REFUSAL.search(row.get("error", ""))
    return match.groups() if match else None


def refusal(row: dict) -> tuple[float, float] | None:
    """(temporaries, HBM) in bytes when the compiler refused the row's program for memory, from its own message;
    the temporaries are then XLA's figure for what the step needs beyond its arguments, a lower bound of its peak."""
    figures = _refused_figures(row)
    if figures is None:
        return None
    temp, temp_unit, hbm, hbm_unit = figures
    return float(temp) * _UNIT[temp_unit], float(hbm) * _UNIT[hbm_unit]


def markdown(rows: list[dict]) -> str:
    """The table; "over the student" is the peak minus the student-alone row's (same compiler and frames)."""
    alone = {(r["compiler"], r["frames"]): r["peak_bytes"] for r in rows if r["path"] == BASELINE and "peak_bytes" in r}
    lines = ["| compiler | path | frames (latent -> decoded) | arguments | outputs | temporaries | peak "
             "| over the student | compile s | step s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        frames = f"{r['frames']} ({r['latent_frames']} -> {r['decoded_frames']})"
        figures = _refused_figures(r)
        if figures:  # shown as the compiler printed them (its precision: "1.06T" is 1.06 TiB, give or take 0.005)
            temp, hbm = (f"{value} {unit}iB" for value, unit in (figures[:2], figures[2:]))
            lines.append(f"| {r['compiler']} | {r['path']} | {frames} | refused: more than the chip's {hbm} of HBM | "
                         f"| {temp} | **> {temp}** | | | not run |")
            continue
        if "error" in r:
            lines.append(f"| {r['compiler']} | {r['path']} | {frames} | not measured: {r['error']} | | | | | | |")
            continue
        step = f"{r['step_s']:.3f}" if "step_s" in r else "not run"
        base = alone.get((r["compiler"], r["frames"]))
        over = _size(r["peak_bytes"] - base) if base is not None and r["path"] != BASELINE else ""
        lines.append(f"| {r['compiler']} | {r['path']} | {frames} | {_size(r['argument_bytes'])} | "
                     f"{_size(r['output_bytes'])} | {_size(r['temp_bytes'])} | **{_size(r['peak_bytes'])}** | "
                     f"{over} | {r['compile_s']} | {step} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, share) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {BASELINE: ("tab:gray", "^", "student alone"), "lrm": ("tab:blue", "o", "LRM path"),
              "pixel": ("tab:red", "s", "pixel path (Wan VAE + ViT-B/16)")}
    alone = {(r["compiler"], r["frames"]): r["peak_bytes"] for r in rows if r["path"] == BASELINE and "peak_bytes" in r}
    for compiler in dict.fromkeys(r["compiler"] for r in rows):
        dashed = "TPU" in compiler
        for path, (color, marker, label) in styles.items():
            done = [r for r in rows if r["compiler"] == compiler and r["path"] == path and "peak_bytes" in r]
            style = dict(color=color, marker=marker, linestyle="--" if dashed else "-", label=f"{label}, {compiler}")
            if done:
                x, y = zip(*sorted((r["frames"], r["peak_bytes"] / GIB) for r in done))
                ax.plot(x, y, **style)
            refused = [(r["frames"], needed[0] / GIB) for r in rows
                       if r["compiler"] == compiler and r["path"] == path and (needed := refusal(r))]
            if refused:  # hollow: the compiler's temporaries when it refused the program, a lower bound of the peak
                ax.scatter(*zip(*refused), marker=marker, facecolors="none", edgecolors=color, s=90, zorder=4,
                           linewidths=1.5, label=f"{label}, {compiler}: refused, temporaries alone")
            over = sorted((r["frames"], (r["peak_bytes"] - alone[compiler, r["frames"]]) / GIB) for r in done
                          if path != BASELINE and (compiler, r["frames"]) in alone)
            if over:
                share.plot(*zip(*over), **style)
    ax.scatter([128], [PAPER_PIXEL_GB_AT_128 * 1e9 / GIB], marker="*", s=160, color="black", zorder=5,
               label="paper: pixel path > 90 GB at 128 frames")
    ax.axhline(80e9 / GIB, color="gray", linewidth=0.8, linestyle=":")
    ax.text(8, 80e9 / GIB * 1.15, "80 GB (one H100)", color="gray", fontsize=8)
    ax.set_title("One reward fine-tuning generator step: compiled peak")
    ax.set_ylabel("peak memory per step (GiB)")
    share.set_title("The reward path's own share: peak minus the student alone")
    share.set_ylabel("GiB over the student alone")
    for a in (ax, share):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xticks(FRAMES, [str(f) for f in FRAMES])
        a.set_xlabel("video frames (480 x 832, batch 1)")
        a.grid(True, which="both", alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _child_command(path: str, frames: int, height: int, width: int, dtype: str, topology: str | None, tiny: bool,
                   run_max_gib: float, iters: int) -> list[str]:
    cmd = [sys.executable, "-m", "dollar_jax.eval.reward_memory", "--single", path,
           "--frames", str(frames), "--height", str(height), "--width", str(width), "--dtype", dtype,
           "--run_max_gib", str(run_max_gib), "--iters", str(iters)]
    if topology:
        cmd += ["--topology", topology]
    if tiny:
        cmd.append("--tiny")
    return cmd


def compiler_name(topology: str | None) -> str:
    """The compiler a row's figures come from: this process's backend, or XLA:TPU for a topology."""
    return f"XLA:TPU ({topology}, 1 chip)" if topology else f"XLA:{jax.default_backend().upper()}"


def measure_rows(paths, frames, *, height: int = 480, width: int = 832, dtype: str = "float32",
                 topology: str | None = None, tiny: bool = False, run_max_gib: float = 8.0, iters: int = 2,
                 timeout: float = 600.0) -> list[dict]:
    """Every (frames, path) row, each compiled (and maybe run) in a child process of its own, so that one row's
    compile cannot take the others' memory with it and a row over `timeout` seconds is recorded as not measured,
    with the command that would measure it. The children run on JAX's CPU backend whatever this process uses: the
    rows are XLA:CPU's (XLA:TPU's for a topology, compiled from the CPU backend too), as their compiler column says,
    and a child never waits for an accelerator its parent holds."""
    # The children import this package from the repository, installed or not (the benchmark script's own path).
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    rows = []
    for f in frames:
        for path in paths:
            cmd = _child_command(path, f, height, width, dtype, topology, tiny, run_max_gib, iters)
            t0 = time.perf_counter()
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
                if done.returncode:
                    tail = (done.stderr.strip().splitlines() or ["exit code %d" % done.returncode])[-1]
                    row = {"path": path, "frames": f, "error": tail[:200]}
                else:
                    try:
                        row = json.loads((done.stdout.strip().splitlines() or [""])[-1])
                    except json.JSONDecodeError:
                        row = {"path": path, "frames": f, "error": "the child printed no row"}
            except subprocess.TimeoutExpired:
                row = {"path": path, "frames": f, "error": f"over {timeout:.0f} s"}
            row.setdefault("latent_frames", latent_frames(f))
            row.setdefault("decoded_frames", decoded_frames(f, tiny))
            row.setdefault("compiler", compiler_name(topology) if topology else "XLA:CPU")  # a row that failed
            row.update(dtype=dtype, height=height, width=width, tiny=tiny, wall_s=round(time.perf_counter() - t0, 1))
            if "error" in row:
                row["command"] = " ".join(cmd[1:])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def write(rows: list[dict], out: str, height: int, width: int) -> str:
    """<out>.json (rows and the machine), <out>.md (the table) and <out>.png (the curve), local or on a store;
    returns the table."""
    from dollar_jax import storage

    meta = {"benchmark": "reward_memory", "date": datetime.date.today().isoformat(), "host": platform.node(),
            "cpus": os.cpu_count(), "jax": jax.__version__, "height": height, "width": width}
    table = markdown(rows)
    storage.write_text(out + ".md", table + "\n")
    with storage.local_file(out + ".png") as local:
        plot(rows, local)
    storage.write_json(out + ".json", {**meta, "rows": rows}, indent=1)  # last: its presence means all three exist
    return table


def main(argv=None, default_out: str | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", default=",".join(map(str, FRAMES)), help="video frames, comma-separated")
    p.add_argument("--paths", default=",".join(PATHS), help=f"of {PATHS} and {BASELINE!r} (the student alone)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute and storage of the frozen VAE decoder and ViT (the LRM computes in float32)")
    p.add_argument("--topology", default=None, help="compile with XLA:TPU for this topology's first chip")
    p.add_argument("--tiny", action="store_true", help="tiny VAE decoder and ViT (tests)")
    p.add_argument("--run_max_gib", type=float, default=8.0, help="run rows whose compiled peak is at most this")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per row (compile + run)")
    p.add_argument("--out", default=default_out, help="<out>.json, .md and .png")
    p.add_argument("--append", action="store_true", help="keep the other rows already in <out>.json")
    p.add_argument("--single", choices=PATHS + (BASELINE,), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.single:  # child process: one row, as JSON on the last line of stdout
        row = measure(args.single, int(args.frames), args.height, args.width, tiny=args.tiny, dtype=args.dtype,
                      topology=args.topology, run_max_gib=args.run_max_gib, iters=args.iters)
        print(json.dumps(row))
        return
    if not args.out:
        p.error("--out is required")
    rows = measure_rows(args.paths.split(","), [int(f) for f in args.frames.split(",")], height=args.height,
                        width=args.width, dtype=args.dtype, topology=args.topology, tiny=args.tiny,
                        run_max_gib=args.run_max_gib, iters=args.iters, timeout=args.timeout)
    if args.append and os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            new = {(r["compiler"], r["path"], r["frames"]) for r in rows}
            rows = [r for r in json.load(f)["rows"] if (r["compiler"], r["path"], r["frames"]) not in new] + rows
        order = {p: i for i, p in enumerate((BASELINE,) + PATHS)}
        rows.sort(key=lambda r: (r["compiler"], r["frames"], order.get(r["path"], 9)))
    print(write(rows, args.out, args.height, args.width))


if __name__ == "__main__":
    main()
