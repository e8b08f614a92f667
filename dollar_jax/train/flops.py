"""Throughput accounting: analytic FLOPs of the DiT and of one distillation step, per role, and MFU.

Counts are matmul FLOPs (2 per multiply-add), the convention of MFU figures (PaLM, MaxText): elementwise
work, norms and softmax are left out, so MFU never flatters. A backward pass costs two forwards; a
rematerialised block costs one more forward. Roles of the DOLLAR step:
  teacher - frozen forwards: the guided real score of VSD and the guided ODE solve of CD;
  student - the backward-simulation chain (no gradient), the gradient step, the CD student and its EMA target,
            and the reward fine-tuning sample;
  fake    - the fake score's forward in VSD and its `fake_updates` training steps;
  lrm     - the latent reward model's regression step and its gradient in fine-tuning.
"""

from __future__ import annotations

import math

import jax

from dollar_jax.models.dit_config import DiTConfig

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets (no sparsity).
PEAK_BF16_FLOPS = (
    ("TPU v6", 918e12),  # Trillium / v6e
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v4", 275e12),
    ("H200", 989e12), ("H100", 989e12),
    ("A100", 312e12),
)


def peak_flops(device: jax.Device | None = None) -> float | None:
    """The device's dense bf16 peak, or None when unknown (CPUs: MFU is then not reported)."""
    kind = (device or jax.devices()[0]).device_kind
    return next((peak for name, peak in PEAK_BF16_FLOPS if name.lower() in kind.lower()), None)


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


def _train_factor(cfg: DiTConfig) -> float:
    """Forward + backward (+ the recomputed forward of a rematerialised block), in forwards."""
    return 3.0 + (1.0 if cfg.remat_policy != "none" else 0.0)


def distill_step_flops(config, cfg: DiTConfig, latent_shape, text_length: int, lrm_flops: float = 0.0) -> dict:
    """Expected FLOPs per role of one distillation step (global batch), as the step in jobs/distill.py runs it.

    `lrm_flops` is one LRM forward on one example (it is a small CNN; callers measure it with XLA).
    """
    dc = config.distill
    batch = int(dc.batch_size)
    forward = dit_forward_flops(cfg, latent_shape, text_length, batch)
    guided = lambda scale: 2.0 if float(scale) != 1.0 else 1.0  # noqa: E731  (cond + uncond)
    grids = list(dc.student_grids) or [dc.student_timesteps]
    n = sum(len(g) for g in grids) / len(grids)  # a grid drawn uniformly, then a step uniformly in it
    chain = (n - 1) / 2.0 if dc.sample_mode == "backward_simulation" else 0.0  # expected no-grad steps
    train = _train_factor(cfg)
    roles = {"teacher": 0.0, "student": 0.0, "fake": 0.0}
    if dc.vsd_weight:  # the sample, the real and fake scores at it, and the fake-score updates
        roles["student"] += (chain + train) * forward
        roles["teacher"] += guided(dc.real_guidance) * forward
        roles["fake"] += forward + dc.fake_updates * train * forward
        if dc.fake_samples == "fresh":  # a new no-gradient sample per fake update
            roles["student"] += dc.fake_updates * (chain + 1.0) * forward
    if dc.cd_weight:
        roles["teacher"] += dc.cd_steps * guided(dc.cd_guidance) * forward
        roles["student"] += (train + 1.0) * forward  # the CD student with gradient, its EMA target without
    reward = config.reward
    if reward.enabled:
        roles["lrm"] = 3.0 * lrm_flops * reward.lrm_batch_size
        if reward.weight:
            roles["student"] += (chain + train) * forward
            roles["lrm"] += 3.0 * lrm_flops * batch
    return roles


def is_throughput_metric(name: str) -> bool:
    """Metrics that depend on wall time (excluded when comparing runs for exactness)."""
    return name.startswith(("tflops_", "mfu"))


def utilisation(flops_per_step: dict, steps: int, seconds: float, num_devices: int,
                peak: float | None) -> dict[str, float]:
    """Metrics for a window of `steps` steps that took `seconds`: achieved TFLOP/s per device, and MFU
    overall and per role when the peak is known."""
    total = sum(flops_per_step.values())
    per_device = total * steps / seconds / num_devices
    out = {"tflops_per_device": per_device / 1e12}
    if peak:
        out["mfu"] = per_device / peak
        for role, flops in flops_per_step.items():
            out[f"mfu_{role}"] = flops * steps / seconds / num_devices / peak
    return out
