"""Throughput accounting: analytic FLOPs of the DiT and of one distillation step, per role, and MFU.

Counts are matmul FLOPs (2 per multiply-add), the convention of MFU figures (PaLM, MaxText): elementwise
work, norms and softmax are left out, so MFU never flatters. A backward pass costs two forwards. Model FLOPs
(MFU) leave rematerialised recompute out, as the field counts them (PaLM appendix B); hardware FLOPs (HFU)
add one recomputed forward per training pass of a rematerialised DiT. Roles of the DOLLAR step:
  teacher - frozen forwards: the guided real score of VSD and the guided ODE solve of CD;
  student - the backward-simulation chain (no gradient), the gradient step, the CD student and its EMA target,
            and the reward fine-tuning sample;
  fake    - the fake score's forward in VSD and its `fake_updates` training steps;
  lrm     - the latent reward model's regression step and its gradient in fine-tuning.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from dollar_jax.models.dit_config import DiTConfig

@dataclasses.dataclass(frozen=True)
class Chip:
    """A chip's dense bf16 peak (no sparsity) and its memory, from the vendors' data sheets."""
    name: str
    peak_bf16: float  # FLOP/s per chip
    hbm_gib: float  # per chip
    cores_per_chip: int = 1  # TPU TensorCores per chip (a device may be one core or, megacore, the whole chip)

    def hbm_gib_per_device(self, device) -> float:
        cores = int(getattr(device, "num_cores", 0) or 0)
        return self.hbm_gib * cores / self.cores_per_chip if cores else self.hbm_gib


# Matched against jax's device_kind, first match wins (so "H100 PCIe" before "H100", "v5 lite" before "v5").
CHIPS = (
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM per chip.
    Chip("TPU v6", 918e12, 32.0),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM per chip.
    Chip("TPU v5 lite", 197e12, 16.0), Chip("TPU v5e", 197e12, 16.0),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GB HBM per chip, 2 TensorCores (one megacore device).
    Chip("TPU v5", 459e12, 95.0, cores_per_chip=2),
    # cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM per chip, 2 TensorCores.
    Chip("TPU v4", 275e12, 32.0, cores_per_chip=2),
    # NVIDIA H200 data sheet: 989 TFLOP/s dense bf16 (1979 with sparsity), 141 GB HBM3e.
    Chip("H200", 989e12, 141e9 / 2 ** 30),
    # NVIDIA H100 data sheet: PCIe 756 TFLOP/s dense bf16, 80 GB; SXM 989 TFLOP/s, 80 GB (NVL 94 GB: 835).
    Chip("H100 PCIe", 756e12, 80e9 / 2 ** 30), Chip("H100 NVL", 835e12, 94e9 / 2 ** 30),
    Chip("H100", 989e12, 80e9 / 2 ** 30),
    # NVIDIA A100 data sheet: 312 TFLOP/s dense bf16; 40 or 80 GB (the 80 GB part assumed).
    Chip("A100", 312e12, 80e9 / 2 ** 30),
)
PEAK_BF16_FLOPS = tuple((c.name, c.peak_bf16) for c in CHIPS)


def chip_spec(device: jax.Device | None = None) -> Chip | None:
    """The device's chip, or None when unknown (CPUs: MFU is then not reported)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    return next((c for c in CHIPS if c.name.lower() in kind), None)


def peak_flops(device: jax.Device | None = None) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None when unknown."""
    chip = chip_spec(device)
    return chip.peak_bf16 if chip else None


def token_count(cfg: DiTConfig, latent_shape) -> int:
    frames, height, width = latent_shape[:3]
    pt, ph, pw = cfg.patch_size
    return (frames // pt) * (height // ph) * (width // pw)


def dit_forward_flops(cfg: DiTConfig, latent_shape, text_length: int, batch: int = 1) -> float:
    """Matmul FLOPs of one WanDiT forward on `batch` latents of `latent_shape` [F, H, W, C]."""
    t, d, length = token_count(cfg, latent_shape), cfg.inner_dim, text_length
    patch = math.prod(cfg.patch_size)
    macs = t * patch * cfg.in_channels * d  # patch embedding
    macs += length * (cfg.text_dim * d + d * d)  # text projection (two layers)
    macs += cfg.freq_dim * d + d * d + d * 6 * d  # timestep MLP and the modulation table (per example)
    per_layer = (
        4 * t * d * d  # self-attention q, k, v, o
        + 2 * t * t * d  # q k^T and (weights) v
        + 2 * t * d * d + 2 * length * d * d  # cross-attention q, o on video tokens; k, v on text
        + 2 * t * length * d  # cross-attention scores and values
        + 2 * t * d * cfg.ffn_dim  # feed-forward
    )
    macs += cfg.num_layers * per_layer
    macs += t * d * patch * cfg.out_channels  # output head
    return 2.0 * macs * batch


def distill_step_passes(config) -> dict[str, dict[str, float]]:
    """DiT passes per role of one distillation step on the global batch: "forward" (no gradient) and "train"
    (forward + backward w.r.t. the parameters), as the step in train/dollar_step.py runs it."""
    dc = config.distill
    guided = lambda scale: 2.0 if float(scale) != 1.0 else 1.0  # noqa: E731  (cond + uncond)
    grids = list(dc.student_grids) or [dc.student_timesteps]
    n = sum(len(g) for g in grids) / len(grids)  # a grid drawn uniformly, then a step uniformly in it
    chain = (n - 1) / 2.0 if dc.sample_mode == "backward_simulation" else 0.0  # expected no-grad steps
    roles = {r: {"forward": 0.0, "train": 0.0} for r in ("teacher", "student", "fake")}
    if dc.vsd_weight:  # the sample, the real and fake scores at it, and the fake-score updates
        roles["student"]["forward"] += chain
        roles["student"]["train"] += 1.0
        roles["teacher"]["forward"] += guided(dc.real_guidance)
        roles["fake"]["forward"] += 1.0
        roles["fake"]["train"] += float(dc.fake_updates)
        if dc.fake_samples == "fresh":  # a new no-gradient sample per fake update
            roles["student"]["forward"] += dc.fake_updates * (chain + 1.0)
    if dc.cd_weight:
        roles["teacher"]["forward"] += dc.cd_steps * guided(dc.cd_guidance)
        roles["student"]["train"] += 1.0  # the CD student with gradient ...
        roles["student"]["forward"] += 1.0  # ... and its EMA target without
    if config.reward.enabled and config.reward.weight:
        roles["student"]["forward"] += chain
        roles["student"]["train"] += 1.0
    return roles


def distill_step_flops(config, cfg: DiTConfig, latent_shape, text_length: int, lrm_flops: float = 0.0) -> dict:
    """Model FLOPs per role of one distillation step (global batch): what MFU counts, i.e. a training pass is
    forward + backward = 3 forwards, and rematerialised recompute is NOT counted (see `recompute_flops`).

    `lrm_flops` is one LRM forward on one example (it is a small CNN; callers measure it with XLA).
    """
    forward = dit_forward_flops(cfg, latent_shape, text_length, int(config.distill.batch_size))
    roles = {r: (p["forward"] + 3.0 * p["train"]) * forward for r, p in distill_step_passes(config).items()}
    reward = config.reward
    if reward.enabled:
        roles["lrm"] = 3.0 * lrm_flops * reward.lrm_batch_size
        if reward.weight:
            roles["lrm"] += 3.0 * lrm_flops * int(config.distill.batch_size)
    return roles


def recompute_flops(config, cfg: DiTConfig, latent_shape, text_length: int) -> float:
    """FLOPs the hardware spends on top of the model FLOPs: one recomputed forward per training pass of a
    rematerialised DiT (an upper bound for the partial policies, which save some of it). HFU counts them."""
    if cfg.remat_policy == "none":
        return 0.0
    forward = dit_forward_flops(cfg, latent_shape, text_length, int(config.distill.batch_size))
    return forward * sum(p["train"] for p in distill_step_passes(config).values())


def is_throughput_metric(name: str) -> bool:
    """Metrics that depend on wall time (excluded when comparing runs for exactness)."""
    return name.startswith(("tflops_", "mfu", "hfu", "time_"))


def utilisation(flops_per_step: dict, steps: int, seconds: float, num_devices: int,
                peak: float | None, recompute_per_step: float = 0.0) -> dict[str, float]:
    """Metrics for a window of `steps` steps that took `seconds`: achieved model TFLOP/s per device, MFU
    overall and per role when the peak is known, and HFU (model + rematerialised recompute FLOPs)."""
    total = sum(flops_per_step.values())
    per_device = total * steps / seconds / num_devices
    out = {"tflops_per_device": per_device / 1e12}
    if peak:
        out["mfu"] = per_device / peak
        out["hfu"] = (total + recompute_per_step) * steps / seconds / num_devices / peak
        for role, flops in flops_per_step.items():
            out[f"mfu_{role}"] = flops * steps / seconds / num_devices / peak
    return out
