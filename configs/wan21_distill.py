"""DOLLAR distillation of a Wan2.1 text-to-video teacher (diffusers weights converted with tools/convert_weights.py).

    python tools/precompute_latents.py --videos DIR --vae WAN/vae --text_encoder WAN/text_encoder \\
        --tokenizer WAN/tokenizer --out DATA --frames 81 --height 480 --width 832
    python tools/convert_weights.py --src WAN/transformer --dst TEACHER --dtype bfloat16
    python -m dollar_jax.main --config=configs/wan21_distill.py:1.3b --workdir=/gcs/bucket/run \\
        --config.data.dir=DATA --config.distill.teacher=TEACHER
    python tools/plan_memory.py --config=configs/wan21_distill.py:14b --topology=v5p:2x2x2 \\
        --mesh=fsdp=2,context=4 --config.distill.batch_size=2 --config.distill.nan_guard=update ...  # lean switches:
        # XLA:TPU's per-chip memory vs HBM before renting (57 GiB of 95 lean; BENCHMARKS.md lists the switches)

Variants: "1.3b" (default), "14b", and "local": the same recipe on a tiny DiT and short clips, for a CPU
smoke run or for planning on a laptop. Add ",reward" for DOLLAR's latent reward fine-tuning.

Defaults chosen with tools/plan_memory.py (BENCHMARKS.md): bf16 compute with fp32 master weights, every
block rematerialised, attention "auto" (splash on TPU, cuDNN on GPU, xla on CPU: no edit per backend), one
81-frame 480p clip per batch shard as in the paper (8 A100s, batch 1 per GPU, FSDP, gradient checkpointing,
bf16): distill.batch_size=-1 resolves the global batch from the mesh at start-up, so the same config runs on
any slice size. For fewer clips than devices set the batch and give the rest of the devices to the context
axis, e.g. 8 devices, batch 2: --config.distill.batch_size=2 --config.mesh.fsdp=2 --config.mesh.context=4.
The lean-state switches (bf16 moments, fake score and EMA; per-update NaN guards) are in BENCHMARKS.md for
when memory is short; check a mesh with the XLA:TPU planner (tools/plan_memory.py --topology=...) before
renting it. XLA:TPU's plans (BENCHMARKS.md, v5p, per chip): 1.3B fits one chip (81 GiB, 50 lean; one v6e chip,
32 GiB, at 29.6 with a rank-64 LoRA fake score, offload_attention and the EMA and the student's optimiser state in
host memory, --config.distill.ema_memory=host --config.distill.optim_memory=host); 14B fits 8
chips with this config's context=4 and the lean switches (57 GiB; 101 without them; 49 with a rank-64 LoRA fake
score, --config.distill.fake_lora_rank=64; 45 with that and --config.distill.ema_memory=host), not at a clip
per chip (98 GiB lean), and 32 chips with context=4 at 28 GiB lean.
"""

from dollar_jax.config import _dit_defaults, base_config, variant_flags

SIZES = {"1.3b": "wan2.1-1.3b", "14b": "wan2.1-14b", "local": "tiny"}
OPTIONS = ("reward",)


def get_config(arg: str | None = None):
    flags = variant_flags(arg, (*SIZES, *OPTIONS), default="1.3b")
    sizes = [a for a in flags if a in SIZES]
    if len(sizes) > 1:
        raise ValueError(f"Conflicting sizes {sizes} in variant {arg!r}; choose one of {tuple(SIZES)}")
    size = sizes[0] if sizes else "1.3b"
    c = base_config()
    c.job, c.embedded_world = "distill", False
    c.model = _dit_defaults(SIZES[size])
    c.model.update(dict(dtype="bfloat16", param_dtype="float32", remat_policy="full", attention="auto"))
    c.diffusion.update(dict(schedule="flow", prediction_type="flow", flow_shift=3.0))  # what the converter records
    c.data.update(dict(latents="latents", latent_shape=(21, 60, 104, 16), text_shape=(512, 4096)))
    c.mesh.update(dict(data=1, fsdp=-1, context=1, tensor=1))
    c.distill.update(dict(
        steps=3000, batch_size=-1, batch_per_shard=1, teacher_dtype="bfloat16",
        # Nominal grid; the flow schedule's shift (diffusion.flow_shift) warps it, and every VSD / fake-score
        # timestep draw, to where Wan's sampler puts them (FastVideo's DMD on Wan does the same).
        student_timesteps=(999.0, 749.0, 499.0, 249.0),
        # Guidance: Wan's own sampler uses 5 (1.3B: 5-6) in the uncond-anchored form v_u + w (v_c - v_u); the
        # paper's 3.5 (VSD) and cond-anchored 7.5 (CD, = uncond-anchored 8.5) were set for its own VP teacher.
        real_guidance=5.0, real_convention="uncond_anchor",
        cd_guidance=5.0, cd_convention="uncond_anchor",
    ))
    c.distill.optim.update(dict(learning_rate=1e-5, grad_clip=1.0))  # real teachers: ~1e-5 (DMD2 scale)
    c.distill.fake_optim.update(dict(learning_rate=2e-5, grad_clip=1.0))
    c.sampling.update(dict(steps=50, guidance_scale=5.0, every_steps=0))
    c.checkpoint.update(dict(every_steps=250, keep=3))
    c.log_every_steps = 10
    if size == "14b":
        c.mesh.update(dict(fsdp=-1, context=4))  # 32760 tokens per clip: split them 4 ways as well
    if size == "local":
        # Width 2 x 16 = 32 splits over up to 32 devices (parameters shard over fsdp x context).
        c.model.update(dict(dtype="float32", num_layers=2, in_channels=16, out_channels=16, text_dim=4096,
                            attention_head_dim=16))
        c.data.update(dict(latent_shape=(5, 8, 8, 16), text_shape=(16, 4096)))
        c.distill.update(dict(fake_updates=2, steps=20))
        c.checkpoint.every_steps = 10
        c.log_every_steps = 2
    if "reward" in flags:
        # The paper's text-conditioned LRM: Wan's 16 latent channels and 4096-d umT5 text are exactly the sizes
        # its 763,009 parameters are counted at.
        c.reward.update(dict(enabled=True, decoder="wan_vae", name="clip_preference", lrm_kind="paper_text"))
    return c
