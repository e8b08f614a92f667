"""The configuration schema: every key any job reads, with its default and type.

Experiment files in configs/ start from `base_config()` (big_vision style `get_config(arg)`), change
values, and return the config *locked*: assigning a key that does not exist, in the file or with
`--config.key=value` on the command line, is an error naming the key, before anything compiles.
Types are enforced too (a float field refuses a string).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import ml_collections

from dollar_jax.models.dit_config import DiTConfig

STEP_COMPILE = ("full", "light")  # config.step_compile (dollar_jax/compile_effort.py)
JOBS = ("autoencoder", "precompute", "teacher", "distill", "demo")
MEMORIES = ("device", "host")  # where a stored copy can live between steps (parallel/sharding.py: in_memory)


def check_step_compile(value: str) -> None:
    """The one check of config.step_compile: validate() and compile_effort.step_options both call it."""
    if value not in STEP_COMPILE:
        raise ValueError(f"config.step_compile must be one of {STEP_COMPILE}, got {value!r}")


def _dit_defaults(preset: str = "tiny") -> ml_collections.ConfigDict:
    from dollar_jax.models.dit_config import PRESETS

    d = PRESETS[preset].to_dict()
    d["patch_size"] = tuple(d["patch_size"])
    return ml_collections.ConfigDict(d)


def optimizer(**overrides) -> ml_collections.ConfigDict:
    """An optimiser section: AdamW, linear warm-up, then cosine/linear decay (or constant), global-norm clip.
    name: "adamw", "adam", "sgd", or "muon" (a DiT's block matrices by Muon, the rest by Nesterov Adam with b1, b2;
    train/optim.py)."""
    c = dict(name="adamw", learning_rate=1e-3, warmup_steps=0, decay="cosine", final_lr_fraction=0.1,
             b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip=1.0,
             # Adam's stored moments: "bfloat16" halves optimiser memory (the update is still computed in fp32).
             moment_dtype="float32",
             # b1 = 0 makes Adam's first moment the gradient itself: do not store it (bit-exact, saves a copy).
             drop_zero_first_moment=True)
    unknown = set(overrides) - set(c)
    if unknown:
        raise KeyError(f"Unknown optimizer keys {sorted(unknown)}")
    c.update(overrides)
    return ml_collections.ConfigDict(c)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = "teacher"
    c.seed = 0
    # Multi-host start (dollar_jax/parallel/distributed.py): "auto" detects Cloud TPU VMs, GKE, SLURM and the
    # DOLLAR_COORDINATOR/_NUM_PROCESSES/_PROCESS_ID triple; "on" forces jax.distributed.initialize(); "off"
    # runs this process alone. The DOLLAR_DISTRIBUTED environment variable overrides it.
    c.distributed = "auto"
    # Persistent XLA compilation cache (a restart loads the compiled step instead of recompiling for minutes):
    # "auto" = <workdir>/compilation_cache, any other string = that folder (local or gs://), "" = off.
    c.compilation_cache = "auto"
    # Build the embedded shapes world's prerequisites (videos -> autoencoder -> latents) when a job needs
    # them. Real runs set this False and point config.data at precomputed latents.
    c.embedded_world = True

    # Device mesh (one axis may be -1: all remaining devices) and optional logical-axis rule overrides.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, context=1, tensor=1))
    c.sharding_rules = ml_collections.FieldReference(None, field_type=list)

    # The embedded shapes world (dollar_jax/data/world.py).
    # held_out_combinations: factor combinations (of 144) no split ever shows, evaluated apart as compositions
    # never seen (world.held_out_set: every value and every pair of values stays in training).
    c.world = ml_collections.ConfigDict(dict(num_frames=8, height=32, width=32, num_train=4096, num_val=256, seed=0,
                                             held_out_combinations=0))

    # Datasets. `dir` defaults to <workdir>/data; datasets are tfds ArrayRecord folders read with grain.
    c.data = ml_collections.ConfigDict(dict(
        dir="",
        videos="shapes_world",  # the video dataset the autoencoder trains on and `precompute` encodes
        latents="world_latents",  # the dataset of (latents, text embeddings) every diffusion job reads
        # Expected per-example shapes of that dataset ([F, H, W, C] latents, [L, D] text); () = take the
        # dataset's. Real-run configs set them: the dataset is checked against them and tools (the memory
        # planner) plan with them.
        latent_shape=(), text_shape=(),
        shuffle_seed=0,
        read_threads=2,
        prefetch=4,
    ))

    # The small video autoencoder of the embedded world (dollar_jax/models/autoencoder.py).
    # Measured on 2 CPU cores: 1000 steps of batch 16 take ~55 s and reach ~26 dB validation PSNR.
    c.autoencoder = ml_collections.ConfigDict(dict(
        latent_channels=16, width=48, blocks=1, temporal_kernel=1, temporal_downsample=2, spatial_downsample=4,
        steps=1000, batch_size=16, learning_rate=3e-3, warmup_steps=100, kl_weight=1e-4,
        dir="",  # defaults to <workdir>/autoencoder
    ))

    # The evaluation encoder: a small 3-D CNN trained to classify the world's factors (features for Vendi/FD).
    c.world_encoder = ml_collections.ConfigDict(dict(steps=300, batch_size=32, learning_rate=2e-3, width=64,
                                                     features=128, dir=""))

    # The world's deterministic text encoder (real runs store umT5 embeddings in the latents dataset).
    c.text = ml_collections.ConfigDict(dict(max_length=8, dim=32, seed=0))

    # The video DiT: any DiTConfig field. `init_from` names a model folder (tools/convert_weights.py output).
    c.model = _dit_defaults("tiny")
    c.model_init_from = ""

    # Diffusion parameterisation of the teacher (and therefore of student and fake score).
    c.diffusion = ml_collections.ConfigDict(dict(
        schedule="vp", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        flow_shift=3.0, prediction_type="conjugate_v",
    ))

    # Teacher pre-training.
    # Every training stage has its own steps, global batch (each host reads batch / process_count) and optimiser.
    c.teacher = ml_collections.ConfigDict(dict(
        steps=3000, batch_size=32, ema_decay=0.999,
        optim=optimizer(learning_rate=1e-3, warmup_steps=200),
        text_dropout=0.1,  # probability of training on the null text (makes CFG possible)
        # Training timesteps: "uniform" on [0, T], or "logit_normal" (SD3's density: T sigmoid(m + s z)), which
        # spends fewer steps at the nearly clean and the nearly pure-noise ends (losses/denoising.py).
        timesteps="uniform", logit_mean=0.0, logit_std=1.0,
        dir="",  # defaults to <workdir>/teacher
    ))

    # DOLLAR distillation (dollar_jax/jobs/distill.py). Architecture and parameterisation come from the
    # teacher folder; config.model only contributes numerics (dtype, param_dtype, remat_policy, attention,
    # splash_block_sizes).
    c.distill = ml_collections.ConfigDict(dict(
        # Global batch; -1: batch_per_shard clips on every batch shard (data x fsdp mesh axes), resolved at
        # start-up from the mesh, so one config fits any slice. A batch the shards do not divide is an error
        # naming the values that work (fewer clips than devices: put the rest on the context axis).
        steps=600, batch_size=16, batch_per_shard=1,
        # DMD2's Adam(b1 = 0); rates measured on the embedded world (BENCHMARKS.md); real teachers want ~1e-5.
        optim=optimizer(learning_rate=1e-4, warmup_steps=0, decay="constant", b1=0.0, b2=0.999),  # the student
        fake_optim=optimizer(learning_rate=2e-4, warmup_steps=0, decay="constant", b1=0.0, b2=0.999),
        teacher="",  # teacher model folder; default <workdir>/teacher
        teacher_dtype="float32",  # storage dtype of the frozen teacher ("bfloat16" halves its memory)
        name="student",  # run name and export folder <workdir>/<name>
        # The student's grid in the paper's units; every grid goes through the schedule's warp (a flow teacher's
        # shift: 999/749/499/249 become Wan's shifted 4-step grid, as Wan's sampler and FastVideo place them).
        student_timesteps=(999.0, 749.0, 499.0, 249.0),  # the paper's 4-step student
        # Several grids trained at once so one student serves every step count, e.g.
        # ((999., 749., 499., 249.), (999., 499.), (999.,)); () trains student_timesteps only (the paper trains
        # one student per step count). Sampling with a step count not trained is an error.
        student_grids=ml_collections.FieldReference((), field_type=tuple),
        grid_sampling="per_iteration",  # with student_grids: one grid per batch, or "per_example"
        sample_mode="backward_simulation",  # or "noised_data"
        # VSD (DMD2 form): real score = teacher with CFG; fake score unguided, trained online. The paper's 3.5
        # leaves the convention open; "uncond_anchor" is v_u + w (v_c - v_u) (DMD2's and Wan's sampler's form).
        vsd_weight=1.0, real_guidance=3.5, real_convention="uncond_anchor", vsd_t_min=0.02, vsd_t_max=0.98,
        # CD: m teacher DDIM steps on the teacher's grid, CFG 7.5 in the paper's cond-anchored form
        # v_c + w (v_c - v_u) (= uncond-anchored 8.5).
        cd_weight=0.5, cd_steps=5, cd_grid=50, cd_guidance=7.5, cd_convention="cond_anchor",
        cd_distance="huber", huber_c=0.001,
        fake_updates=5,  # fake-score updates per generator update (the paper: 5); none when vsd_weight = 0
        # What each fake-score update trains on. "fresh" (DMD2 / FastVideo): new noise, a new order of the
        # batch's captions (a per-update permutation inside the step: no extra data reads, the captions stay
        # the data distribution's) and a new no-gradient sample of the just-updated student. "reuse":
        # re-noise the generator step's B samples every update (cheaper: no student evaluations; the fake
        # score then sees only B samples per iteration). The paper does not say; DMD2 draws fresh ones.
        fake_samples="fresh",
        student_ema_decay=0.95,  # the CD target network
        sigma_data=0.5, timestep_scale=10.0,  # LCM boundary scalings
        export="raw",  # export the raw student ("raw") or its EMA ("ema")
        # Rows per caption in a batch: K > 1 repeats each example (latents, text, caption) K times in
        # consecutive rows, so the step can measure one prompt's spread of samples (train/health.py).
        # The batch then holds batch_size / K distinct examples.
        repeat_captions=1,
        # Memory switches (BENCHMARKS.md, planner section, measures each with XLA:TPU):
        fake_dtype="",  # storage dtype of the fake score's trained parameters ("bfloat16"; "" = model.param_dtype)
        # > 0: the fake score is the frozen teacher plus LoRA adapters of this rank on every block's linear layers
        # (models/lora.py; MagicDistillation, FastVideo) instead of a full trained copy; alpha 0 means alpha = rank.
        # On the test world rank 8 at the full copy's learning rate fell behind the student (BENCHMARKS.md).
        fake_lora_rank=0, fake_lora_alpha=0.0,
        ema_dtype="",  # storage dtype of the student's EMA (CD target); it is not kept at all with cd_weight=0
        # and export="raw", since nothing reads it then
        # Where the EMA lives: "device" (HBM), or "host" (pinned host memory: the host updates it from the new
        # parameters, and each step copies it in only for the CD target; it costs HBM only while that reads it)
        ema_memory="device",
        # Where the student's optimiser states (VSD + CD, and L_FT's) live: "device", or "host" (pinned host
        # memory; the host runs the update from the gradient copied out, and only the update comes back). Needs
        # nan_guard="update". The fake score's stays on the device: its updates run in a loop on the device.
        optim_memory="device",
        nan_guard="state",  # "state": a non-finite step keeps the whole old state (an old and a new copy are
        # alive); "update": each optimiser update skips itself when its gradients are not finite (no copy)
        # Gradient accumulation: the generator's VSD + CD gradient (and each fake-score update's) is the mean
        # over this many equal chunks of the batch, one chunk's activations alive at a time. Each chunk draws
        # its own noise and timesteps (the estimator is the same; the draws differ from one whole-batch pass).
        microbatches=1, fake_microbatches=1,
        eval_steps=(1, 2, 4),  # step counts evaluated and reported for the student
    ))
    # Latent reward fine-tuning (DOLLAR's LRM), part of the distillation step when enabled.
    c.reward = ml_collections.ConfigDict(dict(
        enabled=False,
        name="colourfulness",  # a registered pixel reward (dollar_jax/rewards): any Python function of videos
        path="",  # local weights for model-based rewards (clip_preference: a transformers CLIP folder)
        # how the labeller decodes latents: "world_autoencoder" | "wan_vae" (diffusers, torch) |
        # "wan_vae_flax" (dollar_jax/models/wan_vae.py, jit on the accelerator, no torch)
        decoder="world_autoencoder",
        vae_path="",  # decoder="wan_vae": a diffusers AutoencoderKLWan folder; "wan_vae_flax": that or a converted one
        weight=1.0,  # beta_FT; 0 trains the LRM but leaves the student exactly as plain distillation
        # kind: "paper_image" | "paper_text" (the paper's Table 8.1 layouts: 189,441 / 763,009 parameters at
        # 16 latent channels and 4096-d text) | "frame" | "frame_text" | "video3d" (this project's variants)
        lrm_kind="frame", lrm_width=128, lrm_first_stride=4,
        lrm_optim=optimizer(learning_rate=1e-3, warmup_steps=0, decay="constant"),
        lrm_batch_size=32,
        label_lag=2,  # step s trains on labels of steps <= s - lag (the labeller overlaps with the step)
        # ... and > s - lag - window. The window is what each host keeps in memory and in every checkpoint
        # (latents and text in bf16, text once per clip): per host, with r = distill.batch_size / hosts rows,
        #   bytes ~ (label_window + label_lag + 1) * r * (2 * 2 * prod(latent_shape) + 2 * prod(text_shape) + 8)
        # Wan2.1 81x480x832 (latents [21, 60, 104, 16], umT5 text [512, 4096]): ~12.6 MB per row and step,
        # so 64 + 2 + 1 steps x 1 row = 0.84 GB per host (x r rows). Lower the window for larger r.
        label_window=64,
        ft_microbatches=1,  # gradient accumulation for the L_FT generator step (the paper: 7)
        # The L_FT generator step's own optimiser (its own Adam moments and schedule, counting L_FT steps only;
        # sharing the VSD + CD state would advance it twice per iteration). The paper does not give it.
        ft_optim=optimizer(learning_rate=1e-4, warmup_steps=0, decay="constant", b1=0.0, b2=0.999),
        # L_FT waits for the LRM: no L_FT step before ft_start_step iterations have run, then its update is
        # scaled by min(1, n / ft_ramp_steps) for its n-th step (0: no ramp). The paper starts L_FT at once.
        ft_start_step=0, ft_ramp_steps=0,
        # ... and, above -1, until the evaluator's LRM-vs-true-reward correlation on held-out latents reaches
        # this value (a host-side gate, checked every sampling.every_steps; needs the embedded world's evaluator).
        ft_min_correlation=-1.0,
        eval_examples=64,  # held-out latents for the LRM-vs-true-reward correlation
    ))

    # Training health (dollar_jax/train/health.py): alarm flags in the distillation metrics, and a warning in the
    # log when an alarm is raised on at least warn_fraction of a log window's steps.
    c.health = ml_collections.ConfigDict(dict(
        collapse_fraction=0.25,  # diversity (across the batch or within a prompt) below this x the data's
        static_fraction=0.25,  # motion below this x the data's
        saturation_sigmas=4.0,  # "saturated": farther than this many data stds from the channel mean ...
        saturation_excess=0.02,  # ... alarm when the samples have this fraction more such values than the data
        mean_drift_sigmas=0.5,  # alarm when a channel's sample mean is this many data stds off the data's
        warn_fraction=0.5,
    ))

    # Sampling (periodic samples, evaluation, `dollar_jax.sample`).
    c.sampling = ml_collections.ConfigDict(dict(
        steps=50, guidance_scale=4.5, convention="uncond_anchor", num_videos=8, every_steps=0, fps=8,
    ))

    # The main demo's evaluation protocol (dollar_jax/jobs/demo.py).
    # distill_seeds: one student training per seed for every ablation row (config.seed and the data order move
    # with it); the claims average over them and their spread enters the standard error (eval/report.py). The
    # seed equal to config.seed keeps the plain run names, so a one-seed run's work directory stays as it was.
    # variant: the configs/demo.py variant that produced the run, named in REPORT.md.
    # reward_baselines: "reward:method,method;reward:method..."; each entry fine-tunes the VSD+CD student on that
    # reward by each method (lrm, pixel, pg: dollar_jax/eval/reward_baselines.py) for reward_baseline_steps
    # steps, and REPORT.md gets the LRM-vs-alternatives table. Empty: not run.
    # speed_repeats: timed runs of one video; a batch of b videos is timed about speed_repeats / b times (>= 3).
    c.demo = ml_collections.ConfigDict(dict(prompts=16, samples_per_prompt=8, seed=0,
                                            speed_repeats=21, speed_batches=(1, 16), distill_seeds=(0,),
                                            variant="default", reward_baselines="", reward_baseline_steps=100,
                                            # the teacher stage samples config.sampling.num_videos clips every
                                            # this many steps (0: never): REPORT.md's per-factor learning curve
                                            teacher_eval_every=200,
                                            # stages that do not need each other's output (the students; the
                                            # evaluation encoder and the teacher) run side by side in up to this
                                            # many processes (jobs/side_by_side.py); 1: here, one after another
                                            side_by_side=1,
                                            # a second demo in <workdir>/flow with the teacher given by these
                                            # overrides (configs/demo.py's FLOW), on this run's data, autoencoder
                                            # and evaluation encoder, one seed: REPORT.md's flow-teacher section
                                            flow_section=ml_collections.ConfigDict(),
                                            # REPORT.md's reward fine-tuning memory curve: one generator step
                                            # through the LRM vs the pixel path (Wan's VAE decoder + ViT-B/16)
                                            # at these frames and size, compiled (eval/reward_memory.py) and run
                                            # for its step time where its peak is at most run_max_gib; each row a
                                            # child process on the CPU, over timeout seconds: "not measured";
                                            # tiny: small stand-ins of the decoder and the ViT (smoke runs)
                                            reward_memory=ml_collections.ConfigDict(dict(
                                                enabled=False, frames=(8, 16, 32, 64, 128), height=480, width=832,
                                                tiny=False, timeout=900.0, run_max_gib=8.0))))

    # How REPORT.md judges the paper's claims (eval/report.py: verdict). Fixed here, before any run: a student
    # "matches the teacher" when its adherence is at most this much below the teacher's at two standard errors.
    c.report = ml_collections.ConfigDict(dict(non_inferiority_margin=0.05))

    # Checkpoints, logging and the non-finite guard.
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, asynchronous=True))
    c.log_every_steps = 50
    # TensorBoard event files (clu's writer and progress report) beside metrics.jsonl. False: metrics.jsonl and
    # the progress lines only, and TensorFlow is never imported (about 7 s less start-up on 2 CPU cores).
    c.tensorboard = True
    # How hard XLA compiles the train step (dollar_jax/compile_effort.py): "full" (XLA's default) or "light" (LLVM
    # level 0 on CPU: 15-33% less compile time, steps about 3x slower: BENCHMARKS.md; pays only in runs of a few
    # small steps: smoke runs and tests). Other backends ignore it.
    c.step_compile = "full"
    # A jax.profiler trace of steps start_step .. start_step + num_steps - 1 into <workdir>/profile (TensorBoard's
    # profile plugin / XProf). num_steps = 0: no trace. Start after the first step: it includes compilation.
    c.profile = ml_collections.ConfigDict(dict(start_step=0, num_steps=0))
    c.nan_policy = "stop"  # "stop": report the step and stop (the last good checkpoint is kept) | "skip"
    c.lock()  # from here on, assigning an unknown key (in a config file or on the command line) is an error
    return c


def embedded_world(c: ml_collections.ConfigDict, quick: bool = False) -> ml_collections.ConfigDict:
    """The embedded default: the shapes world, its autoencoder, and the tiny teacher DiT sized for it.

    Latents are [4, 8, 8, 16] per clip; with patch (1, 2, 2) the DiT sees 64 tokens. `quick` shrinks every
    stage for tests and CI (minutes become seconds; the numbers it produces are smoke, not results).
    """
    c.embedded_world = True
    c.reward.lrm_first_stride = 2  # 8x8 latents: keep a 4x4 map after the first convolution
    c.model.update(dict(in_channels=16, out_channels=16, text_dim=c.text.dim, num_attention_heads=4,
                        attention_head_dim=32, ffn_dim=256, num_layers=4, freq_dim=64, rope_max_seq_len=64,
                        patch_size=(1, 2, 2)))
    if quick:
        c.world.update(dict(num_train=512, num_val=64))
        c.autoencoder.steps = 150
        c.model.update(dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2))
        c.teacher.update(dict(steps=200, batch_size=16, ema_decay=0.99))
        c.teacher.optim.warmup_steps = 20
        c.distill.update(dict(steps=40, batch_size=8, fake_updates=2))
        c.sampling.steps = 10
        c.sampling.num_videos = 4
        c.checkpoint.every_steps = 50
        c.log_every_steps = 10
    return c


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_from_file(path_and_variant: str) -> ml_collections.ConfigDict:
    """"configs/demo.py:quick" -> that file's get_config("quick"), as --config= gives it to dollar_jax.main: for
    scripts and tests. A relative path is taken from the working directory, else from the repository root."""
    path, _, variant = path_and_variant.partition(":")
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(REPO_ROOT, path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path_and_variant!r} not found")
    spec = importlib.util.spec_from_file_location(f"config_{os.path.splitext(os.path.basename(path))[0]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant or None)


def variant_flags(arg: str | None, allowed, default: str = "") -> list[str]:
    """The comma-separated variants of `--config=configs/x.py:a,b`; an unknown one is an error naming the choices."""
    flags = [a for a in (arg or default).split(",") if a]
    unknown = [a for a in flags if a not in allowed]
    if unknown:
        raise ValueError(f"Unknown variant(s) {unknown}; choose from {tuple(allowed)}")
    return flags


def validate(config: ml_collections.ConfigDict) -> None:
    """Cross-field checks that types alone cannot express. Raises ValueError naming the key."""
    if config.job not in JOBS:
        raise ValueError(f"config.job must be one of {JOBS}, got {config.job!r}")
    check_step_compile(config.step_compile)
    if config.nan_policy not in ("stop", "skip"):
        raise ValueError(f"config.nan_policy must be 'stop' or 'skip', got {config.nan_policy!r}")
    if config.diffusion.schedule not in ("vp", "flow"):
        raise ValueError(f"config.diffusion.schedule must be 'vp' or 'flow', got {config.diffusion.schedule!r}")
    dit_config(config)  # raises on bad model fields
    if config.distill.nan_guard not in ("state", "update"):
        raise ValueError(f"config.distill.nan_guard must be 'state' or 'update', got {config.distill.nan_guard!r}")
    if config.distill.fake_lora_rank < 0:
        raise ValueError(f"config.distill.fake_lora_rank must be >= 0 (0: a full fake score), "
                         f"got {config.distill.fake_lora_rank}")
    for key in ("ema_memory", "optim_memory"):
        if config.distill[key] not in MEMORIES:
            raise ValueError(f"config.distill.{key} must be one of {MEMORIES}, got {config.distill[key]!r}")
    if config.distill.optim_memory == "host" and config.distill.nan_guard != "update":
        raise ValueError("config.distill.optim_memory='host' needs config.distill.nan_guard='update': the host "
                         "guards its optimiser state per update, the device never holds an old copy to go back to")
    for key in ("fake_dtype", "ema_dtype"):
        if config.distill[key] not in ("", "float32", "bfloat16"):
            raise ValueError(f"config.distill.{key} must be '', 'float32' or 'bfloat16', got {config.distill[key]!r}")
    if config.teacher.timesteps not in ("uniform", "logit_normal") or config.teacher.logit_std <= 0:
        raise ValueError(f"config.teacher.timesteps must be 'uniform' or 'logit_normal' (with logit_std > 0), got "
                         f"{config.teacher.timesteps!r} (logit_std {config.teacher.logit_std})")
    for stage in ("autoencoder", "world_encoder", "teacher", "distill"):
        fill = stage == "distill" and config[stage].batch_size == -1 and config[stage].batch_per_shard >= 1
        if (config[stage].batch_size <= 0 and not fill) or config[stage].steps <= 0:
            raise ValueError(f"config.{stage}.batch_size and config.{stage}.steps must be positive"
                             + (" (distill.batch_size may be -1: batch_per_shard clips per batch shard)"
                                if stage == "distill" else ""))
    seeds = tuple(config.demo.distill_seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"config.demo.distill_seeds must be non-empty and distinct, got {seeds}")
    margin = config.report.non_inferiority_margin
    if not margin >= 0:
        raise ValueError(f"config.report.non_inferiority_margin must be >= 0, got {margin}")
    k = config.distill.repeat_captions
    if k < 1 or (config.distill.batch_size > 0 and config.distill.batch_size % k):
        raise ValueError(f"config.distill.repeat_captions={k} must be >= 1 and divide "
                         f"config.distill.batch_size={config.distill.batch_size}")


def dit_config(config: ml_collections.ConfigDict) -> DiTConfig:
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    d = config.model.to_dict()
    unknown = set(d) - fields
    if unknown:
        raise ValueError(f"Unknown config.model keys {sorted(unknown)}")
    return DiTConfig.from_dict(d)


def schedule_of(config: ml_collections.ConfigDict):
    from dollar_jax.diffusion.schedules import FlowSchedule, VPSchedule

    d = config.diffusion
    if d.schedule == "vp":
        return VPSchedule(beta_schedule=d.beta_schedule, beta_start=d.beta_start, beta_end=d.beta_end)
    return FlowSchedule(shift=d.flow_shift)
